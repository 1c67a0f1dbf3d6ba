"""Image-token activations streamed from the model, as an SAE trains on them.

One forward pass per batch of images gathers a hook point's activation at the chosen tokens, image
by image, through the layout (`ImageTokenLayout.gather`, as the probe sweep's sites read them):
vision points at the patches feeding the chosen tokens, adapter and LLM points at the LLM's grid
tokens. A `TokenGroup` (default: every image token) chooses them, and from a segmentation dataset
each token also gets its class from its pixel box (`probing.labelled_batches`), so features can be
compared with class masks. Rows keep their image, so a split by image stays a split by image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..data.schema import IGNORE_INDEX
from ..errors import InputError
from ..interventions.groups import GroupContext, TokenGroup
from ..model import HookedMLLM, ImageTokenLayout, MultimodalInputs
from ..probing.batches import labelled_batches
from ..probing.sites import Site, gather_image_tokens, site_for, site_layout


@dataclass(frozen=True)
class TokenActivations:
    """A hook point's activation at the chosen image tokens of some images, image by image."""

    activations: Float[Tensor, "n_tokens d"]
    image: Int[Tensor, " n_tokens"]  # which image (0.. in the order given) each row comes from
    cell: Int[Tensor, " n_tokens"]  # the row's place among its image's grid tokens (`layout.gather` order)
    labels: Int[Tensor, " n_tokens"] | None  # class of the token's pixel box (`ignore_index` where unlabelled)
    hook_name: str
    n_images: int
    ignore_index: int = IGNORE_INDEX

    def of_images(self, images: Tensor | Sequence[int]) -> "TokenActivations":
        """The rows of these images only (renumbered 0.. in the order given)."""
        wanted = torch.as_tensor(list(images) if not isinstance(images, Tensor) else images, dtype=torch.long)
        renumber = torch.full((self.n_images,), -1, dtype=torch.long)
        renumber[wanted] = torch.arange(len(wanted))
        keep = renumber[self.image] >= 0
        return TokenActivations(self.activations[keep], renumber[self.image[keep]], self.cell[keep],
                                None if self.labels is None else self.labels[keep], self.hook_name, len(wanted),
                                self.ignore_index)


def chosen_image_tokens(site: Site, layout: ImageTokenLayout, selected: Bool[Tensor, "batch seq"]) -> Bool[Tensor, "n_images n_tokens"]:
    """A [batch, seq] token selection as a selection of the site's gathered rows: the tokens
    themselves at LLM and adapter sites, the patches feeding them at vision sites (on the site's
    own tower's grid where the family has two)."""
    return site_layout(site, layout).gather(site.stage, image_token_positions(site, layout, selected))


def image_token_positions(site: Site, layout: ImageTokenLayout,
                          selected: Bool[Tensor, "batch seq"] | None = None) -> Bool[Tensor, "..."]:
    """Where the chosen tokens (default every image token) sit in the site's activation (its
    leading dims): the LLM's positions, the adapter's rows, or the vision patches feeding them
    (those of the site's own tower: SAM's at `vision.high_res.*`)."""
    selected = layout.image_token_mask() if selected is None else selected.cpu()
    if site.stage == "vision":
        return site_layout(site, layout).scatter_vision(selected)
    return layout.scatter_adapter(selected) if site.stage == "adapter" else selected


def image_token_activations(
    model: HookedMLLM,
    images_or_scenes: Any,
    hook_name: str,
    *,
    tokens: TokenGroup | None = None,
    prompt: str = "",
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> TokenActivations:
    """`hook_name`'s activation at the chosen tokens (`tokens`, default every image token) of
    every image: a list of images, or an mmlens segmentation dataset (then each token's class too).
    Activations are kept in float32 on `device`."""
    site = site_for(model, hook_name)
    group = tokens or TokenGroup.image()
    rows, images, cells, labels = [], [], [], []
    seen, ignore = 0, IGNORE_INDEX
    for inputs, token_classes, llm_classes, ignore in image_batches(model, images_or_scenes, site, prompt, batch_size):
        captured: dict[str, Tensor] = {}

        def keep(activation: Tensor, hook) -> None:
            captured["x"] = gather_image_tokens(site, activation, inputs.layout)

        model.run_with_hooks(inputs, fwd_hooks=[(site.hook, keep)], return_type=None)
        context = GroupContext(token_labels=llm_classes, model=model, ignore_index=ignore)  # for TokenGroup.of_class
        chosen = chosen_image_tokens(site, inputs.layout, group.resolve(inputs, context))
        chosen &= site_layout(site, inputs.layout).table(site.stage).present.cpu()
        x = captured["x"].detach().float()
        if not torch.isfinite(x).all():
            raise InputError(f"NaN or inf activations at {site.hook}: the model overflows or its inputs hold NaN "
                             "(run in float32 or bfloat16 and check pixel_values); an SAE cannot train on them")
        image, cell = chosen.nonzero(as_tuple=True)
        rows.append(x[image.to(x.device), cell.to(x.device)].to(device))
        images.append(image + seen)
        cells.append(cell)
        if token_classes is not None:
            labels.append(token_classes[image, cell])
        seen += len(x)
    if not rows:
        raise InputError("no images given: pass a list of images or a segmentation dataset with rows")
    activations = torch.cat(rows)
    if not len(activations):
        raise InputError(f"the token group {group.description!r} chose no image token at {site.hook}; choose "
                         "image tokens (TokenGroup.image() or a part of it)")
    return TokenActivations(activations, torch.cat(images), torch.cat(cells), torch.cat(labels) if labels else None,
                            site.hook, seen, ignore)


def image_batches(model: HookedMLLM, source: Any, site: Site, prompt: str,
             batch_size: int) -> Iterator[tuple[MultimodalInputs, Tensor | None, Tensor | None, int]]:
    """(inputs, the site grid's token classes, the LLM grid's, ignore index) per batch of images
    (None for unlabelled images)."""
    if hasattr(source, "features") and "mask" in getattr(source, "column_names", ()):
        for batch in labelled_batches(model, source, range(len(source)), batch_size=batch_size, prompt=prompt):
            token_labels = batch.labels[site.grid]
            yield batch.inputs, token_labels.labels, batch.labels["llm"].labels, token_labels.ignore_index
        return
    images = list(source)
    for start in range(0, len(images), batch_size):
        yield model.prepare(images[start:start + batch_size], prompt), None, None, IGNORE_INDEX
