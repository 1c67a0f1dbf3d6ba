"""Hooking a gated-delta-rule token mixer (Qwen3.5's linear attention) in place.

A gated delta net keeps one state matrix per value head instead of attending over keys: each
token's q, k and v come from one projection through a short causal depthwise convolution; the state
decays by exp(g) (g = -exp(A_log) * softplus(a + dt_bias)), forgets what it held under k and writes
v there with strength beta = sigmoid(b) (the delta rule), and q reads it out; a gated RMSNorm
(norm(o) * silu(z)) and `out_proj` give the block's output. While no hook listens Hugging Face's
forward runs; otherwise the same steps run here, through the modelling file's own functions (its
causal convolution and chunked or recurrent delta rule, or the hub kernels they dispatch to), with
TransformerLens's hook points between them. The per-step state is never materialised by those
functions, so it has no hook point; the block's output is `hook_attn_out`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import InputError, UnsupportedModelError
from ..hook_tree import LinearAttentionHooks, fire
from .devices import bare_forward

# the modelling file's functions the forward calls (module-level since transformers 5.15)
_KERNELS = ("apply_mask_to_padding_states", "causal_conv1d_fn", "causal_conv1d_update",
            "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")


@dataclass(frozen=True)
class LinearAttentionSpec:
    """Where a block keeps its gated delta net (`module`) and that keeps its parts (Qwen3.5's names:
    separate q/k/v, z, b and a projections)."""

    module: str = "linear_attn"
    qkv: str = "in_proj_qkv"
    z: str = "in_proj_z"
    b: str = "in_proj_b"
    a: str = "in_proj_a"
    conv: str = "conv1d"
    norm: str = "norm"
    out: str = "out_proj"


def _kernels(module: nn.Module) -> dict[str, Callable]:
    source = sys.modules[type(module).__module__]
    missing = [name for name in _KERNELS if not hasattr(source, name)]
    if missing:
        raise UnsupportedModelError(
            f"{type(module).__name__}: its modelling file {source.__name__} has no {', '.join(missing)}, which mmlens "
            "calls to recompute the gated delta rule with hooks; this transformers version is not supported "
            "(use transformers >= 5.15)"
        )
    return {name: getattr(source, name) for name in _KERNELS}


def call_linear_attention(module: nn.Module, hidden_states: Tensor, layer_kwargs: dict[str, Any]) -> Tensor:
    """Call the mixer as Hugging Face's decoder layer does, from that layer's keywords."""
    packed = sorted(k for k in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx") if layer_kwargs.get(k) is not None)
    if packed:
        raise InputError(f"a hooked linear-attention block given packed sequences ({', '.join(packed)}): mmlens runs "
                         "padded batches; pass an attention mask instead of packing the rows")
    return module(hidden_states=hidden_states, cache_params=layer_kwargs.get("past_key_values"),
                  attention_mask=layer_kwargs.get("attention_mask"))


def linear_attention_forward(module: nn.Module, hooks: LinearAttentionHooks, spec: LinearAttentionSpec) -> Callable:
    """The instance forward of a hooked gated delta net: Hugging Face's own while nothing listens,
    else its steps (cached decoding included) with `hooks` firing between them."""
    original = bare_forward(module)
    kernels = _kernels(module)
    qkv, z_proj, b_proj, a_proj, conv, norm, out_proj = (
        getattr(module, n) for n in (spec.qkv, spec.z, spec.b, spec.a, spec.conv, spec.norm, spec.out))
    key_dim, value_dim = module.key_dim, module.value_dim
    head_k, head_v, layer = module.head_k_dim, module.head_v_dim, module.layer_idx

    def convolve(mixed: Tensor, cache: Any, seq: int, kwargs: dict[str, Any]) -> Tensor:
        """The causal convolution over [batch, channels, seq], updating a cache as Hugging Face does."""
        weight = conv.weight.squeeze(1)
        conv_state = cache.get_conv_state(layer, state_idx=0) if cache is not None else None
        if conv_state is not None and seq == 1 and not cache.is_recording_past(layer):
            return kernels["causal_conv1d_update"](mixed, conv_state, weight, conv.bias, module.activation)
        if cache is not None:
            mixed = cache.update_conv_state(mixed, layer, conv_kernel_size=module.conv_kernel_size)
        mixed = kernels["causal_conv1d_fn"](mixed, weight, conv.bias, activation=module.activation, **kwargs)
        return mixed if cache is None else mixed[:, :, -seq:]

    def forward(hidden_states: Tensor, cache_params: Any = None, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        if not hooks.any_hooked():
            return original(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        hidden_states = kernels["apply_mask_to_padding_states"](hidden_states, attention_mask)
        batch, seq, _ = hidden_states.shape
        shapes = ((key_dim, head_k), (key_dim, head_k), (value_dim, head_v))
        parts = torch.split(qkv(hidden_states), [width for width, _ in shapes], dim=-1)
        parts = [fire(point, x.reshape(batch, seq, -1, d)).reshape(batch, seq, -1) for point, x, (_, d) in
                 zip((hooks.hook_q_pre_conv, hooks.hook_k_pre_conv, hooks.hook_v_pre_conv), parts, shapes)]
        mixed = convolve(torch.cat(parts, dim=-1).transpose(1, 2), cache_params, seq, kwargs).transpose(1, 2)
        q, k, v = (fire(point, x.reshape(batch, seq, -1, d)) for point, x, (_, d) in
                   zip((hooks.hook_q, hooks.hook_k, hooks.hook_v), torch.split(mixed, [w for w, _ in shapes], dim=-1), shapes))
        beta = fire(hooks.hook_beta, fire(hooks.hook_beta_logit, b_proj(hidden_states)).sigmoid())
        # in float32 as Hugging Face computes it (A_log.exp() overflows half precision)
        decay = fire(hooks.hook_log_decay, -module.A_log.float().exp() * F.softplus(a_proj(hidden_states).float() + module.dt_bias))
        recurrent_state = cache_params.get_recurrent_state(layer, state_idx=0) if cache_params is not None else None
        rule = "torch_recurrent_gated_delta_rule" if recurrent_state is not None and seq == 1 else "torch_chunk_gated_delta_rule"
        out, last_state = kernels[rule](q, k, v, g=decay, beta=beta, initial_state=recurrent_state,
                                        output_final_state=cache_params is not None, use_qk_l2norm_in_kernel=True,
                                        cu_seqlens=kwargs.pop("cu_seq_lens_q", None), **kwargs)
        if cache_params is not None:
            cache_params.update_recurrent_state(last_state, layer)
        out = fire(hooks.hook_recurrence_out, out)
        gate = fire(hooks.hook_gate_input, z_proj(hidden_states).reshape(batch, seq, -1, head_v))
        normed = norm(out.reshape(-1, head_v), gate.reshape(-1, head_v)).reshape(batch, seq, -1)
        return out_proj(normed)

    return forward
