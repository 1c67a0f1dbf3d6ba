"""PaliGemma (PaliGemmaForConditionalGeneration): SigLIP tower -> one linear layer -> Gemma LLM.

The projector reads the tower's last hidden state after its post-layernorm, and its outputs
replace the `<image>` placeholders, which the processor puts before the text, one per patch.
Attention is prefix-LM: every token whose `token_type_ids` is 0 (images and prompt) sees every
other such token both ways, generated tokens attend causally. That rule is this family's own
attention mode, "prefix"; "causal" drops it, "bidirectional" keeps only the images' both-ways
attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor, nn

from ...config import AdapterConfig, MLLMConfig, VisionConfig
from ...hook_tree import fire
from ...images.layout import ImageTokenLayout
from ...runtime.attention_masks import allowed_edges
from ...runtime.instrument import _override_forward
from ..llava import Llava
from ..type_ids import type_ids_extended

PREFIX = "token_type_ids"


class PaliGemma(Llava):
    hf_class_names = ("PaliGemmaForConditionalGeneration",)
    vision_towers = ("siglip_vision_model",)
    llms = ("gemma",)
    extra_input_names = (PREFIX,)
    llm_input_names = (PREFIX,)
    attention_modes = ("prefix", "causal", "bidirectional")

    def own_attention_mode(self, hf_model: nn.Module) -> str:
        return "prefix"

    def adapter_config(self, hf_model: nn.Module, vision: VisionConfig) -> AdapterConfig:
        linear = self.projector(hf_model).linear
        return AdapterConfig(
            kind="linear",
            d_in=linear.in_features,
            d_hidden=None,
            d_out=linear.out_features,
            feature_layers=(vision.n_layers,),  # the last block, read after ln_post
            select_strategy="full",
            n_image_tokens=vision.n_patches,
            token_grid=vision.patch_grid,
        )

    @staticmethod
    def _instrument_projector(projector: nn.Module, hooks: Any) -> None:
        def forward(image_features: Tensor) -> Tensor:
            return fire(hooks.hook_out, projector.linear(fire(hooks.hook_in, image_features)))

        _override_forward(projector, forward)

    def attention_edges(
        self, mode: str, layout: ImageTokenLayout, attention_mask: Int[Tensor, "batch seq"] | None,
        extra: dict[str, Tensor],
    ) -> Bool[Tensor, "batch seq seq"]:
        edges = allowed_edges(layout.image_of_position(), attention_mask, mode == "bidirectional")
        if mode == "prefix" and extra.get(PREFIX) is not None:
            prefix = (extra[PREFIX] == 0).to(edges.device)
            edges = edges | (prefix[:, :, None] & prefix[:, None, :])
            if attention_mask is not None:
                edges = edges & attention_mask.bool().to(edges.device)[:, None, :]
        return edges

    def attention_kwargs(
        self, mode: str, kwargs: dict[str, Tensor], layout: Callable[[], ImageTokenLayout], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        if mode == "prefix":  # Hugging Face builds the prefix-LM mask from token_type_ids itself
            return kwargs
        without_prefix = {k: v for k, v in kwargs.items() if k != PREFIX}
        return super().attention_kwargs(mode, without_prefix, layout, dtype)

    def extend_by_one_token(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        return type_ids_extended(extra, PREFIX, generated=1)  # generated tokens are the suffix

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        inputs = super().probe_inputs(cfg, seed)
        types = torch.zeros_like(inputs["input_ids"])
        types[:, -1] = 1  # a suffix token, so both sides of the prefix-LM rule are exercised
        return {**inputs, PREFIX: types}
