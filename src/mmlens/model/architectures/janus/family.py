"""Janus (JanusForConditionalGeneration): its understanding path, a SigLIP-style tower -> an MLP
aligner -> Llama LLM; its VQ-VAE, generation embeddings and generation head only make images.

The aligner reads the tower's last hidden state after its post-layernorm, every patch (no CLS),
and its outputs replace the `<image_placeholder>` tokens one for one, which the processor wraps in
`<begin_of_image>` ... `<end_of_image>` (text tokens, outside the grid): LLaVA's fixed grid. The
tower's blocks are CLIP's with the attention output projection named `projection_layer`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ....errors import UnsupportedModelError
from ...config import AdapterConfig, VisionConfig
from ...hook_tree import fire
from ...runtime.instrument import _override_forward
from ..llava import Llava
from ..module_paths import ModulePaths
from ..towers import CLIP_BLOCK, Tower
from .geometry import ResizeThenPadGeometry

JANUS_BLOCK = replace(CLIP_BLOCK, attention=replace(CLIP_BLOCK.attention, o="projection_layer"))
JANUS_TOWER = Tower(has_cls=False, layers="encoder.layers", post_norm="post_layernorm", block=lambda _c: JANUS_BLOCK)


class Janus(Llava):
    hf_class_names = ("JanusForConditionalGeneration",)
    vision_towers = ("janus_vision_model",)
    llms = ("llama",)
    module_paths = ModulePaths(vision_tower="model.vision_model", vision_layers="encoder.layers",
                               projector="model.aligner", llm="model.language_model")

    def check_supported(self, hf_model: nn.Module) -> None:
        """LLaVA's check of the tower and LLM kinds, and the tower options Janus's code has but
        no released checkpoint uses, refused by name."""
        super().check_supported(hf_model)
        vc = hf_model.config.vision_config
        if vc.use_qk_norm:
            raise UnsupportedModelError(
                "JanusForConditionalGeneration: config.vision_config.use_qk_norm = True (LayerNorms on the tower's "
                "queries and keys) is not in mmlens's Janus block spec; the released Janus checkpoints have it off"
            )
        if vc.depth < 2:
            raise UnsupportedModelError(
                f"JanusForConditionalGeneration: config.vision_config.depth = {vc.depth} gives an aligner with no "
                "hidden layer, so adapter.hook_hidden would never fire; mmlens hooks aligners of depth 2 or more "
                "(the released checkpoints have 2)"
            )

    @staticmethod
    def tower_kind(hf_model: nn.Module) -> Tower:
        return JANUS_TOWER

    def mask_geometry(self, processor: Any) -> ResizeThenPadGeometry:
        return ResizeThenPadGeometry.from_processor(processor)

    def adapter_config(self, hf_model: nn.Module, vision: VisionConfig) -> AdapterConfig:
        aligner = self.projector(hf_model)
        depth = 1 + len(aligner.hidden_layers)
        return AdapterConfig(
            kind=f"mlp{depth}x_{hf_model.config.vision_config.hidden_act}",
            d_in=aligner.fc1.in_features,
            d_hidden=aligner.fc1.out_features,
            d_out=aligner.hidden_layers[-1].out_features,
            feature_layers=(vision.n_layers,),  # the last block, read after ln_post
            select_strategy="full",
            n_image_tokens=vision.n_patches,
            token_grid=vision.patch_grid,
        )

    @staticmethod
    def _instrument_projector(projector: nn.Module, hooks: Any) -> None:
        """`adapter.hook_hidden` is what the aligner's last linear layer reads (after the last
        activation), as LLaVA's is for its two-layer MLP."""

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            x = projector.fc1(fire(hooks.hook_in, hidden_states))
            *inner, last = projector.hidden_layers
            for layer in inner:
                x = layer(projector.activation_fn(x))
            hidden = fire(hooks.hook_hidden, projector.activation_fn(x))
            return fire(hooks.hook_out, last(hidden))

        _override_forward(projector, forward)
