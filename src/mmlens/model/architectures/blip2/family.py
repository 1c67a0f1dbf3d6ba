"""BLIP-2 (Blip2ForConditionalGeneration): BLIP's ViT tower -> Q-Former -> language projection -> OPT.

The adapter is a small transformer of its own: `num_query_tokens` learned queries attend to each
other and, every `cross_attention_frequency`-th block, to the tower's last hidden state (CLS and
patches, after its final LayerNorm); `language_projection` maps their outputs to the LLM, where they
replace the image placeholders. The queries are the image's tokens in the LLM but have no pixel
grid (`LearnedQueryLayout`). Its points: `adapter.hook_in` (what the Q-Former cross-attends to),
`adapter.ln_pre` (its LayerNorm on the learned queries), `adapter.blocks.{i}` (`qformer.py`),
`adapter.hook_hidden` (the Q-Former's output) and `adapter.hook_out` (the projection's).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from jaxtyping import Int
from torch import Tensor, nn

from ....errors import UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from ...hook_tree import NormHooks, fire
from ...images.layout import ImageTokenLayout
from ...runtime.devices import bare_forward
from ...runtime.instrument import (
    AttentionSpec, BlockSpec, _override_forward, hook_module_output, instrument_block, instrument_language_model,
)
from ...runtime.norms import instrument_norm
from ..base import Architecture
from ..bridge_aliases import LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES, LLM_UNGATED_MLP_ALIASES
from ..module_paths import ModulePaths
from .layout import learned_query_layout
from .opt import OPT_BLOCK, instrument_opt_block
from .processor import Blip2PromptProcessor
from .qformer import QFormerBlockHooks, instrument_qformer_block

VISION_BLOCK = BlockSpec(
    ln1="layer_norm1", attn="self_attn", ln2="layer_norm2", mlp="mlp", gated_mlp=False,
    attention=AttentionSpec(fused_qkv="qkv", o="projection", scaling="scale", rotary=False),
)


def opt_positions(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """OPT's position of each token, which its decoder reads off the 2-D padding mask (before the
    embedding's offset of 2): the count of real tokens so far, -1 at padding."""
    return (attention_mask.cumsum(dim=1) * attention_mask - 1).long()


class Blip2(Architecture):
    hf_class_names = ("Blip2ForConditionalGeneration",)
    module_paths = ModulePaths(vision_tower="vision_model", vision_layers="encoder.layers",
                               projector="language_projection", llm="language_model.model.decoder",
                               unembed="language_model.lm_head")
    vision_block = VISION_BLOCK
    llm_type, llm_block = "opt", OPT_BLOCK
    supported_llms = ("opt", "t5")  # the text configs `for_checkpoint` gives a variant for
    # the Q-Former's LayerNorm on its input, and whether that input holds instruction text after the queries
    qformer_input_norm, qformer_reads_text = "layernorm", False
    # TransformerLens wraps OPT (not BLIP-2): its LLM names, with fc1 / fc2 as `mlp.in` / `mlp.out`
    bridge_aliases = (*(entry for entry in LLM_ALIASES if ".mlp." not in entry.ours.text), *LLM_BRANCH_OUTPUT_ALIASES,
                      *LLM_UNGATED_MLP_ALIASES)

    @classmethod
    def for_checkpoint(cls, hf_model: nn.Module) -> "Blip2":
        """This family, or its Flan-T5 variant (`t5.py`: an encoder-decoder LLM stage) for a T5 text config."""
        if hf_model.config.text_config.model_type == "t5":
            from .t5 import T5_VARIANTS  # t5.py builds on this module

            return T5_VARIANTS[cls]()
        return cls()

    def check_supported(self, hf_model: nn.Module) -> None:
        """Refuse, by name, an LLM other than the family's (for BLIP-2 a pre-norm OPT with OPT's own
        embedding width)."""
        config, name = hf_model.config, type(hf_model).__name__
        text = config.text_config
        if text.model_type != self.llm_type:
            raise UnsupportedModelError(
                f"{name}: config.text_config.model_type = {text.model_type!r} is an LLM mmlens does not hook in "
                f"this family; it needs a block spec for it; supported: {list(self.supported_llms)}")
        if self.llm_type == "opt":
            self.check_opt(name, text)
        if getattr(config.qformer_config, "use_qformer_text_input", False) and not self.qformer_reads_text:
            raise UnsupportedModelError(f"{name}: its Q-Former reads instruction text beside its queries, which this "
                                        "family's Q-Former hooks do not cover; InstructBLIP's do")

    @staticmethod
    def check_opt(name: str, text: Any) -> None:
        problems = {
            "do_layer_norm_before = False (post-norm blocks, as OPT-350m)": not text.do_layer_norm_before,
            "word_embed_proj_dim != hidden_size (project_in / project_out around the blocks, as OPT-350m)":
                text.word_embed_proj_dim != text.hidden_size,
            "_remove_final_layer_norm = True (no final norm)": getattr(text, "_remove_final_layer_norm", False),
            "layer_norm_elementwise_affine = False": not getattr(text, "layer_norm_elementwise_affine", True),
        }
        for problem, present in problems.items():
            if present:
                raise UnsupportedModelError(
                    f"{name}: its OPT LLM has {problem}, which mmlens's OPT block spec does not express (it hooks "
                    "pre-norm OPT with affine LayerNorms and a final norm: OPT-1.3b and larger, as blip2-opt-2.7b/6.7b)")

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        config = hf_model.config
        vc, qc, tc = config.vision_config, config.qformer_config, config.text_config
        vision = VisionConfig.from_encoder(
            vc, d_mlp=vc.intermediate_size, normalization_type="LN", positional_embedding_type="learned",
            image_size=vc.image_size, patch_size=vc.patch_size, has_cls=True,
        )
        adapter = AdapterConfig(
            kind="qformer", d_in=qc.encoder_hidden_size, d_hidden=qc.hidden_size, d_out=tc.hidden_size,
            feature_layers=(vision.n_layers,), select_strategy="full",  # CLS and patches, after post_layernorm
            n_image_tokens=config.num_query_tokens, token_grid=(1, config.num_query_tokens),
        )
        return self.assemble_config(hf_model, vision, adapter, self.llm_config(tc))

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        return StageConfig(
            n_layers=tc.num_hidden_layers, n_heads=tc.num_attention_heads, d_model=tc.hidden_size,
            d_head=tc.hidden_size // tc.num_attention_heads, d_mlp=tc.ffn_dim, n_key_value_heads=tc.num_attention_heads,
            normalization_type="LN", positional_embedding_type="learned",
        )

    def use_processor(self, processor: Any) -> None:
        Blip2PromptProcessor.adopt(processor)  # one placeholder per image in the prompt, as every family takes

    # ------------------------------------------------------------- hooks
    @staticmethod
    def qformer_layers(hf_model: nn.Module) -> nn.ModuleList:
        return hf_model.qformer.encoder.layer

    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        tower = self.vision_tower(hf_model)
        for layer, hooks in zip(self.vision_layers(hf_model), root.vision.blocks):
            instrument_block(layer, hooks, self.vision_block, use_result, "LN")
        instrument_norm(tower.post_layernorm, root.vision.ln_post, "LN")
        handles = [hook_module_output(tower.embeddings, root.vision.hook_embed)]
        handles.append(self._instrument_qformer(hf_model, root, use_result))
        self._instrument_projection(self.projector(hf_model), root.adapter)
        return handles + self.instrument_llm(hf_model, root, use_result)

    def instrument_llm(self, hf_model: nn.Module, root: Any, use_result: Callable[[], bool]) -> list[Any]:
        return instrument_language_model(self.language_model(hf_model), self.llm_layers(hf_model), self.llm_block, root,
                                         use_result, final_norm="final_layer_norm", instrument_layer=instrument_opt_block)

    def _instrument_qformer(self, hf_model: nn.Module, root: Any, use_result: Callable[[], bool]) -> Any:
        """Give the adapter's hook group the Q-Former's points (before the model indexes its hooks)
        and hook its blocks; `adapter.hook_in` fires on the image states it cross-attends to."""
        layers = self.qformer_layers(hf_model)
        adapter = root.adapter
        adapter.ln_pre = NormHooks()
        adapter.blocks = nn.ModuleList(QFormerBlockHooks(layer.has_cross_attention, self.qformer_reads_text)
                                       for layer in layers)
        instrument_norm(hf_model.qformer.get_submodule(self.qformer_input_norm), adapter.ln_pre, "LN")
        for layer, hooks in zip(layers, adapter.blocks):
            instrument_qformer_block(layer, hooks, use_result)

        def image_states(_module, args, kwargs):
            if kwargs.get("encoder_hidden_states") is not None:
                kwargs["encoder_hidden_states"] = fire(adapter.hook_in, kwargs["encoder_hidden_states"])
            return args, kwargs

        return hf_model.qformer.register_forward_pre_hook(image_states, with_kwargs=True)

    @staticmethod
    def _instrument_projection(projection: nn.Linear, hooks: Any) -> None:
        original = bare_forward(projection)
        _override_forward(projection, lambda x: fire(hooks.hook_out, original(fire(hooks.hook_hidden, x))))

    def blocks(self, hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The tower's blocks, the Q-Former's (`adapter.blocks.{i}`), then the LLM's."""
        stacks = super().blocks(hf_model)
        qformer = [(f"adapter.blocks.{i}", m) for i, m in enumerate(self.qformer_layers(hf_model))]
        n_vision = len(self.vision_layers(hf_model))
        return stacks[:n_vision] + qformer + stacks[n_vision:]

    def forward(self, hf_model: nn.Module, **inputs: Tensor) -> Any:
        """The whole model on ids and pixels; from the merged embeddings (no pixels), its OPT alone,
        which is what Hugging Face's BLIP-2 runs after merging (it takes no `inputs_embeds` without them)."""
        if "pixel_values" in inputs or inputs.get("inputs_embeds") is None:
            return super().forward(hf_model, **inputs)
        return hf_model.language_model(**self.hf_keywords(inputs), use_cache=False)

    # ------------------------------------------------------------- positions and attention rules
    def llm_keywords(self, hf_model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """OPT's positions, which its decoder would read off the 2-D mask (`opt_positions`)."""
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
        return {"position_ids": opt_positions(mask)}

    def attention_kwargs(self, mode: str, kwargs: dict[str, Tensor], layout: Callable[[], ImageTokenLayout],
                         dtype: torch.dtype) -> dict[str, Tensor]:
        if mode == "causal":
            return kwargs
        # OPT reads its positions off the 2-D mask: give them before it becomes 4D
        positions = self.llm_keywords(None, kwargs)
        return {**super().attention_kwargs(mode, kwargs, layout, dtype), **positions}

    # ------------------------------------------------------------- images -> tokens
    def layout(self, cfg: MLLMConfig, input_ids: Tensor, **inputs: Tensor) -> ImageTokenLayout:
        return learned_query_layout(input_ids, image_token_id=cfg.image_token_id, n_queries=cfg.adapter.n_image_tokens,
                                    image_size=cfg.vision.image_size, patch_grid=cfg.vision.patch_grid)

    def llm_prefix_tokens(self, cfg: MLLMConfig) -> int:
        return 0
