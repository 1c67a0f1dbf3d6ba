"""What Llama 4's attentions do to queries and keys before the scores: complex rotary, L2 q/k norms
and NoPE temperature tuning.

Both of Llama 4's attentions rotate queries and keys as complex numbers (`apply_rotary_emb` on the
LLM's `freqs_cis`, `vision_apply_rotary_emb` on the tower's 2-D `freqs_ci`) before the head transpose,
and the LLM's differ by layer: a rotary ("RoPE") layer normalises each rotated head's query and key
to unit RMS (`qk_norm`, an L2 norm without weight), a NoPE layer (`no_rope_layers`) skips both and,
with `attn_temperature_tuning`, scales each query by `1 + attn_scale * log(1 + floor((pos + 1) /
floor_scale))`. Each is an `AttentionSpec.position_step`, so the shared hooked attention runs them
with the usual points: `hook_rot_q` / `hook_rot_k` hold the query and key as they enter the scores
(rotated and normalised on a rotary layer, temperature-scaled on a NoPE one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.llama4.modeling_llama4 import apply_rotary_emb, vision_apply_rotary_emb


def text_position_step(attn: nn.Module, q: Tensor, k: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """A text layer's step, as `Llama4TextAttention.forward` takes it."""
    if attn.use_rope:
        q, k = apply_rotary_emb(q, k, kwargs["position_embeddings"].to(q.device))
    if hasattr(attn, "qk_norm"):
        q, k = attn.qk_norm(q), attn.qk_norm(k)
    if attn.attn_temperature_tuning and not attn.use_rope:
        cache = kwargs.get("past_key_values")
        seen = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
        positions = torch.arange(q.shape[1], device=q.device) + seen
        scales = torch.log1p(torch.floor((positions.float() + 1.0) / attn.floor_scale)) * attn.attn_scale + 1.0
        q = (q * scales.view(1, -1, 1, 1).expand(q.shape[0], -1, 1, 1)).to(q.dtype)
    return q, k


def vision_position_step(_attn: nn.Module, q: Tensor, k: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The tower's step: its 2-D rotary over the patches and the CLS token (`freqs_ci`)."""
    return vision_apply_rotary_emb(q, k, freqs_ci=kwargs["freqs_ci"])
