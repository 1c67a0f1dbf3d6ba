"""A view of a HookedMLLM that TransformerLens's own helpers can drive with token ids alone.

`transformer_lens.patching` and similar tools call `model.run_with_hooks(tokens, ...)` with a
`[batch, pos]` id tensor and nothing else, which would drop the images. The view holds one
`MultimodalInputs` and, for ids whose image tokens sit where that batch's do, runs the model on
those ids with that batch's pixels, mask and layout; any other attribute is the model's own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import InputError
from .inputs import MultimodalInputs


class WithImages:
    """`model.with_images(inputs)`: forwards, caches and hooked runs on token ids take the images
    (and attention mask) of `inputs`; e.g. `patching.get_act_patch_resid_pre(model.with_images(
    corrupted), corrupted.input_ids, clean_cache, metric)`."""

    def __init__(self, model: Any, inputs: MultimodalInputs):
        if not isinstance(inputs, MultimodalInputs):
            raise InputError(f"with_images takes the MultimodalInputs whose images to use, got {type(inputs).__name__}")
        self.model, self.inputs = model, inputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def multimodal(self, tokens: Int[Tensor, "batch pos"] | MultimodalInputs) -> MultimodalInputs:
        """`tokens` with this view's images, mask and layout (ids must keep the image tokens in place)."""
        if isinstance(tokens, MultimodalInputs):
            return tokens
        tokens = torch.as_tensor(tokens, device=self.inputs.input_ids.device)
        own = self.inputs.input_ids
        if tokens.shape != own.shape:
            raise InputError(f"ids of shape {tuple(tokens.shape)} do not fit the view's batch {tuple(own.shape)}")
        image_id = self.model.cfg.image_token_id
        if not torch.equal(tokens == image_id, own == image_id):
            raise InputError("these ids put image tokens elsewhere than the view's inputs; the images cannot be matched to them")
        return replace(self.inputs, input_ids=tokens)

    def __call__(self, tokens: Tensor | MultimodalInputs, *args: Any, **kwargs: Any) -> Any:
        return self.model(self.multimodal(tokens), *args, **kwargs)

    def forward(self, tokens: Tensor | MultimodalInputs, *args: Any, **kwargs: Any) -> Any:
        return self(tokens, *args, **kwargs)

    def run_with_hooks(self, tokens: Tensor | MultimodalInputs, *args: Any, **kwargs: Any) -> Any:
        return self.model.run_with_hooks(self.multimodal(tokens), *args, **kwargs)

    def run_with_cache(self, tokens: Tensor | MultimodalInputs, *args: Any, **kwargs: Any) -> Any:
        return self.model.run_with_cache(self.multimodal(tokens), *args, **kwargs)
