"""The Q-Former as mmlens's adapter stage: learned queries that read the image by cross-attention.

A Q-Former block is a BERT block (post-norm: each sublayer's output joins the residual, then a
LayerNorm): self-attention over the queries, every `cross_attention_frequency`-th block a
cross-attention whose keys and values are the vision tower's output (CLS and patches), then the
queries' MLP. The points follow TransformerLens's post-norm (BERT) and cross-attention (T5) blocks:
`hook_resid_pre`, `attn.*`, `hook_attn_out`, `hook_resid_mid` (the sum before `ln1`), `cross_attn.*`,
`hook_cross_attn_out`, `hook_resid_mid_cross` (before `ln_cross`), `mlp.*`, `hook_mlp_out`,
`hook_resid_post` (before `ln2`, whose `hook_normalized` is the block's output). `cross_attn`'s
pattern is [image, head, query, vision position]: which patches each query reads.

InstructBLIP's Q-Former also reads the instruction: its sequence is the queries then the text. The
self-attention covers both (with the text's padding mask); the cross-attention and `mlp` / `ln2`
the queries alone, while the text rows have an MLP and LayerNorm of their own (`mlp_text`,
`ln2_text`); `hook_mlp_out` and `hook_resid_post` hold every row, queries first.
"""

from __future__ import annotations

from typing import Any, Callable

import einops
import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ....errors import UnsupportedModelError
from ...hook_tree import AttentionHooks, HookGroup, MLPHooks, NormHooks, fire, is_hooked
from ...runtime.devices import bare_forward
from ...runtime.instrument import _override_forward, apply_attention_mask
from ...runtime.norms import instrument_norm


class QFormerBlockHooks(HookGroup):
    """One Q-Former block's points (see the module docstring); `cross_attn` and `ln_cross` only in
    blocks that cross-attend to the image, `mlp_text` and `ln2_text` only where text rows are read."""

    def __init__(self, cross_attention: bool, text: bool = False):
        super().__init__("hook_resid_pre", "hook_attn_out", "hook_resid_mid",
                         *(["hook_cross_attn_out", "hook_resid_mid_cross"] if cross_attention else []),
                         "hook_mlp_out", "hook_resid_post")
        self.attn, self.ln1 = AttentionHooks(rotary=False), NormHooks()
        if cross_attention:
            self.cross_attn, self.ln_cross = AttentionHooks(rotary=False), NormHooks()
        self.mlp, self.ln2 = MLPHooks(gated=False), NormHooks()
        if text:
            self.mlp_text, self.ln2_text = MLPHooks(gated=False), NormHooks()
        # checked on every forward: walking the module tree each time cost more than the checks
        self._points = [m for m in self.modules() if isinstance(m, HookPoint)]

    def any_point_hooked(self) -> bool:
        return any(is_hooked(point) for point in self._points)


def _attention(module: nn.Module, output: nn.Module, hooks: AttentionHooks, use_result: Callable[[], bool]):
    """`(queries_from, keys_from, mask) -> sublayer output before its LayerNorm's residual`: the
    eager maths of `Blip2QFormerMultiHeadAttention` then its output projection (`output.dense`)."""
    d_head = module.attention_head_size
    hooks.bind_attention(_QFormerLinears(module, output.dense, d_head), "q", "k", "v", "o")

    def heads(x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], -1, d_head)

    def run(states: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        q = fire(hooks.hook_q, heads(module.query(states))).transpose(1, 2)
        k = fire(hooks.hook_k, heads(module.key(context))).transpose(1, 2)
        v = fire(hooks.hook_v, heads(module.value(context))).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * module.scaling
        scores = fire(hooks.hook_attn_scores, apply_attention_mask(scores, mask, is_causal=False))
        pattern = fire(hooks.hook_pattern, nn.functional.softmax(scores, dim=-1))
        z = fire(hooks.hook_z, torch.matmul(pattern, v).transpose(1, 2).contiguous())
        if use_result() and is_hooked(hooks.hook_result):
            w_o = einops.rearrange(output.dense.weight, "m (h d) -> h d m", d=d_head)
            return hooks.hook_result(einops.einsum(z, w_o, "b s h d, h d m -> b s h m")).sum(-2) + output.dense.bias
        return output.dense(z.flatten(-2))

    return run


class _QFormerLinears:
    """The projections the weight surface reads (`W_Q` ... `W_O`), named as it asks."""

    def __init__(self, module: nn.Module, o: nn.Linear, d_head: int):
        self.q, self.k, self.v, self.o, self.head_dim = module.query, module.key, module.value, o, d_head


def instrument_qformer_block(layer: nn.Module, hooks: QFormerBlockHooks, use_result: Callable[[], bool]) -> None:
    """Hook a `Blip2QFormerLayer` or `InstructBlipQFormerLayer` (queries, then any instruction text)."""
    self_attention = _attention(layer.attention.attention, layer.attention.output, hooks.attn, use_result)
    instrument_norm(layer.attention.output.LayerNorm, hooks.ln1, "LN")
    cross_attention = None
    if layer.has_cross_attention:
        cross = layer.crossattention
        cross_attention = _attention(cross.attention, cross.output, hooks.cross_attn, use_result)
        instrument_norm(cross.output.LayerNorm, hooks.ln_cross, "LN")
    fc1, fc2 = layer.intermediate_query.dense, layer.output_query.dense
    act = layer.intermediate_query.intermediate_act_fn
    hooks.mlp.bind_mlp(_QueryMlp(fc1, fc2), gated=False)
    instrument_norm(layer.output_query.LayerNorm, hooks.ln2, "LN")
    text_mlp = _text_feed_forward(layer, hooks) if hasattr(hooks, "mlp_text") else None
    original = bare_forward(layer)

    def forward(hidden_states: Tensor, attention_mask: Tensor | None = None, encoder_hidden_states: Tensor | None = None,
                encoder_attention_mask: Tensor | None = None, query_length: int = 0, **kwargs: Any) -> Tensor:
        if not hooks.any_point_hooked():
            return original(hidden_states, attention_mask, encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask, query_length=query_length, **kwargs)
        has_text = query_length < hidden_states.shape[1]
        if has_text and text_mlp is None:
            raise UnsupportedModelError(f"this Q-Former block got {hidden_states.shape[1] - query_length} text rows "
                                        "beside its queries but was hooked for queries alone")
        resid_pre = fire(hooks.hook_resid_pre, hidden_states)
        attn_out = fire(hooks.hook_attn_out, self_attention(resid_pre, resid_pre, attention_mask))
        x = layer.attention.output.LayerNorm(fire(hooks.hook_resid_mid, resid_pre + attn_out))
        queries, text = x[:, :query_length], x[:, query_length:]
        if cross_attention is not None:
            cross_out = fire(hooks.hook_cross_attn_out, cross_attention(queries, encoder_hidden_states, encoder_attention_mask))
            queries = layer.crossattention.output.LayerNorm(fire(hooks.hook_resid_mid_cross, queries + cross_out))
        pre = fire(hooks.mlp.hook_pre, fc1(queries))
        mlp_out = fc2(fire(hooks.mlp.hook_post, act(pre)))
        if has_text:
            x, mlp_out = torch.cat([queries, text], dim=1), torch.cat([mlp_out, text_mlp(text)], dim=1)
        else:
            x = queries
        resid_post = fire(hooks.hook_resid_post, x + fire(hooks.hook_mlp_out, mlp_out))
        out = layer.output_query.LayerNorm(resid_post[:, :query_length])
        return torch.cat([out, layer.output.LayerNorm(resid_post[:, query_length:])], dim=1) if has_text else out

    _override_forward(layer, forward)


def _text_feed_forward(layer: nn.Module, hooks: QFormerBlockHooks) -> Callable[[Tensor], Tensor]:
    """The text rows' MLP (`intermediate`, `output`) with `mlp_text`'s points; its LayerNorm (`ln2_text`)
    is hooked in place and runs after the residual sum."""
    fc1, fc2, act = layer.intermediate.dense, layer.output.dense, layer.intermediate.intermediate_act_fn
    hooks.mlp_text.bind_mlp(_QueryMlp(fc1, fc2), gated=False)
    instrument_norm(layer.output.LayerNorm, hooks.ln2_text, "LN")
    return lambda x: fc2(fire(hooks.mlp_text.hook_post, act(fire(hooks.mlp_text.hook_pre, fc1(x)))))


class _QueryMlp:
    """The queries' MLP as the weight surface reads one (`fc1`, `fc2`): Hugging Face keeps its two
    linears in two modules (`intermediate_query`, `output_query`)."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear):
        self.fc1, self.fc2 = fc1, fc2
