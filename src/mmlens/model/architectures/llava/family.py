"""LLaVA (LlavaForConditionalGeneration): CLIP, SigLIP or DINOv2 tower -> MLP projector -> Llama,
Mistral or Qwen2 LLM; a Pixtral tower (`pixtral.py`) or a Qwen3 LLM (`qwen3.py`) makes a variant
that `Llava.for_checkpoint` picks when the model loads.

The projector reads the hidden state `vision_feature_layer` of the tower (-2 for LLaVA-1.5),
without its CLS token under the "default" strategy, and its outputs replace the `<image>`
placeholder embeddings one for one, so the LLM's image-token grid is the vision patch grid.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ....errors import UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from ...hook_tree import fire
from ...runtime.instrument import (
    AttentionSpec, BlockSpec, _override_forward, hook_module_output, instrument_block, instrument_language_model,
)
from ...runtime.norms import instrument_norm
from ..base import Architecture
from ..bridge_aliases import (
    CLIP_PRE_NORM_ALIASES, CLIP_TOWER_ALIASES, LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES, PROJECTOR_INPUT_ALIASES,
    PROJECTOR_OUTPUT_ALIASES,
)
from ..module_paths import ModulePaths
from ..towers import TOWERS, Tower

LLMS = ("llama", "mistral", "qwen2")
# parts of a LlavaForConditionalGeneration that need a variant of the family (`for_checkpoint`)
VARIANT_TOWERS = ("pixtral",)
VARIANT_LLMS = ("qwen3",)

LLM_BLOCK = BlockSpec(
    ln1="input_layernorm",
    attn="self_attn",
    ln2="post_attention_layernorm",
    mlp="mlp",
    gated_mlp=True,
    attention=AttentionSpec(),
)


class Llava(Architecture):
    hf_class_names = ("LlavaForConditionalGeneration",)
    vision_towers: tuple[str, ...] = tuple(TOWERS)
    llms = LLMS
    llm_block = LLM_BLOCK
    # `vision_layers` is CLIP's and SigLIP's; `paths` puts in that of the checkpoint's tower
    module_paths = ModulePaths(vision_tower="model.vision_tower", vision_layers="encoder.layers",
                               projector="model.multi_modal_projector", llm="model.language_model")
    # towers without CLIP's pre-norm; `build_config` adds CLIP_PRE_NORM_ALIASES for one that has it
    bridge_aliases = (*CLIP_TOWER_ALIASES, *PROJECTOR_INPUT_ALIASES, *PROJECTOR_OUTPUT_ALIASES, *LLM_ALIASES,
                      *LLM_BRANCH_OUTPUT_ALIASES)

    @classmethod
    def for_checkpoint(cls, hf_model: nn.Module) -> Architecture:
        """The family's variant for this checkpoint: a Pixtral tower packs images at their own
        resolution, a geometry of its own (`pixtral.py`); a Qwen3 LLM has q/k norms (`qwen3.py`)."""
        if cls is not Llava:
            return cls()
        if hf_model.config.vision_config.model_type in VARIANT_TOWERS:
            from .pixtral import LlavaPixtral  # builds on Mistral 3's tower, whose family imports this module

            return LlavaPixtral()
        if hf_model.config.text_config.model_type in VARIANT_LLMS:
            from .qwen3 import LlavaQwen3  # a subclass of Llava: its module imports this one

            return LlavaQwen3()
        return cls()

    def check_supported(self, hf_model: nn.Module) -> None:
        """Refuse a config that pairs a known class with a tower or LLM this family does not hook,
        naming the config field, its model_type and what is supported."""
        config = hf_model.config
        towers, llms = sorted(self.vision_towers), list(self.llms)
        if type(self) is Llava:  # the variants `for_checkpoint` picks are LLaVA's too
            towers, llms = towers + list(VARIANT_TOWERS), llms + list(VARIANT_LLMS)
        for field, kind, supported in (("vision_config", "vision tower", towers), ("text_config", "LLM", llms)):
            model_type = getattr(config, field).model_type
            if model_type not in supported:
                raise UnsupportedModelError(
                    f"{type(hf_model).__name__}: config.{field}.model_type = {model_type!r} is a {kind} mmlens does "
                    f"not hook in this family; supported: {supported}. Use a checkpoint with one of those, or add "
                    "the part to mmlens/model/architectures (a tower: one entry in towers.py)"
                )

    def paths(self, hf_model: nn.Module) -> ModulePaths:
        """Where the tower keeps its blocks depends on which tower the checkpoint has (DINOv2 calls
        them `encoder.layer`)."""
        return replace(self.module_paths, vision_layers=self.tower_kind(hf_model).layers)

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        if self.tower_kind(hf_model).pre_norm is not None:
            self.bridge_aliases = (*CLIP_PRE_NORM_ALIASES, *type(self).bridge_aliases)
        config = hf_model.config
        vision = self.vision_config(hf_model)
        return self.assemble_config(hf_model, vision, self.adapter_config(hf_model, vision), self.llm_config(config.text_config))

    @staticmethod
    def tower_kind(hf_model: nn.Module) -> Tower:
        return TOWERS[hf_model.config.vision_config.model_type]

    def vision_config(self, hf_model: nn.Module) -> VisionConfig:
        vc = hf_model.config.vision_config
        tower = self.tower_kind(hf_model)
        mlp = self.vision_layers(hf_model)[0].mlp
        return VisionConfig.from_encoder(
            vc,
            d_mlp=(mlp.up_proj if hasattr(mlp, "up_proj") else mlp.fc1).out_features,
            normalization_type="LN",
            positional_embedding_type="learned",
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            has_cls=tower.has_cls,
            n_registers=int(getattr(vc, tower.registers)) if tower.registers else 0,
            has_ln_pre=tower.pre_norm is not None,
            gated_mlp=tower.block(vc).gated_mlp,
        )

    def adapter_config(self, hf_model: nn.Module, vision: VisionConfig) -> AdapterConfig:
        config = hf_model.config
        n_vision_states = vision.n_layers + 1  # embeddings, then one per block
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        feature_layers = tuple(l % n_vision_states for l in layers)
        strategy = config.vision_feature_select_strategy
        # "default" drops the first vision token (CLS); registers after it reach the LLM
        prefix = int(vision.has_cls and strategy == "full") + vision.n_registers
        projector = self.projector(hf_model)
        return AdapterConfig(
            kind=f"mlp2x_{config.projector_hidden_act}",
            d_in=projector.linear_1.in_features,
            d_hidden=projector.linear_1.out_features,
            d_out=projector.linear_2.out_features,
            feature_layers=feature_layers,
            select_strategy=strategy,
            n_image_tokens=vision.n_patches + prefix,
            token_grid=vision.patch_grid,
        )

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        d_head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return StageConfig(
            n_layers=tc.num_hidden_layers,
            n_heads=tc.num_attention_heads,
            d_model=tc.hidden_size,
            d_head=d_head,
            d_mlp=tc.intermediate_size,
            n_key_value_heads=tc.num_key_value_heads or tc.num_attention_heads,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            gated_mlp=True,
        )

    def llm_sees_cls(self, cfg: MLLMConfig) -> bool:
        return cfg.vision.has_cls and cfg.adapter.select_strategy == "full"

    def llm_prefix_tokens(self, cfg: MLLMConfig) -> int:
        return int(self.llm_sees_cls(cfg)) + cfg.vision.n_registers

    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        tower, kind = self.vision_tower(hf_model), self.tower_kind(hf_model)
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        vision_norm = root.cfg.vision.normalization_type
        block = kind.block(hf_model.config.vision_config)
        for layer, hooks in zip(self.vision_layers(hf_model), root.vision.blocks):
            instrument_block(layer, hooks, block, use_result, vision_norm)
        handles = [hook_module_output(tower.embeddings, root.vision.hook_embed)]
        if kind.pre_norm is not None:
            instrument_norm(getattr(tower, kind.pre_norm), root.vision.ln_pre, vision_norm)
        instrument_norm(getattr(tower, kind.post_norm), root.vision.ln_post, vision_norm)
        self._instrument_projector(self.projector(hf_model), root.adapter)
        lm = self.language_model(hf_model)
        return handles + instrument_language_model(lm, self.llm_layers(hf_model), self.llm_block, root, use_result)

    @staticmethod
    def _instrument_projector(projector: nn.Module, hooks: Any) -> None:
        def forward(image_features: torch.Tensor) -> torch.Tensor:
            x = fire(hooks.hook_in, image_features)
            hidden = fire(hooks.hook_hidden, projector.act(projector.linear_1(x)))
            return fire(hooks.hook_out, projector.linear_2(hidden))

        _override_forward(projector, forward)
