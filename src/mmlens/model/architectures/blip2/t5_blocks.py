"""T5's blocks (BLIP-2's and InstructBLIP's Flan-T5 LLM), hooked with TransformerLens's T5 names.

A T5 block is pre-norm with RMS norms that do not subtract the mean (`T5LayerNorm`): self-attention,
in the decoder then a cross-attention to the encoder's output, then the MLP (gated GELU in Flan-T5:
`wi_0` the gate, `wi_1` the up projection, `wo`). Attention scores are not scaled; instead a learned
bias per head and relative-position bucket (bidirectional buckets in the encoder, causal in the
decoder) is added to them before the mask. The first block of each stack computes that bias and
hands it to the others, so the hooked maths takes it as given, as Hugging Face does. The points
follow TL's `HookedEncoderDecoder`: an encoder block's are a pre-norm block's (`ln1`, `attn`, `ln2`,
`mlp`); a decoder block adds `ln2` / `cross_attn` / `hook_cross_attn_out` / `hook_resid_mid_cross`
between the self-attention and the MLP, whose norm is then `ln3`. `attn.hook_attn_scores` holds the
scores with the position bias and the mask added.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import einops
import torch
from torch import Tensor, nn

from ....errors import UnsupportedModelError
from ...hook_contract import CheckedHookPoint
from ...hook_tree import AttentionHooks, BlockHooks, HookGroup, MLPHooks, NormHooks, fire, is_hooked
from ...runtime.devices import bare_forward
from ...runtime.instrument import _argument_names, _override_forward, apply_attention_mask
from ...runtime.layer_runs import Z_JOIN, first_rows
from ...runtime.norms import instrument_norm


class T5DecoderBlockHooks(BlockHooks):
    """A decoder block's points: a pre-norm block's, with the cross-attention's between the
    self-attention and the MLP under TL's names (`ln2` its norm, `ln3` the MLP's)."""

    def __init__(self, gated_mlp: bool):
        super().__init__(rotary=False, gated_mlp=gated_mlp)
        self.cross_attn, self.ln3 = AttentionHooks(rotary=False), NormHooks()
        for name in ("hook_cross_attn_out", "hook_resid_mid_cross"):
            setattr(self, name, CheckedHookPoint())
            self._own_points.append(getattr(self, name))

    def __getattr__(self, name: str):
        if name == "attn":  # a self-attention beside the cross-attention, unlike Mllama's cross-attention blocks
            return self._modules["attn"]
        return super().__getattr__(name)


class T5DecoderHooks(HookGroup):
    """The decoder stage: `hook_embed` (the answer tokens' embeddings) and `blocks.{l}`; its final norm
    is the model's `ln_final`, which the unembedding reads."""

    def __init__(self, n_layers: int, gated_mlp: bool):
        super().__init__("hook_embed")
        self.blocks = nn.ModuleList(T5DecoderBlockHooks(gated_mlp) for _ in range(n_layers))


def _clamped(x: Tensor) -> Tensor:
    """Hugging Face's guard after each T5 sublayer in float16: infinities clamped to the largest finite value."""
    if x.dtype != torch.float16:
        return x
    limit = torch.where(torch.isinf(x).any(), torch.finfo(x.dtype).max - 1000, torch.finfo(x.dtype).max)
    return torch.clamp(x, min=-limit, max=limit)


def instrument_t5_attention(attn: nn.Module, hooks: AttentionHooks, use_result: Callable[[], bool]) -> None:
    """Hook a `T5Attention` (self- or cross-attention): `(hidden, mask, key_value_states, position_bias)`
    -> `(output, position_bias, None)` with the eager maths in between, the bias computed as Hugging
    Face computes it where none is handed in (the stack's first block). Rows may join at `hook_z`
    (`growing_batch`), as in every instrumented attention."""
    original = bare_forward(attn)
    d_head = attn.key_value_proj_dim
    hooks.bind_attention(SimpleNamespace(q=attn.q, k=attn.k, v=attn.v, o=attn.o, head_dim=d_head), "q", "k", "v", "o")

    def heads(x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], -1, d_head)

    def bias(q_len: int, k_len: int, like: Tensor) -> Tensor:
        if attn.has_relative_attention_bias:
            return attn.compute_bias(q_len, k_len, device=like.device)
        return torch.zeros(1, attn.n_heads, q_len, k_len, device=like.device, dtype=like.dtype)

    def attend(hidden_states: Tensor, source: Tensor, mask: Tensor | None, position_bias: Tensor) -> Tensor:
        """z, before `hook_z` fires."""
        q = fire(hooks.hook_q, heads(attn.q(hidden_states))).transpose(1, 2)
        k = fire(hooks.hook_k, heads(attn.k(source))).transpose(1, 2)
        v = fire(hooks.hook_v, heads(attn.v(source))).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + position_bias
        scores = fire(hooks.hook_attn_scores, apply_attention_mask(scores, mask, attn.is_causal))
        pattern = fire(hooks.hook_pattern, nn.functional.softmax(scores, dim=-1))
        return torch.matmul(pattern, v).transpose(1, 2).contiguous()

    def project(z: Tensor) -> Tensor:
        z = fire(hooks.hook_z, z)
        if use_result() and is_hooked(hooks.hook_result):
            w_o = einops.rearrange(attn.o.weight, "m (h d) -> h d m", d=d_head)
            return hooks.hook_result(einops.einsum(z, w_o, "b s h d, h d m -> b s h m")).sum(-2)
        return attn.o(z.flatten(-2))

    def forward(hidden_states: Tensor, mask: Tensor | None = None, key_value_states: Tensor | None = None,
                position_bias: Tensor | None = None, past_key_values: Any = None, **kwargs: Any):
        join = getattr(attn, Z_JOIN)
        if join is None and not hooks.any_hooked():
            return original(hidden_states, mask, key_value_states, position_bias, past_key_values, **kwargs)
        if past_key_values is not None:
            raise UnsupportedModelError(
                f"a hooked {type(attn).__name__} with a key cache: T5 reads its keys from the cache while it generates "
                "token by token, which the hooked maths does not. Hook a forward on given decoder_input_ids instead")
        source = hidden_states if key_value_states is None else key_value_states
        if position_bias is None:
            position_bias = bias(hidden_states.shape[1], source.shape[1], hidden_states)
        if join is None:
            return project(attend(hidden_states, source, mask, position_bias)), position_bias, None
        computed, fill = join  # only the first `computed` rows attend; the rest join at hook_z
        rows = hidden_states.shape[0]
        z = attend(hidden_states[:computed], source[:computed], first_rows(mask, rows, computed),
                   position_bias) if computed else None
        return project(fill(z)), position_bias, None

    setattr(attn, Z_JOIN, None)
    _override_forward(attn, forward)


def instrument_t5_mlp(mlp: nn.Module, hooks: MLPHooks, gated: bool) -> None:
    """Hook `T5DenseGatedActDense` (`wi_0` gate, `wi_1` up, `wo`) or `T5DenseActDense` (`wi`, `wo`)."""
    original = bare_forward(mlp)
    if gated:
        hooks.bind_mlp(SimpleNamespace(gate_proj=mlp.wi_0, up_proj=mlp.wi_1, down_proj=mlp.wo), gated=True)
    else:
        hooks.bind_mlp(SimpleNamespace(fc1=mlp.wi, fc2=mlp.wo), gated=False)

    def forward(x: Tensor) -> Tensor:
        if not hooks.any_hooked():
            return original(x)
        if gated:
            pre = fire(hooks.hook_pre, mlp.wi_0(x))
            post = fire(hooks.hook_post, mlp.act(pre) * fire(hooks.hook_pre_linear, mlp.wi_1(x)))
        else:
            post = fire(hooks.hook_post, mlp.act(fire(hooks.hook_pre, mlp.wi(x))))
        # Flan-T5 keeps `wo` in float32 beside a half-precision model, as Hugging Face casts for it
        return mlp.wo(post.to(mlp.wo.weight.dtype) if post.dtype != mlp.wo.weight.dtype else post)

    _override_forward(mlp, forward)


def instrument_t5_block(layer: nn.Module, hooks: BlockHooks, gated: bool, use_result: Callable[[], bool]) -> None:
    """Hook one `T5Block` (encoder: `BlockHooks`; decoder: `T5DecoderBlockHooks`) and its sublayers."""
    self_attention, feed_forward = layer.layer[0], layer.layer[-1]
    cross = layer.layer[1] if layer.is_decoder else None
    instrument_norm(self_attention.layer_norm, hooks.ln1, "RMS")
    instrument_t5_attention(self_attention.SelfAttention, hooks.attn, use_result)
    mlp_norm = hooks.ln3 if cross is not None else hooks.ln2
    if cross is not None:
        instrument_norm(cross.layer_norm, hooks.ln2, "RMS")
        instrument_t5_attention(cross.EncDecAttention, hooks.cross_attn, use_result)
    instrument_norm(feed_forward.layer_norm, mlp_norm, "RMS")
    instrument_t5_mlp(feed_forward.DenseReluDense, hooks.mlp, gated)
    if cross is None:
        hooks.bind_outputs(layer, None)
    original = bare_forward(layer)
    names = _argument_names(layer)

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any):
        if not hooks.residual_hooked():
            return original(hidden_states, *args, **kwargs)
        kwargs.update(zip(names, args))
        resid_pre = fire(hooks.hook_resid_pre, hidden_states)
        attn_out, self_bias, _ = self_attention.SelfAttention(
            self_attention.layer_norm(resid_pre), mask=kwargs.get("attention_mask"),
            position_bias=kwargs.get("position_bias"), past_key_values=kwargs.get("past_key_values"))
        x = _clamped(fire(hooks.hook_resid_mid, resid_pre + fire(hooks.hook_attn_out, attn_out)))
        cross_bias, encoder_states = None, kwargs.get("encoder_hidden_states")
        if cross is not None and encoder_states is not None:
            cross_out, cross_bias, _ = cross.EncDecAttention(
                cross.layer_norm(x), mask=kwargs.get("encoder_attention_mask"), key_value_states=encoder_states,
                position_bias=kwargs.get("encoder_decoder_position_bias"), past_key_values=kwargs.get("past_key_values"))
            x = _clamped(fire(hooks.hook_resid_mid_cross, x + fire(hooks.hook_cross_attn_out, cross_out)))
        mlp_out = fire(hooks.hook_mlp_out, feed_forward.DenseReluDense(feed_forward.layer_norm(x)))
        return _clamped(fire(hooks.hook_resid_post, x + mlp_out)), self_bias, cross_bias

    _override_forward(layer, forward)


def skipped_t5_block(layer: nn.Module) -> Callable[..., tuple]:
    """What a T5 block returns when a run starts at a later block (`start_at_layer`): its input, and the
    relative position bias the blocks after it read, computed by the stack's first block as Hugging Face
    does (the blocks after it have no bias table of their own)."""
    attention = layer.layer[0].SelfAttention

    def passed_through(hidden_states: Tensor, attention_mask: Any = None, position_bias: Tensor | None = None,
                       *args: Any, **kwargs: Any) -> tuple:
        if position_bias is None and attention.has_relative_attention_bias:
            length = hidden_states.shape[1]
            position_bias = attention.compute_bias(length, length, device=hidden_states.device)
        return hidden_states, position_bias, None

    return passed_through
