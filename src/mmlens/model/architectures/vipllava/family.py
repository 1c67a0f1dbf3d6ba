"""VipLLaVA (VipLlavaForConditionalGeneration): CLIP tower -> LayerNorm + MLP projector over several
tower layers -> Llama LLM.

The projector reads the hidden states of every layer in `vision_feature_layer` (-2, -5, -8, -11
and 6 in the released checkpoints), each without its CLS token, concatenated along the channels;
it LayerNorms that concatenation before its MLP. Its outputs replace the `<image>` placeholders
one for one, so the layout is LLaVA's fixed grid; `adapter.hook_in` is the concatenation, before
the LayerNorm, as the projector reads it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import AdapterConfig, VisionConfig
from ...hook_tree import fire
from ...runtime.instrument import _override_forward
from ..llava import Llava
from ..module_paths import ModulePaths


class VipLlava(Llava):
    hf_class_names = ("VipLlavaForConditionalGeneration",)
    # Hugging Face drops the first token of every chosen layer: the tower needs a CLS token
    vision_towers = ("clip_vision_model",)
    llms = ("llama",)
    module_paths = ModulePaths(vision_tower="model.vision_tower", vision_layers="encoder.layers",
                               projector="model.multi_modal_projector", llm="model.language_model")

    def adapter_config(self, hf_model: nn.Module, vision: VisionConfig) -> AdapterConfig:
        config = hf_model.config
        n_vision_states = vision.n_layers + 1  # embeddings, then one per block
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        projector = self.projector(hf_model)
        return AdapterConfig(
            kind=f"layernorm_mlp2x_{config.projector_hidden_act}",
            d_in=projector.linear_1.in_features,
            d_hidden=projector.linear_1.out_features,
            d_out=projector.linear_2.out_features,
            feature_layers=tuple(layer % n_vision_states for layer in layers),
            select_strategy="default",
            n_image_tokens=vision.n_patches,
            token_grid=vision.patch_grid,
        )

    @staticmethod
    def _instrument_projector(projector: nn.Module, hooks: Any) -> None:
        def forward(image_features: torch.Tensor) -> torch.Tensor:
            x = projector.projector_layernorm(fire(hooks.hook_in, image_features))
            hidden = fire(hooks.hook_hidden, projector.act(projector.linear_1(x)))
            return fire(hooks.hook_out, projector.linear_2(hidden))

        _override_forward(projector, forward)
