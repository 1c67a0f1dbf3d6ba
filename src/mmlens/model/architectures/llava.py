"""LLaVA (LlavaForConditionalGeneration): CLIP or SigLIP tower -> MLP projector -> Llama-family LLM.

The projector reads the hidden state `vision_feature_layer` of the tower (-2 for LLaVA-1.5),
without its CLS token under the "default" strategy, and its outputs replace the `<image>`
placeholder embeddings one for one, so the LLM's image-token grid is the vision patch grid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from ..hook_tree import fire
from ..instrument import AttentionSpec, BlockSpec, _override_forward, hook_module_output, instrument_block
from ..norms import instrument_norm
from .base import StageModules
from .base import Architecture

VISION_TOWERS = {"clip_vision_model": True, "siglip_vision_model": False}  # model_type -> has CLS
LLMS = ("llama", "mistral", "qwen2")

VISION_BLOCK = BlockSpec(
    ln1="layer_norm1",
    attn="self_attn",
    ln2="layer_norm2",
    mlp="mlp",
    gated_mlp=False,
    attention=AttentionSpec(o="out_proj", scaling="scale", rotary=False),
)
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

    @staticmethod
    def check_supported(hf_model: nn.Module) -> None:
        config = hf_model.config
        vision_type = config.vision_config.model_type
        text_type = config.text_config.model_type
        if vision_type not in VISION_TOWERS or text_type not in LLMS:
            raise UnsupportedModelError(
                f"LLaVA with a {vision_type!r} vision tower and a {text_type!r} LLM is not supported; "
                f"supported towers: {sorted(VISION_TOWERS)}, LLMs: {list(LLMS)}"
            )

    @staticmethod
    def vision_tower(hf_model: nn.Module) -> nn.Module:
        tower = hf_model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        config = hf_model.config
        vc, tc = config.vision_config, config.text_config
        has_cls = VISION_TOWERS[vc.model_type]
        n_vision_states = vc.num_hidden_layers + 1  # embeddings, then one per block
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        feature_layers = tuple(l % n_vision_states for l in layers)
        vision = VisionConfig(
            n_layers=vc.num_hidden_layers,
            n_heads=vc.num_attention_heads,
            d_model=vc.hidden_size,
            d_head=vc.hidden_size // vc.num_attention_heads,
            d_mlp=vc.intermediate_size,
            n_key_value_heads=vc.num_attention_heads,
            normalization_type="LN",
            positional_embedding_type="learned",
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            has_cls=has_cls,
            has_ln_pre=hasattr(self.vision_tower(hf_model), "pre_layrnorm"),
        )
        strategy = config.vision_feature_select_strategy
        sees_cls = has_cls and strategy == "full"
        projector = hf_model.model.multi_modal_projector
        adapter = AdapterConfig(
            kind=f"mlp2x_{config.projector_hidden_act}",
            d_in=projector.linear_1.in_features,
            d_hidden=projector.linear_1.out_features,
            d_out=projector.linear_2.out_features,
            feature_layers=feature_layers,
            select_strategy=strategy,
            n_image_tokens=vision.n_patches + int(sees_cls),
            token_grid=vision.patch_grid,
        )
        d_head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        llm = StageConfig(
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
        param = next(hf_model.parameters())
        return MLLMConfig(
            architecture=type(hf_model).__name__,
            vision=vision,
            adapter=adapter,
            llm=llm,
            d_vocab=tc.vocab_size,
            image_token_id=config.image_token_id,
            device=param.device,
            dtype=param.dtype,
        )

    def llm_sees_cls(self, cfg: MLLMConfig) -> bool:
        return cfg.vision.has_cls and cfg.adapter.select_strategy == "full"

    def patch_to_token(self, cfg: MLLMConfig) -> torch.Tensor:
        return torch.arange(cfg.vision.n_patches)  # one LLM token per patch, same order

    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        tower = self.vision_tower(hf_model)
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        vision_norm, llm_norm = root.cfg.vision.normalization_type, root.cfg.llm.normalization_type
        for layer, hooks in zip(tower.encoder.layers, root.vision.blocks):
            instrument_block(layer, hooks, VISION_BLOCK, use_result, vision_norm)
        handles = [hook_module_output(tower.embeddings, root.vision.hook_embed)]
        if root.cfg.vision.has_ln_pre:
            instrument_norm(tower.pre_layrnorm, root.vision.ln_pre, vision_norm)
        instrument_norm(tower.post_layernorm, root.vision.ln_post, vision_norm)
        self._instrument_projector(hf_model.model.multi_modal_projector, root.adapter)

        lm = hf_model.model.language_model
        for layer, hooks in zip(lm.layers, root.blocks):
            instrument_block(layer, hooks, LLM_BLOCK, use_result, llm_norm)
        handles.append(hook_module_output(lm.embed_tokens, root.hook_embed))
        instrument_norm(lm.norm, root.ln_final, llm_norm)

        def merged_embedding(_module, args, kwargs):
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None:
                kwargs["inputs_embeds"] = fire(root.hook_multimodal_embed, embeds)
            return args, kwargs

        handles.append(lm.register_forward_pre_hook(merged_embedding, with_kwargs=True))
        return handles

    @staticmethod
    def _instrument_projector(projector: nn.Module, hooks: Any) -> None:
        def forward(image_features: torch.Tensor) -> torch.Tensor:
            x = fire(hooks.hook_in, image_features)
            hidden = fire(hooks.hook_hidden, projector.act(projector.linear_1(x)))
            return fire(hooks.hook_out, projector.linear_2(hidden))

        _override_forward(projector, forward)

    def forward(self, hf_model: nn.Module, **inputs: torch.Tensor) -> Any:
        return hf_model(**inputs, use_cache=False)

    def stage_modules(self, hf_model: nn.Module) -> dict[str, StageModules]:
        tower, lm = self.vision_tower(hf_model), hf_model.model.language_model
        return {
            "vision": StageModules(layers=tuple(tower.encoder.layers), tower=tower),
            "llm": StageModules(layers=tuple(lm.layers), embed=lm.embed_tokens, unembed=hf_model.lm_head),
        }
