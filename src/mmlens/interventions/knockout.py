"""Attention knockout: block the edges query -> key between two token groups in chosen layers.

Blocked pre-softmax scores are set to -inf, so the blocked attention is exactly zero. A query
always keeps its edge to itself (and, in the LLM, every key outside `keys`), so no attention row
is ever emptied: an empty row would be a softmax over nothing (NaN). With `verify=True` the
attention left on blocked edges is measured in the same forward pass, per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from jaxtyping import Bool
from torch import Tensor

from ..errors import InputError
from ..model import HookedMLLM, MultimodalInputs
from ..model.edits import HookSet
from ..model.hook_names import block_hook, parse_hook_name
from .groups import GroupContext, TokenGroup
from .selection import attention_layers, chosen_indices


class Knockout(HookSet):
    """Hooks that block `queries` -> `keys` attention; use `with`, or pass `hooks` to
    `run_with_hooks`. After a verified run, `blocked_mass[layer]` is the largest attention
    probability left on a blocked edge (0 when the knockout took effect)."""

    def __init__(self, model: HookedMLLM, inputs: MultimodalInputs, queries: TokenGroup, keys: TokenGroup,
                 layers: Iterable[int], heads: Iterable[int] | None = None,
                 stage: Literal["llm", "vision"] = "llm", verify: bool = False,
                 context: GroupContext | None = None, allow_empty: bool = False):
        if stage not in ("llm", "vision"):
            raise ValueError(f"stage must be 'llm' or 'vision', got {stage!r}")
        n_layers = model.cfg.n_layers if stage == "llm" else model.cfg.vision.n_layers
        if layers is None:
            raise InputError("knockout needs the layers to edit: pass layers=range(model.cfg.n_layers) for all")
        self.layers = (attention_layers(layers, model.cfg.llm, "a knockout") if stage == "llm"
                       else chosen_indices(layers, n_layers, "layers", f"the {stage} stage"))
        self.model, self.inputs, self.stage, self.verify = model, inputs, stage, verify
        n_heads = model.cfg.n_heads if stage == "llm" else model.cfg.vision.n_heads
        self.heads = None if heads is None else torch.as_tensor(
            chosen_indices(heads, n_heads, "heads", f"the {stage} stage", " (heads=None edits every head)"), dtype=torch.long)
        q = queries.resolve(inputs, context)
        k = keys.resolve(inputs, context)
        if stage == "vision":
            q, k = inputs.layout.scatter_vision(q), inputs.layout.scatter_vision(k)
        edges = q[:, :, None] & k[:, None, :]
        diagonal = torch.eye(edges.shape[-1], dtype=torch.bool)
        self.blocked: Bool[Tensor, "batch query key"] = (edges & ~diagonal).to(model.cfg.device)
        if not allow_empty and not self.n_blocked_edges:
            raise InputError(
                f"this knockout blocks no edge: the queries select {int(q.sum())} tokens and the keys {int(k.sum())}, "
                f"and of their {int(self.blocked.sum())} edges none is open in the model's own attention (a token's "
                "edge to itself is never blocked; a causal model never reads later keys), so running it would change "
                "nothing. Check the groups, or pass allow_empty=True where an empty group is expected (an image "
                "without anchors, say)"
            )
        self.blocked_mass: dict[int, float] = {}
        self.hooks = [(block_hook(l, "attn.hook_attn_scores", stage), self._block) for l in self.layers]
        if verify:
            self.hooks += [(block_hook(l, "attn.hook_pattern", stage), self._measure) for l in self.layers]

    def _edges(self, scores: Tensor) -> Tensor:
        if scores.shape[0] != self.blocked.shape[0]:
            raise ValueError(f"this knockout was resolved on a batch of {self.blocked.shape[0]} but the attention has "
                             f"{scores.shape[0]} rows; build the knockout from the inputs you run")
        edges = self._window(*scores.shape[-2:])[:, None]  # [batch, 1, q, k]: broadcast over heads, no copy
        if self.heads is not None:
            chosen = torch.zeros(scores.shape[1], dtype=torch.bool)
            chosen[self.heads] = True
            edges = edges & chosen.to(edges.device)[None, :, None, None]
        return edges

    def _window(self, q_len: int, k_len: int) -> Tensor:
        """The blocked edges for scores of q_len queries over k_len keys. During cached decoding
        (`model.generate`) the new positions are neither queries nor keys of the groups, which
        were resolved on the prompt: their edges stay open."""
        n = self.blocked.shape[-1]
        if (q_len, k_len) == (n, n):
            return self.blocked
        if k_len - q_len < n:  # not new positions appended to the prompt: other inputs
            raise ValueError(
                f"this knockout was resolved on inputs of {n} positions but the attention has {q_len} queries "
                f"over {k_len} keys; build the knockout from the inputs you run"
            )
        grown = torch.zeros(self.blocked.shape[0], k_len, k_len, dtype=torch.bool, device=self.blocked.device)
        grown[:, :n, :n] = self.blocked
        return grown[:, k_len - q_len :]

    def _block(self, scores: Tensor, hook) -> Tensor:
        return scores.masked_fill(self._edges(scores), float("-inf"))

    def _measure(self, pattern: Tensor, hook) -> None:
        if torch.isnan(pattern).any():
            raise RuntimeError(f"{hook.name}: NaN attention after the knockout")
        left = pattern.detach().masked_fill(~self._edges(pattern), 0)  # cheaper than masked_select on big batches
        layer = parse_hook_name(hook.name).layer
        mass = float(left.abs().amax())
        self.blocked_mass[layer] = max(mass, self.blocked_mass.get(layer, 0.0))  # every forward of a generation

    def effective_mask(self, head: int | None = None) -> Bool[Tensor, "batch query key"]:
        """True where a query may read a key in the edited layers: the model's own mask (causal
        or bidirectional image attention, padding) without the blocked edges. In the vision stage
        a patch sees the patches of its own image (in a packed sequence, a block per image; the
        windows of Qwen2.5-VL's windowed blocks are not drawn), and a row's CLS and registers see
        all of it. With `heads`, `head` picks one head (an unedited head shows the model's own
        mask)."""
        own = self._own_edges()
        if head is not None and self.heads is not None and head not in self.heads.tolist():
            return own
        return own & ~self.blocked

    def _own_edges(self) -> Bool[Tensor, "batch query key"]:
        """Where the unedited model lets a query read a key (see `effective_mask`)."""
        if self.stage == "vision":
            image = self.inputs.layout.image_of_patch().to(self.blocked.device)
            query, key = image[:, :, None], image[:, None, :]
            return (query == key) | (query < 0) | (key < 0)
        return self.model.attention_edges(self.inputs).to(self.blocked.device)

    @property
    def n_blocked_edges(self) -> int:
        """Query -> key edges the model's own mask leaves open and this knockout closes, summed over
        the batch (in each edited layer and head); edges the model never attends are not counted."""
        return int((self.blocked & self._own_edges()).sum())


def knockout(model: HookedMLLM, inputs: MultimodalInputs, *, queries: TokenGroup, keys: TokenGroup,
             layers: Iterable[int], heads: Iterable[int] | None = None,
             stage: Literal["llm", "vision"] = "llm", verify: bool = False,
             context: GroupContext | None = None, allow_empty: bool = False) -> Knockout:
    """Block attention from `queries` to `keys` in `layers` (all heads unless `heads`). Empty
    `layers` or `heads`, or a knockout that closes no edge the model leaves open, is an error
    unless `allow_empty` (for the groups): it would silently change nothing."""
    return Knockout(model, inputs, queries, keys, layers, heads, stage, verify, context, allow_empty)

