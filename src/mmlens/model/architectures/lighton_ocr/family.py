"""LightOnOCR (LightOnOcrForConditionalGeneration): a native-resolution Pixtral ViT -> RMSNorm, 2x2
patch merger and MLP projector -> Qwen3 LLM.

The vision side is Mistral 3's module for module (`mistral3/`: the packed tower with its
block-diagonal mask, the projector's norm as `vision.ln_post`, merge groups at `adapter.hook_in`),
reading the tower's last hidden state (the config has no `vision_feature_layer`). The prompt
differs: `LightOnOcrProcessor` writes an image as (h / 2) x (w / 2) `[IMG]` tokens in one
contiguous run, row after row, with no `[IMG_BREAK]` / `[IMG_END]`; the layout is Mistral 3's
without row breaks. The LLM is Qwen3 (q/k RMSNorm per head, as LLaVA's Qwen3 variant).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ....errors import UnsupportedModelError
from ...config import MLLMConfig
from ..base import Architecture
from ..llava.qwen3 import QWEN3_LLM_BLOCK
from ..mistral3 import Mistral3
from ..module_paths import ModulePaths


class LightOnOcr(Mistral3):
    hf_class_names = ("LightOnOcrForConditionalGeneration",)
    module_paths = ModulePaths(vision_tower="model.vision_encoder", vision_layers="transformer.layers",
                               projector="model.vision_projection", llm="model.language_model")
    llm_block = QWEN3_LLM_BLOCK
    llms = ("qwen3",)
    row_breaks = False
    # TransformerBridge (TL 4.3) does not wrap LightOnOCR: no bridge names
    bridge_aliases = ()
    canonical_name = Architecture.canonical_name

    def check_supported(self, hf_model: nn.Module) -> None:
        config = hf_model.config
        for field, supported in (("vision_config", ("pixtral",)), ("text_config", self.llms)):
            model_type = getattr(config, field).model_type
            if model_type not in supported:
                raise UnsupportedModelError(
                    f"{type(hf_model).__name__}: config.{field}.model_type = {model_type!r} is not hooked in this "
                    f"family; supported: {list(supported)}"
                )

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        cfg = super().build_config(hf_model)
        return replace(cfg, llm=replace(cfg.llm, use_qk_norm=True))

    @staticmethod
    def feature_layer(config: Any) -> int:
        return -1  # Hugging Face projects the tower's `last_hidden_state`
