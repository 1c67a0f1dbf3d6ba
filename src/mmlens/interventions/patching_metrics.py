"""Metrics for patching: what a run scores, one value per batch row.

Segmentation questions are scored by a linear probe read at one layer on chosen image tokens:
the true-class logit margin (true logit minus the best other logit, averaged over the tokens;
differentiable, so attribution patching can use it) or the probe's accuracy on them (a step
function: its gradient is zero, so use it for exact patching only). General questions are scored
by the logit difference of answer tokens. Any callable on the run's activations works too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..model import HookedMLLM, MultimodalInputs
from ..probing.sites import gather_image_tokens, site_for
from .groups import GroupContext, TokenGroup


class CacheMetric:
    """Any function of the run's activations (hook name -> tensor, plus "logits") and inputs,
    returning one value per batch row; `hooks` names the activations it reads. With
    `reads_logits=False` (it reads `hooks` only) patching runs stop above the highest LLM layer
    it reads, and "logits" is then not in `activations`."""

    def __init__(self, fn: Callable[[Mapping[str, Tensor], MultimodalInputs], Tensor], hooks: Sequence[str] = (),
                 name: str = "metric", reads_logits: bool = True):
        self.fn, self.hooks, self.name, self.reads_logits = fn, tuple(hooks), name, reads_logits

    def __call__(self, activations: Mapping[str, Tensor], inputs: MultimodalInputs) -> Tensor:
        return self.fn(activations, inputs)

    def __repr__(self) -> str:
        return f"CacheMetric({self.name}, hooks={list(self.hooks)})"


class ProbeMetric:
    """A linear probe at `hook`, scored on chosen labelled image tokens of one batch, averaged per
    batch row. Rows with no scored token give NaN (and no gradient)."""

    # it reads its hook only, so patching runs may stop above the probe's layer
    reads_logits = False

    def __init__(self, model: HookedMLLM, probe, hook: str, labels: Int[Tensor, "n_images n_tokens"],
                 scored: Bool[Tensor, "n_images n_tokens"], inputs: MultimodalInputs,
                 kind: Literal["margin", "accuracy"] = "margin"):
        if kind not in ("margin", "accuracy"):
            raise ValueError(f"kind must be 'margin' (differentiable) or 'accuracy', got {kind!r}")
        self.site = site_for(model, hook)
        if self.site.grid != "llm":
            raise ValueError(f"{self.site.hook} is a vision site; probe metrics read image tokens on the LLM grid "
                             "(adapter.hook_out or an LLM layer)")
        if labels.shape != scored.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and scored tokens {tuple(scored.shape)} must match")
        self.hooks = (self.site.hook,)
        self.probe, self.kind = probe.to(model.cfg.device), kind
        self.labels = labels.long().clamp(0, probe.n_classes - 1).to(model.cfg.device)
        self.scored = scored.bool().to(model.cfg.device)
        layout = inputs.layout
        self.rows = torch.tensor([s.row for s in layout.spans], device=model.cfg.device)
        self.batch = len(inputs)
        self.name = f"probe {kind} at {self.site.label}"

    @property
    def n_scored(self) -> Int[Tensor, "n_images"]:
        return self.scored.sum(1).cpu()

    def per_token(self, activation: Tensor, inputs: MultimodalInputs) -> Float[Tensor, "n_images n_tokens"]:
        x = gather_image_tokens(self.site, activation, inputs.layout)
        if x.shape[:2] != self.labels.shape:
            raise ValueError(f"the metric was built for {tuple(self.labels.shape)} image tokens but the run has "
                             f"{tuple(x.shape[:2])}; build it on the same batch")
        logits = self.probe.logits(x.flatten(0, 1).float()).view(*x.shape[:2], -1)
        return self._score(logits[None])[0]

    def __call__(self, activations: Mapping[str, Tensor], inputs: MultimodalInputs) -> Float[Tensor, "batch"]:
        return self._per_row(self.per_token(activations[self.site.hook], inputs)[None])[0]

    def per_copy(self, activations: Mapping[str, Tensor], repeated: MultimodalInputs, copies: int) -> Float[Tensor, "copies batch"]:
        """The metric of each of `copies` copies of its batch run as one (`repeat_inputs`), in one
        probe evaluation instead of one per copy (patching's chunks)."""
        x = gather_image_tokens(self.site, activations[self.site.hook], repeated.layout)
        if x.shape[:2] != (copies * self.labels.shape[0], self.labels.shape[1]):
            raise ValueError(f"the metric was built for {tuple(self.labels.shape)} image tokens but {copies} copies of "
                             f"the run have {tuple(x.shape[:2])}; build it on the same batch")
        logits = self.probe.logits(x.flatten(0, 1).float()).view(copies, *self.labels.shape, -1)
        return self._per_row(self._score(logits))

    def _score(self, logits: Float[Tensor, "copies n_images n_tokens classes"]) -> Float[Tensor, "copies n_images n_tokens"]:
        labels = self.labels.expand(*logits.shape[:-1])
        if self.kind == "accuracy":
            return (logits.argmax(-1) == labels).float()
        true = logits.gather(-1, labels[..., None])[..., 0]
        others = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[-1]).bool(), float("-inf"))
        return true - others.amax(-1)

    def _per_row(self, values: Float[Tensor, "copies n_images n_tokens"]) -> Float[Tensor, "copies batch"]:
        weights = self.scored.float()
        total = values.new_zeros(len(values), self.batch).index_add(1, self.rows, (values * weights).sum(-1))
        count = values.new_zeros(len(values), self.batch).index_add(1, self.rows, weights.sum(1).expand(len(values), -1))
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))

    def __repr__(self) -> str:
        return f"ProbeMetric({self.name}, {int(self.scored.sum())} tokens)"


def probe_metric(
    model: HookedMLLM,
    probe,
    hook: str,
    inputs: MultimodalInputs,
    token_labels,
    *,
    tokens: TokenGroup | Bool[Tensor, "batch seq"] | None = None,
    kind: Literal["margin", "accuracy"] = "margin",
    context: GroupContext | None = None,
) -> ProbeMetric:
    """The probe at `hook` (e.g. `sweep.probes[("model", "blocks.3.hook_resid_post")]`) scored on
    the labelled image tokens of `inputs` selected by `tokens` (a TokenGroup, resolved with
    `context`, or a [batch, seq] mask; default all image tokens). `token_labels` is the batch's
    `TokenLabels` (`labelled_batches(...).labels["llm"]`) or a labels tensor [n_images, n_tokens]."""
    labels = getattr(token_labels, "labels", token_labels)
    valid = getattr(token_labels, "valid", None)
    ignore = getattr(token_labels, "ignore_index", None if context is None else context.ignore_index)
    if valid is None:
        valid = labels != (255 if ignore is None else ignore)
    if tokens is None:
        selected = torch.ones_like(valid, dtype=torch.bool)
    else:
        if isinstance(tokens, TokenGroup):
            if context is None:
                context = GroupContext(token_labels=labels, model=model, ignore_index=255 if ignore is None else ignore)
            mask = tokens.resolve(inputs, context)
        else:
            mask = torch.as_tensor(tokens, dtype=torch.bool).cpu()
            if mask.shape != inputs.input_ids.shape:
                raise ValueError(f"tokens mask must be [batch, seq] = {tuple(inputs.input_ids.shape)}, got {tuple(mask.shape)}")
        selected = inputs.layout.by_image(mask)
    return ProbeMetric(model, probe, hook, labels, valid.cpu() & selected, inputs, kind)


class LogitDifference:
    """logit[answer] - logit[wrong] at one position per row (default: the last token)."""

    hooks: tuple[str, ...] = ()

    def __init__(self, answer: int | Tensor, wrong: int | Tensor, position: TokenGroup | None = None):
        self.answer, self.wrong = torch.as_tensor(answer), torch.as_tensor(wrong)
        self.position = position or TokenGroup.last()
        self.name = "logit difference"

    def __call__(self, activations: Mapping[str, Tensor], inputs: MultimodalInputs) -> Float[Tensor, "batch"]:
        logits = activations["logits"]
        where = self.position.resolve(inputs)
        if not (where.sum(1) == 1).all():
            raise ValueError(f"the position group {self.position.description} must pick exactly one token per row; "
                             f"it picks {where.sum(1).tolist()}")
        rows = torch.arange(len(inputs), device=logits.device)
        # float32: a difference of two half-precision logits keeps 8 bits at best
        at = logits[rows, where.long().argmax(1).to(logits.device)].float()
        answer = self.answer.to(logits.device).expand(len(inputs))
        wrong = self.wrong.to(logits.device).expand(len(inputs))
        return at[rows, answer] - at[rows, wrong]


def logit_difference(answer: int | Tensor, wrong: int | Tensor, position: TokenGroup | None = None) -> LogitDifference:
    """Output-based metric: answer minus wrong token logit (ids, one or one per row) at `position`."""
    return LogitDifference(answer, wrong, position)
