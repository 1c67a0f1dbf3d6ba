"""Token groups: composable selectors of sequence positions, resolved per batch row.

A `TokenGroup` describes tokens by role (image, text, BOS, last), by place on the image grid
(a box of cells, neighbours of another group), by ground-truth class, by whether a linear probe
classifies them correctly at a layer, or as a seeded random subset matched in size to another
group (seeded per batch row when it must not depend on how the images are batched); `|`, `&`
and `-` combine them. Resolution goes through the inputs' `ImageTokenLayout`, so padding and
several images per row are handled once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..errors import InputError
from ..model import HookedMLLM, MultimodalInputs
from ..model.images.layout import CrossAttendedLayout
from ..probing.linear import LinearProbe
from ..probing.predict import predict_image_tokens
from ..probing.sites import site_for

Resolver = Callable[[MultimodalInputs, "GroupContext"], Tensor]


@dataclass
class GroupContext:
    """Extra facts some groups need.

    `token_labels`: per image (in `pixel_values` order) the class of each LLM grid token, with
    the ignore index where a token has no label (`mmlens.probing.token_labels(...).labels`).
    `model` and `activations`: probe groups read the probed site from `activations` (a cache or
    a dict of hook name -> activation of these inputs); missing sites are computed with one
    clean forward of `model` and kept there, so groups resolved on the same inputs share it.
    """

    token_labels: Int[Tensor, "n_images n_tokens"] | None = None
    model: HookedMLLM | None = None
    activations: dict[str, Tensor] = field(default_factory=dict)
    ignore_index: int = 255


class TokenGroup:
    """A named set of token positions, resolved per input into a [batch, seq] mask (`resolve`)."""

    def __init__(self, resolver: Resolver, description: str):
        self._resolver = resolver
        self.description = description

    def __repr__(self) -> str:
        return f"TokenGroup({self.description})"

    def resolve(self, inputs: MultimodalInputs, context: GroupContext | None = None) -> Bool[Tensor, "batch seq"]:
        mask = self._resolver(inputs, context or GroupContext())
        return mask.to(torch.bool) & inputs.attention_mask.bool().cpu()

    def __or__(self, other: "TokenGroup") -> "TokenGroup":
        return TokenGroup(lambda i, c: self.resolve(i, c) | other.resolve(i, c), f"{self.description} | {other.description}")

    def __and__(self, other: "TokenGroup") -> "TokenGroup":
        return TokenGroup(lambda i, c: self.resolve(i, c) & other.resolve(i, c), f"{self.description} & {other.description}")

    def __sub__(self, other: "TokenGroup") -> "TokenGroup":
        return TokenGroup(lambda i, c: self.resolve(i, c) & ~other.resolve(i, c), f"{self.description} - {other.description}")

    # ----------------------------------------------------------------- constructors
    @staticmethod
    def image() -> "TokenGroup":
        return TokenGroup(lambda i, c: i.layout.image_token_mask(), "image")

    @staticmethod
    def text() -> "TokenGroup":
        def resolve(i, c):
            return i.attention_mask.bool().cpu() & ~(i.input_ids.cpu() == _image_id(i))
        return TokenGroup(resolve, "text")

    @staticmethod
    def bos() -> "TokenGroup":
        def resolve(i, c):
            mask = torch.zeros(i.input_ids.shape, dtype=torch.bool)
            first = i.attention_mask.cpu().long().argmax(dim=1)  # first non-padding position
            mask[torch.arange(len(first)), first] = True
            return mask
        return TokenGroup(resolve, "bos")

    @staticmethod
    def last() -> "TokenGroup":
        def resolve(i, c):
            mask = torch.zeros(i.input_ids.shape, dtype=torch.bool)
            valid = i.attention_mask.cpu().bool()
            last = valid.shape[1] - 1 - valid.flip(1).long().argmax(dim=1)
            mask[torch.arange(len(last)), last] = True
            return mask
        return TokenGroup(resolve, "last")

    @staticmethod
    def positions(positions: list[int] | Tensor) -> "TokenGroup":
        def resolve(i, c):
            mask = torch.zeros(i.input_ids.shape, dtype=torch.bool)
            mask[:, torch.as_tensor(positions)] = True
            return mask
        return TokenGroup(resolve, f"positions {list(map(int, positions))[:6]}")

    @staticmethod
    def from_mask(mask: Bool[Tensor, "batch seq"], description: str = "explicit mask") -> "TokenGroup":
        """Exactly the positions marked in a [batch, seq] mask (e.g. a group resolved earlier)."""
        fixed = torch.as_tensor(mask, dtype=torch.bool).cpu()

        def resolve(i, c):
            if fixed.shape != i.input_ids.shape:
                raise InputError(f"the mask has shape {tuple(fixed.shape)} but the inputs are "
                                 f"{tuple(i.input_ids.shape)}; build it on the inputs it is resolved on")
            return fixed
        return TokenGroup(resolve, description)

    @staticmethod
    def box(row0: int, col0: int, row1: int, col1: int) -> "TokenGroup":
        """Image tokens whose grid cell (in its own segment's grid) is in rows row0..row1-1 and
        columns col0..col1-1."""
        def pick(cells: Tensor) -> Tensor:
            return (cells[:, 0] >= row0) & (cells[:, 0] < row1) & (cells[:, 1] >= col0) & (cells[:, 1] < col1)
        return TokenGroup(lambda i, c: _per_token(i, lambda k: pick(_cells(i, k))), f"box rows {row0}:{row1} cols {col0}:{col1}")

    @staticmethod
    def of_class(*class_indices: int) -> "TokenGroup":
        """Image tokens whose ground-truth label (in `GroupContext.token_labels`) is one of the classes."""
        if not class_indices:
            raise InputError("TokenGroup.of_class needs at least one class index")
        wanted = torch.tensor([int(c) for c in class_indices])

        def resolve(i, c):
            if c.token_labels is None:
                raise InputError("TokenGroup.of_class needs GroupContext(token_labels=...) from "
                                 "mmlens.probing.token_labels")
            return _per_token(i, lambda k: torch.isin(c.token_labels[k].cpu(), wanted))
        return TokenGroup(resolve, f"class {'|'.join(map(str, wanted.tolist()))}")

    @staticmethod
    def probe_correct(probe: "LinearProbe", hook: str) -> "TokenGroup":
        """Labelled image tokens that `probe`, read at `hook` on the unedited model, classifies
        correctly (the study's "semantic anchors" when restricted to some classes)."""
        return TokenGroup(lambda i, c: _probe_hits(i, c, probe, hook, correct=True), f"probe correct at {hook}")

    @staticmethod
    def probe_wrong(probe: "LinearProbe", hook: str) -> "TokenGroup":
        """Labelled image tokens that `probe` at `hook` classifies wrongly (unlabelled tokens
        are in neither group)."""
        return TokenGroup(lambda i, c: _probe_hits(i, c, probe, hook, correct=False), f"probe wrong at {hook}")

    @staticmethod
    def neighbours(group: "TokenGroup", radius: int = 1) -> "TokenGroup":
        """Image tokens within Chebyshev distance `radius` on the grid of a token of `group`
        in the same image and segment (the group's own tokens excluded)."""
        def resolve(i, c):
            inner = group.resolve(i, c)

            def around(k):
                span = i.layout.spans[k]
                cells, segment = _cells(i, k), _segments(i, k)
                near = ((cells[:, None, :] - cells[None, :, :]).abs().amax(-1) <= radius) \
                    & (segment[:, None] == segment[None, :])
                member = inner[span.row, span.positions]
                return (near[:, member].any(1)) & ~member
            return _per_token(i, around)
        return TokenGroup(resolve, f"neighbours({group.description}, r={radius})")

    @staticmethod
    def random_like(group: "TokenGroup", *, within: "TokenGroup | None" = None,
                    seed: int | Sequence[int] = 0) -> "TokenGroup":
        """Per row, a seeded random set of tokens from `within` (default: image tokens outside
        `group`) of the same size as `group` in that row.

        `seed`: one int, whose generator draws the rows in turn (a row's draw then depends on the
        rows before it), or one int per batch row, each row drawn from its own seed alone, so a
        row's tokens stay the same whatever batch it is put in (seed it from its image, not from
        its place in the batch)."""
        pool_group = within if within is not None else TokenGroup.image() - group
        per_row = not isinstance(seed, (int, np.integer))
        seeds = [int(s) for s in seed] if per_row else [int(seed)]

        def resolve(i, c):
            target, pool = group.resolve(i, c), pool_group.resolve(i, c)
            if per_row and len(seeds) != target.shape[0]:
                raise InputError(f"random_like got {len(seeds)} per-row seeds for a batch of {target.shape[0]} rows; "
                                 "pass one seed per batch row (or a single int)")
            generator = torch.Generator().manual_seed(seeds[0])
            out = torch.zeros_like(target)
            for row in range(target.shape[0]):
                if per_row:
                    generator = torch.Generator().manual_seed(seeds[row])
                candidates = pool[row].nonzero().flatten()
                n = int(target[row].sum())
                if n > len(candidates):
                    raise InputError(f"row {row}: cannot draw {n} random tokens from a pool of {len(candidates)}; "
                                     "widen `within` or draw fewer tokens")
                out[row, candidates[torch.randperm(len(candidates), generator=generator)[:n]]] = True
            return out
        shown = f"seeds per row {seeds[:4]}{'...' if len(seeds) > 4 else ''}" if per_row else f"seed={seeds[0]}"
        return TokenGroup(resolve, f"random_like({group.description}, {shown})")


def probe_predictions(
    inputs: MultimodalInputs, context: GroupContext, probe: "LinearProbe", hook: str
) -> Int[Tensor, "n_images n_tokens"]:
    """The probe's class for every LLM grid token of every image, read at `hook` on a clean run."""
    model = context.model
    if model is None:
        raise InputError("probe groups need GroupContext(model=...) to read activations")
    name = model.resolve_hook_name(hook)
    if name not in context.activations:
        _, cache = model.run_with_cache(inputs, names_filter=name, return_cache_object=False)
        context.activations[name] = cache[name]
    site = site_for(model, name)
    layout = inputs.layout
    if site.grid == "vision" and not layout.vision_aligned:
        raise InputError(
            f"{name} is read on the vision patches, which do not map one to one onto the LLM's image tokens "
            "in this model; probe groups need a site on the LLM grid (adapter or LLM)"
        )
    return predict_image_tokens(model, inputs, {name: probe}, activations=context.activations)[name]


def _probe_hits(inputs, context, probe, hook, correct: bool) -> Tensor:
    if context.token_labels is None:
        raise InputError("probe groups need GroupContext(token_labels=...) from mmlens.probing.token_labels")
    predicted = probe_predictions(inputs, context, probe, hook)
    labels = context.token_labels.cpu()
    if labels.shape != predicted.shape:
        raise InputError(f"token_labels have shape {tuple(labels.shape)} but the inputs have "
                         f"{tuple(predicted.shape)} (images x grid tokens)")
    labelled = labels != context.ignore_index
    hits = (predicted == labels) if correct else (predicted != labels)
    return _per_token(inputs, lambda k: hits[k] & labelled[k])


def _image_id(inputs: MultimodalInputs) -> int:
    spans = inputs.layout.spans
    if not spans or isinstance(inputs.layout, CrossAttendedLayout):  # images read by cross-attention: all text
        return -1
    # learned queries (a Q-Former's) stand for their image without grid tokens: read the id at the block
    positions = spans[0].positions if len(spans[0].positions) else spans[0].block_positions
    return int(inputs.input_ids[spans[0].row, positions[0]])


def _cells(inputs: MultimodalInputs, k: int) -> Int[Tensor, "n 2"]:
    """Grid cell of every LLM grid token of image `k`, in `span.positions` order."""
    table = inputs.layout.table("llm")
    return table.cells[k][table.present[k]]


def _segments(inputs: MultimodalInputs, k: int) -> Int[Tensor, "n"]:
    table = inputs.layout.table("llm")
    return table.segment[k][table.present[k]]


def _per_token(inputs: MultimodalInputs, select: Callable[[int], Tensor]) -> Tensor:
    """Scatter a per-image selection over grid tokens (`select(image_index)`, in `layout.gather` rows:
    an image with fewer tokens than the longest ends in padding rows, dropped here) into [batch, seq]."""
    mask = torch.zeros(inputs.input_ids.shape, dtype=torch.bool)
    for k, span in enumerate(inputs.layout.spans):
        mask[span.row, span.positions] = select(k).cpu()[: len(span.positions)]
    return mask
