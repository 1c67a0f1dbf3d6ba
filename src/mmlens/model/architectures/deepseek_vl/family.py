"""DeepSeek-VL (DeepseekVLForConditionalGeneration): a SigLIP tower -> a two-layer MLP aligner
(`linear1`, GELU, `linear2`) -> Llama LLM.

The aligner reads the tower's last hidden state after its post-layernorm, every patch (SigLIP has
no CLS; its attention-pooling head is computed but unused), and its outputs replace the
`<image_placeholder>` tokens one for one: LLaVA's fixed grid. The image processor is Janus's
(longest side resized, then padded to a square), so the mask geometry is Janus's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import AdapterConfig, VisionConfig
from ...hook_tree import fire
from ...runtime.instrument import _override_forward
from ..janus.geometry import ResizeThenPadGeometry
from ..llava import Llava
from ..module_paths import ModulePaths
from ..towers import TOWERS, Tower


class DeepseekVL(Llava):
    hf_class_names = ("DeepseekVLForConditionalGeneration",)
    vision_towers = ("siglip_vision_model",)
    llms = ("llama",)
    module_paths = ModulePaths(vision_tower="model.vision_model", vision_layers="encoder.layers",
                               projector="model.aligner", llm="model.language_model")

    @staticmethod
    def tower_kind(hf_model: nn.Module) -> Tower:
        return TOWERS["siglip_vision_model"]

    def mask_geometry(self, processor: Any) -> ResizeThenPadGeometry:
        return ResizeThenPadGeometry.from_processor(processor)

    def adapter_config(self, hf_model: nn.Module, vision: VisionConfig) -> AdapterConfig:
        aligner = self.projector(hf_model)
        return AdapterConfig(
            kind="mlp2x_gelu",  # the aligner's activation is a fixed nn.GELU(), not a config field
            d_in=aligner.linear1.in_features,
            d_hidden=aligner.linear1.out_features,
            d_out=aligner.linear2.out_features,
            feature_layers=(vision.n_layers,),  # the last block, read after ln_post
            select_strategy="full",
            n_image_tokens=vision.n_patches,
            token_grid=vision.patch_grid,
        )

    @staticmethod
    def _instrument_projector(projector: nn.Module, hooks: Any) -> None:
        def forward(vision_encodings: torch.Tensor) -> torch.Tensor:
            x = fire(hooks.hook_in, vision_encodings)
            hidden = fire(hooks.hook_hidden, projector.activation(projector.linear1(x)))
            return fire(hooks.hook_out, projector.linear2(hidden))

        _override_forward(projector, forward)
