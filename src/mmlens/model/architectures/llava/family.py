"""LLaVA (LlavaForConditionalGeneration): CLIP, SigLIP or DINOv2 tower -> MLP projector -> Llama,
Mistral or Qwen2 LLM.

The projector reads the hidden state `vision_feature_layer` of the tower (-2 for LLaVA-1.5),
without its CLS token under the "default" strategy, and its outputs replace the `<image>`
placeholder embeddings one for one, so the LLM's image-token grid is the vision patch grid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ....errors import UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from ...hook_tree import fire
from ...instrument import (
    AttentionSpec, BlockSpec, _override_forward, hook_module_output, instrument_block, instrument_language_model,
)
from ...norms import instrument_norm
from ..base import Architecture, StageModules
from ..towers import TOWERS, Tower

LLMS = ("llama", "mistral", "qwen2")

LLM_BLOCK = BlockSpec(
    ln1="input_layernorm",
    attn="self_attn",
    ln2="post_attention_layernorm",
    mlp="mlp",
    gated_mlp=True,
    attention=AttentionSpec(),
)

_V = r"vision_encoder\.encoder_layers\.(\d+)\."
_L = r"blocks\.(\d+)\."


class Llava(Architecture):
    hf_class_names = ("LlavaForConditionalGeneration",)
    vision_towers: tuple[str, ...] = tuple(TOWERS)
    llms = LLMS
    llm_block = LLM_BLOCK
    bridge_aliases = (
        (r"vision_encoder\.(embeddings\.hook_out|hook_vision_embed)", "vision.hook_embed"),
        (r"vision_encoder\.pre_layernorm\.hook_(out|normalized)", "vision.ln_pre.hook_normalized"),
        (r"vision_encoder\.post_layernorm\.hook_(out|normalized)", "vision.ln_post.hook_normalized"),
        (_V + r"hook_(in|resid_pre)", r"vision.blocks.\1.hook_resid_pre"),
        (_V + r"hook_(out|resid_post)", r"vision.blocks.\1.hook_resid_post"),
        (_V + r"(ln1|ln2)\.hook_(out|normalized)", r"vision.blocks.\1.\2.hook_normalized"),
        (_V + r"(attn\.hook_out|hook_attn_out)", r"vision.blocks.\1.hook_attn_out"),
        (_V + r"(mlp\.hook_out|hook_mlp_out)", r"vision.blocks.\1.hook_mlp_out"),
        (_V + r"mlp\.in\.hook_out", r"vision.blocks.\1.mlp.hook_pre"),
        (_V + r"mlp\.out\.hook_in", r"vision.blocks.\1.mlp.hook_post"),
        (_V + r"(attn\.hook_\w+|mlp\.hook_\w+)", r"vision.blocks.\1.\2"),
        (r"vision_projector\.(hook_in|hook_vision_proj_in)", "adapter.hook_in"),
        (r"vision_projector\.(hook_out|hook_vision_proj_out|hook_projected)", "adapter.hook_out"),
        (r"embed\.hook_out", "hook_embed"),
        (_L + r"hook_in", r"blocks.\1.hook_resid_pre"),
        (_L + r"hook_out", r"blocks.\1.hook_resid_post"),
        (_L + r"(ln1|ln2)\.hook_out", r"blocks.\1.\2.hook_normalized"),
        (_L + r"attn\.hook_out", r"blocks.\1.hook_attn_out"),
        (_L + r"mlp\.hook_out", r"blocks.\1.hook_mlp_out"),
        (_L + r"mlp\.gate\.hook_out", r"blocks.\1.mlp.hook_pre"),
        (_L + r"mlp\.in\.hook_out", r"blocks.\1.mlp.hook_pre_linear"),
        (_L + r"mlp\.out\.hook_in", r"blocks.\1.mlp.hook_post"),
        (r"ln_final\.hook_out", "ln_final.hook_normalized"),
    )

    def check_supported(self, hf_model: nn.Module) -> None:
        config = hf_model.config
        vision_type = config.vision_config.model_type
        text_type = config.text_config.model_type
        if vision_type not in self.vision_towers or text_type not in self.llms:
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} with a {vision_type!r} vision tower and a {text_type!r} LLM is not "
                f"supported; supported towers: {sorted(self.vision_towers)}, LLMs: {list(self.llms)}"
            )

    @staticmethod
    def vision_tower(hf_model: nn.Module) -> nn.Module:
        tower = hf_model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
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
        projector = hf_model.model.multi_modal_projector
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

    def vision_layers(self, hf_model: nn.Module) -> nn.ModuleList:
        return self.tower_kind(hf_model).block_list(self.vision_tower(hf_model))

    def llm_layers(self, hf_model: nn.Module) -> nn.ModuleList:
        return hf_model.model.language_model.layers

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
        self._instrument_projector(hf_model.model.multi_modal_projector, root.adapter)
        lm = hf_model.model.language_model
        return handles + instrument_language_model(lm, self.llm_layers(hf_model), self.llm_block, root, use_result)

    @staticmethod
    def _instrument_projector(projector: nn.Module, hooks: Any) -> None:
        def forward(image_features: torch.Tensor) -> torch.Tensor:
            x = fire(hooks.hook_in, image_features)
            hidden = fire(hooks.hook_hidden, projector.act(projector.linear_1(x)))
            return fire(hooks.hook_out, projector.linear_2(hidden))

        _override_forward(projector, forward)

    def stage_modules(self, hf_model: nn.Module) -> dict[str, StageModules]:
        lm = hf_model.model.language_model
        return {
            "vision": StageModules(layers=tuple(self.vision_layers(hf_model)), tower=self.vision_tower(hf_model)),
            "llm": StageModules(layers=tuple(self.llm_layers(hf_model)), embed=lm.embed_tokens,
                                unembed=hf_model.lm_head),
        }
