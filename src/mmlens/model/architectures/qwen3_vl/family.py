"""Qwen3-VL (Qwen3VLForConditionalGeneration): Qwen2-VL's packed native-resolution tower and 2x2
merger, a learned position grid, deepstack, and a Qwen3 LLM with interleaved M-RoPE.

The tower is Qwen2-VL's (one packed sequence split by `cu_seqlens`, full attention within each
image, fused qkv, 2-D rotary; LayerNorm and a GELU MLP, all with biases) plus a learned
`num_position_embeddings` grid bilinearly interpolated to each image's patch grid and added to the
patch embeddings (`vision.hook_embed` sees the sum, as block 0 receives it). The merger's output
goes into the image tokens as in Qwen2-VL; in addition, deepstack mergers turn the residual after
the blocks `deepstack_visual_indexes` into terms the LLM adds to the image tokens after its first
layers (`deepstack.py`: hook points `adapter.deepstack.{i}.hook_out`). The LLM is Qwen3:
RMSNorms on each head's queries and keys (`attn.q_ln`, `attn.k_ln`), M-RoPE whose t/h/w
frequencies interleave (Hugging Face's rotary embedding builds them; positions come from
`get_rope_index` as in Qwen2-VL).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ....errors import HookNameError, UnsupportedModelError
from ...config import StageConfig
from ...hook_names import parse_hook_name
from ...runtime.instrument import AttentionSpec
from ..bridge_aliases import (
    LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES, LLM_QK_NORM_ALIASES, PROJECTOR_OUTPUT_ALIASES, alias,
)
from ..llava import LLM_BLOCK, Llava
from ..qwen2_vl.family import BRIDGE_VISION_BLOCK as _V, GRID, QWEN_VISION_BLOCK_ALIASES, Qwen2VL
from .deepstack import DEEPSTACK, DeepstackTerms, image_features, instrument_deepstack

QWEN3_BLOCK = replace(LLM_BLOCK, attention=AttentionSpec(q_norm="q_norm", k_norm="k_norm"))

# Qwen3-VL's vision MLP (linear_fc1 -> act -> linear_fc2) and its deepstack mergers
QWEN3_VISION_MLP_ALIASES = (
    alias("vision.blocks.{layer}.mlp.hook_pre", _V + "mlp.linear_fc1.hook_out"),
    alias("vision.blocks.{layer}.mlp.hook_post", _V + "mlp.linear_fc2.hook_in"),
)
DEEPSTACK_ALIASES = (alias("adapter.deepstack.{layer}.hook_out", "vision_encoder.deepstack_mergers.{layer}.hook_out"),)


class Qwen3VL(Qwen2VL):
    hf_class_names = ("Qwen3VLForConditionalGeneration",)
    # TransformerBridge's names (TL 4.3 wraps Qwen3-VL). Its tower keeps the LLM's token order (no
    # windows), so the bridge's merger outputs are ours; left out: `patch_embed.hook_out` and
    # `pos_embed.hook_out` (ours is their sum), `vision_projector.hook_in` (the bridge's is the packed
    # residual before the merger's norm, ours the normalised 2x2 groups) and, for the deepstack layers
    # only, `blocks.{i}.hook_out` (see `canonical_name`).
    bridge_aliases = (*QWEN_VISION_BLOCK_ALIASES, *QWEN3_VISION_MLP_ALIASES, *DEEPSTACK_ALIASES,
                      *PROJECTOR_OUTPUT_ALIASES, *LLM_QK_NORM_ALIASES, *LLM_ALIASES, *LLM_BRANCH_OUTPUT_ALIASES)
    llm_block = QWEN3_BLOCK

    @staticmethod
    def vision_width(vision_config: Any) -> int:
        return vision_config.hidden_size

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        return replace(Llava.llm_config(tc), use_qk_norm=True)

    def deepstack_levels(self) -> int:
        return len(self._hf_model.config.vision_config.deepstack_visual_indexes)

    # ------------------------------------------------------------- hooks
    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        handles = super().instrument(hf_model, root)
        lm = self.language_model(hf_model)
        n_levels = self.deepstack_levels()
        if n_levels > len(lm.layers):  # Hugging Face would silently drop the levels past its last layer
            raise UnsupportedModelError(f"{type(hf_model).__name__}: {n_levels} deepstack levels "
                                        f"(deepstack_visual_indexes) but only {len(lm.layers)} LLM layers to add them to")
        handles += instrument_deepstack(lm, self.llm_layers(hf_model), root, n_levels)
        # a run from merged embeddings recomputes the terms with the tower and its merger quiet
        deepstack = {id(m) for m in root.adapter.deepstack.modules()}
        self._tower_points = [m for group in (root.vision, root.adapter) for m in group.modules()
                              if isinstance(m, HookPoint) and id(m) not in deepstack]
        return handles

    def canonical_name(self, name: str) -> str:
        """The bridge's `blocks.{i}.hook_out` of a deepstack layer is the layer's output before
        Hugging Face adds the term; ours (`hook_resid_post`) is after, so that name is not an alias
        there (use `blocks.{i+1}.hook_in`, which the bridge and we agree on)."""
        try:
            parsed = parse_hook_name(name)
        except HookNameError:  # outside the grammar, so not a block's name
            parsed = None
        deepstack_output = (parsed is not None and parsed.in_llm_block and parsed.site == "hook_out"
                            and parsed.layer < self.deepstack_levels())
        return name if deepstack_output else super().canonical_name(name)

    # ------------------------------------------------------------- runs from merged embeddings
    def llm_keywords(self, hf_model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Any]:
        """Qwen2-VL's M-RoPE positions, and the deepstack terms: Hugging Face's forward computes
        them from the pixels, which a run from merged embeddings does not pass on, so they are
        recomputed here (the tower runs again, its hooks quiet) and handed to the LLM under the
        `DEEPSTACK` keyword. Without pixels (or a grid) the run has no terms, as in Hugging Face."""
        keywords: dict[str, Any] = super().llm_keywords(hf_model, inputs)
        pixels, grid = inputs.get("pixel_values"), inputs.get(GRID)
        if pixels is None or grid is None:
            return keywords
        features = image_features(hf_model, pixels.to(self.vision_tower(hf_model).dtype), grid, self._tower_points)
        mask = inputs["input_ids"] == hf_model.config.image_token_id
        return {**keywords, DEEPSTACK: DeepstackTerms(mask, features)}
