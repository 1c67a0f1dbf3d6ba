"""The logit lens drawn over the image: what each LLM layer's residual at each image token decodes to.

The logit lens (nostalgebraist 2020; Belrose et al. 2023, https://arxiv.org/abs/2303.08112) reads a
residual through the final norm and the unembedding. At image tokens it shows, per layer, which
word each cell of the image already stands for (Neo et al. 2024, "Towards interpreting visual
information processing in VLMs", https://arxiv.org/abs/2410.07149). mmlens's cache computes the
accumulated residual with the final norm applied (`MultimodalActivationCache.accumulated_resid`,
the same entries as `logit_lens`); only the image tokens (`layout.gather("llm", ...)`) are
unembedded, so the vocabulary-wide logits of text positions are never built. Given a trained
`TunedLens` (`mmlens.sae.tuned_lens`), each layer's residual passes through its translator before
the same final norm and unembedding, and the maps are the tuned lens's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import InputError
from ..model.hook_names import parse_hook_name
from ..model.images.layout import TokenTable
from ..model.images.pixel_map import PixelMap
from .maps import check_grid_tokens, paint_values

if TYPE_CHECKING:
    from ..model import HookedMLLM, MultimodalInputs
    from ..model.cache import MultimodalActivationCache
    from .tuned_lens import TunedLens


@dataclass(frozen=True, eq=False)
class LensMaps:
    """Per lens entry (`labels`: "0_pre" ... "final_post", the residual entering each layer and
    the last one leaving), image and image token (`layout.gather("llm")` rows): the top token, its
    probability, and with `token` given the probability of that token."""

    labels: list[str]
    top_token: Int[Tensor, "layers n_images n_tokens"]
    top_probability: Float[Tensor, "layers n_images n_tokens"]
    token: int | None
    token_probability: Float[Tensor, "layers n_images n_tokens"] | None
    table: TokenTable
    pixels: PixelMap
    lens: str = "logit lens"  # or "tuned lens": which lens read the residuals

    def painted(self, values: Tensor) -> Float[Tensor, "layers n_images height width"]:
        """Per-token values [layers, n_images, n_tokens] over every canvas pixel (NaN: no token)."""
        return paint_values(self.pixels, values)

    def figure(self, image: int = 0, tokenizer: Any = None, picture: np.ndarray | None = None):
        """One panel per lens entry for image `image`: the probability of `token` per cell (when
        given) or of each cell's top token, hovering the top token (decoded with `tokenizer`)."""
        from ..viz.sae_plots import plot_lens_maps

        if not 0 <= image < self.top_token.shape[1]:
            raise IndexError(f"image must be in 0..{self.top_token.shape[1] - 1}, got {image}")
        height, width = (int(v) for v in self.table.canvas[image])
        values = self.top_probability if self.token_probability is None else self.token_probability
        painted = self.painted(values)[:, image, :height, :width].numpy()
        tokens = self.painted(self.top_token)[:, image, :height, :width].numpy()
        words = _words(tokens, tokenizer)
        what = "top token" if self.token is None else f"token {self.token}"
        return plot_lens_maps(dict(zip(self.labels, painted)), dict(zip(self.labels, words)), picture,
                              title=f"{self.lens.capitalize()} over image {image}: probability of the {what}")


def llm_residual(name: str) -> bool:
    """The names filter of a lens's forward: the LLM's `hook_resid_pre` / `hook_resid_post` only."""
    hook = parse_hook_name(name)
    return hook.stage == "llm" and hook.point in ("hook_resid_pre", "hook_resid_post")


def lens_stack(model: "HookedMLLM", inputs: "MultimodalInputs", lens: "TunedLens | None" = None
               ) -> tuple["MultimodalActivationCache", Float[Tensor, "entries batch seq d_model"], list[str]]:
    """(cache, stack, labels): every accumulated LLM residual ("0_pre" ... "final_post"), through
    `lens`'s translators when given, then the final norm recomputed per entry (`accumulated_resid`'s
    own `apply_ln=True` step), ready for `model.unembed`."""
    _, cache = model.run_with_cache(inputs, names_filter=llm_residual)
    stack, labels = cache.accumulated_resid(return_labels=True)
    if lens is not None:
        stack = lens(stack)
    return cache, cache.apply_ln_to_stack(stack, recompute_ln=True, has_batch_dim=cache.has_batch_dim), list(labels)


@torch.no_grad()
def logit_lens_maps(model: "HookedMLLM", inputs: "MultimodalInputs", token: int | None = None,
                    lens: "TunedLens | None" = None) -> LensMaps:
    """The logit lens at every LLM layer over every image's grid tokens, from one cached forward;
    with `lens` (a trained `TunedLens`), the tuned lens: each residual through its layer's translator."""
    if token is not None and not 0 <= token < model.cfg.d_vocab:
        raise InputError(f"token {token} is not in the vocabulary (0..{model.cfg.d_vocab - 1})")
    if lens is not None:
        lens.check_model(model)
    layout = inputs.layout
    check_grid_tokens(layout, "llm")
    _, stack, labels = lens_stack(model, inputs, lens)
    at_images = torch.stack([layout.gather("llm", entry) for entry in stack])
    probabilities = model.unembed(at_images).float().softmax(-1)
    top_probability, top_token = probabilities.max(-1)
    chosen = None if token is None else probabilities[..., token].cpu()
    return LensMaps(labels, top_token.cpu(), top_probability.cpu(), token, chosen, layout.table("llm"),
                    layout.pixels("llm"), "logit lens" if lens is None else "tuned lens")


def _words(tokens: np.ndarray, tokenizer: Any) -> np.ndarray:
    ids = np.nan_to_num(tokens, nan=-1).astype(int)
    if tokenizer is None:
        return np.where(ids >= 0, ids.astype(str), "")
    vocabulary = {i: tokenizer.decode([i]) for i in np.unique(ids) if i >= 0}
    return np.vectorize(lambda i: vocabulary.get(i, ""), otypes=[object])(ids)
