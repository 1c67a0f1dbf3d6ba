"""Vision towers the LLaVA-style families take, by Hugging Face `model_type`: where each keeps its
blocks and norms, whether it has a CLS token, and its block spec.

CLIP and SigLIP are pre-norm blocks `x + attn(ln1(x))`, `+ mlp(ln2(.))`; DINOv2 adds a learned
per-channel layer scale to each branch and may use a SwiGLU MLP, and its registers variant puts
register tokens between the CLS token and the patches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..runtime.instrument import AttentionSpec, BlockSpec

CLIP_BLOCK = BlockSpec(
    ln1="layer_norm1",
    attn="self_attn",
    ln2="layer_norm2",
    mlp="mlp",
    gated_mlp=False,
    attention=AttentionSpec(o="out_proj", scaling="scale", rotary=False),
)


def _dinov2_block(vision_config: Any) -> BlockSpec:
    return BlockSpec(
        ln1="norm1",
        attn="attention",
        ln2="norm2",
        mlp="mlp",
        gated_mlp=bool(getattr(vision_config, "use_swiglu_ffn", False)),
        attention=AttentionSpec(rotary=False),
        layer_scale=("layer_scale1", "layer_scale2"),
    )


@dataclass(frozen=True)
class Tower:
    has_cls: bool
    layers: str  # path from the tower to its blocks
    post_norm: str  # the norm after the last block (what `last_hidden_state` passes through)
    block: Callable[[Any], BlockSpec]  # vision config -> spec of every block
    pre_norm: str | None = None  # a norm between embeddings and the first block (CLIP)
    registers: str | None = None  # the vision config's number of register tokens (after the CLS token)


TOWERS = {
    "clip_vision_model": Tower(True, "encoder.layers", "post_layernorm", lambda _c: CLIP_BLOCK, pre_norm="pre_layrnorm"),
    "siglip_vision_model": Tower(False, "encoder.layers", "post_layernorm", lambda _c: CLIP_BLOCK),
    "dinov2": Tower(True, "encoder.layer", "layernorm", _dinov2_block),
    "dinov2_with_registers": Tower(True, "encoder.layer", "layernorm", _dinov2_block, registers="num_register_tokens"),
}
