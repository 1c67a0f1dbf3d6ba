"""Ready-made corrupted runs for the recovery study, each a `Run` to patch clean activations into.

Recovery blocked: image tokens cannot attend to other image tokens in a window of LLM layers
(a verified knockout), so whatever cross-token refinement happens there is gone. Anchors
removed: the adapter output of anchor tokens is replaced by the mean adapter output or by the
same grid cell of another image (resampling), so no correct anchor reaches the LLM. Counterfactual
images: another scene through the same prompt, hence the same layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import InputError
from ..model import HookedMLLM, MultimodalInputs
from .groups import GroupContext, TokenGroup
from .knockout import knockout
from .patching import Run, check_same_layout
from .selection import attention_layers

ADAPTER_OUT = "adapter.hook_out"


def recovery_blocked(model: HookedMLLM, inputs: MultimodalInputs, layers: Iterable[int] | None = None,
                     *, verify: bool = True) -> Run:
    """Image -> image attention knocked out in `layers` (default every LLM layer); each query
    keeps itself. With `verify`, every forward of the batch itself (the corrupted baseline,
    attribution patching) checks that no attention is left on a blocked edge; the repeated
    batches of batched patching block the same edges, built the same way, unmeasured (measuring
    costs more than the forward at 32 rows)."""
    n_layers = model.cfg.n_layers
    window = list(range(n_layers)) if layers is None else sorted(set(layers))
    bad = [l for l in window if not 0 <= l < n_layers]
    if not window or bad:
        raise ValueError(f"layers must be a non-empty subset of 0..{n_layers - 1}, got {window}")
    attention_layers(None if layers is None else window, model.cfg.llm, "recovery_blocked (an image -> image knockout)")  # refused here, not per run
    image = TokenGroup.image()

    def edit(batch: MultimodalInputs):
        return knockout(model, batch, queries=image, keys=image, layers=window,
                        verify=verify and len(batch) == len(inputs))
    return Run(inputs, edit, name=f"recovery blocked (image -> image, layers {window[0]}-{window[-1]})")


@torch.no_grad()
def mean_adapter_output(model: HookedMLLM, batches: Iterable[MultimodalInputs]) -> Float[Tensor, "d_model"]:
    """The adapter output averaged over every image token of the given batches (CLS excluded)."""
    total, count = None, 0
    for inputs in batches:
        _, cache = model.run_with_cache(inputs, names_filter=ADAPTER_OUT, return_cache_object=False)
        tokens = inputs.layout.gather("adapter", cache[ADAPTER_OUT]).float()
        present = inputs.layout.table("adapter").present
        if not present.all():  # images with fewer tokens end in padding rows: leave them out
            tokens = tokens[present.to(tokens.device)][None]
        total = tokens.sum((0, 1)) if total is None else total + tokens.sum((0, 1))
        count += tokens.shape[0] * tokens.shape[1]
    if not count:
        raise ValueError("mean_adapter_output needs at least one batch of images")
    return (total / count).to(model.cfg.dtype)


def anchors_removed(
    model: HookedMLLM,
    inputs: MultimodalInputs,
    anchors: TokenGroup | Bool[Tensor, "batch seq"],
    *,
    replacement: Literal["mean", "resample"] = "mean",
    mean: Float[Tensor, "d_model"] | None = None,
    context: GroupContext | None = None,
    seed: int = 0,
) -> Run:
    """The adapter output of the anchor tokens replaced, before the LLM sees them: by `mean`
    (`mean_adapter_output` over a dataset) or, with "resample", by the same grid cell of another
    image of the batch (a seeded derangement of the images)."""
    mask = anchors.resolve(inputs, context) if isinstance(anchors, TokenGroup) else torch.as_tensor(anchors, dtype=torch.bool)
    if mask.shape != inputs.input_ids.shape:
        raise ValueError(f"anchors must be [batch, seq] = {tuple(inputs.input_ids.shape)}, got {tuple(mask.shape)}")
    n_images = inputs.layout.n_images
    chosen = inputs.layout.scatter_adapter(mask.cpu()).to(model.cfg.device)
    if replacement == "mean":
        if mean is None:
            raise ValueError("replacement='mean' needs mean= (e.g. mean_adapter_output(model, batches))")
        if mean.shape != (model.cfg.d_model,):
            raise ValueError(f"mean must be a [d_model] = ({model.cfg.d_model},) vector, got {tuple(mean.shape)}")
        mean = mean.to(model.cfg.device, model.cfg.dtype)
    elif replacement == "resample":
        if n_images < 2:
            raise ValueError("replacement='resample' takes tokens from other images of the batch: use at least 2 images")
        if not inputs.layout.uniform or inputs.layout.adapter_shape[0] != n_images:
            raise InputError("replacement='resample' takes the same grid cell from another image, so every image must "
                             "have the same grid (one adapter row per image); these images are tiled or differ: "
                             "use replacement='mean'")
        donors = derangement(n_images, seed)
    else:
        raise ValueError(f"replacement must be 'mean' or 'resample', got {replacement!r}")

    def edit(batch: MultimodalInputs):
        k = batch.layout.n_images // n_images  # patching runs the batch repeated k times
        where = chosen.repeat(k, 1)[..., None]

        def replace_anchors(activation: Tensor, hook) -> Tensor:
            if replacement == "mean":
                return torch.where(where, mean, activation)
            offsets = torch.arange(k).repeat_interleave(n_images) * n_images
            return torch.where(where, activation[donors.repeat(k) + offsets], activation)
        return [(ADAPTER_OUT, replace_anchors)]
    return Run(inputs, edit, name=f"anchors removed ({replacement})")


def counterfactual_images(model: HookedMLLM, inputs: MultimodalInputs, images: Sequence) -> Run:
    """The same prompts with other images (one per image of `inputs`); the layouts must match."""
    if len(images) != inputs.layout.n_images:
        raise ValueError(f"give one counterfactual image per image: {inputs.layout.n_images} expected, got {len(images)}")
    per_row = [[images[s.image_index] for s in row] for row in inputs.layout.images]
    if not inputs.prompts:
        raise ValueError("these inputs carry no prompts; build them with model.prepare(images, prompt)")
    other = model.prepare(per_row, list(inputs.prompts))
    check_same_layout(inputs, other)
    return Run(other, name="counterfactual images")


def derangement(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded permutation of 0..n-1 that moves every index (n >= 2)."""
    generator = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(1, n, (1,), generator=generator))
    order = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(shift)  # each element goes to another position in the cycle
    return out
