"""Cohere2's decoder blocks, the LLM of Aya Vision and Cohere2-Vision: parallel blocks with rotary
only on the sliding-window layers.

Each block normalises its input once (a LayerNorm without bias) and adds attention and MLP of that
same normalised input to the residual, `x + attn(ln(x)) + mlp(ln(x))`: TransformerLens's
`parallel_attn_mlp`, so the block has no `hook_resid_mid` and no `ln2`. Sliding-window layers rotate
queries and keys (Cohere's rotary pairs adjacent channels, `rotate_half` on interleaved pairs; the
family module's own `apply_rotary_pos_emb` runs); full-attention layers have no positional embedding
at all. `logit_scale` is applied only by `Cohere2ForCausalLM`: the multimodal classes' `lm_head`
logits are unscaled, and so are ours.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from ...config import StageConfig
from ...runtime.instrument import AttentionSpec, BlockSpec
from ..bridge_aliases import LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES
from ..llava import Llava


def rotary_on_sliding_layers(attn: nn.Module, q: Tensor, k: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """`Cohere2Attention`'s position step (q, k as [batch, seq, head, d_head]): its interleaved rotary
    on a sliding-window layer, nothing on a full-attention one (`sliding_window` is None there)."""
    if attn.sliding_window is None:
        return q, k
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    cos, sin = kwargs["position_embeddings"]
    q, k = rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2)


COHERE2_BLOCK = BlockSpec(
    ln1="input_layernorm",
    attn="self_attn",
    ln2="input_layernorm",  # unused: a parallel block's MLP reads ln1's output
    mlp="mlp",
    gated_mlp=True,
    attention=AttentionSpec(position_step=rotary_on_sliding_layers),
    parallel_attention_mlp=True,
)


# TL 4.3's Cohere2 adapter (the LLM alone; its bridge wraps neither multimodal class) builds each block
# as a ParallelBlockBridge: Llama's names, without ln2 or hook_resid_mid, which a parallel block lacks
COHERE2_BRIDGE_ALIASES = (*(a for a in LLM_ALIASES if ".ln2." not in a.ours.text), *LLM_BRANCH_OUTPUT_ALIASES)


def cohere2_llm_config(tc: Any) -> StageConfig:
    """Llama's sizes with Cohere2's LayerNorm and parallel blocks."""
    return replace(Llava.llm_config(tc), normalization_type="LN", parallel_attn_mlp=True)
