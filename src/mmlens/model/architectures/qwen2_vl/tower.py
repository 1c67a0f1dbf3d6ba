"""Hooks for the Qwen2-VL / Qwen2.5-VL vision tower: one packed sequence of every image's patches.

The tower runs all images of a batch as one sequence `[n_patches_total, d]`; attention is
block-diagonal, split by `cu_seqlens` (one block per image, or per window in Qwen2.5-VL's
windowed blocks), with a fused `qkv` projection and a 2-D rotary embedding. Hook points see the
packed sequence with a batch dimension of one, in the tower's own order (Qwen2.5-VL reorders the
patches window by window before the first block): residuals `[1, n_patches, d]`, attention
scores and pattern `[1, heads, n_patches, n_patches]` with every edge between two blocks at the
dtype's minimum before the softmax (so exactly zero after it), as Hugging Face's per-block
attention has it. The patch merger (`ln_q` = `vision.ln_post`, then an MLP on each 2x2 group) is
the adapter; its hook points are in the LLM's image-token order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import einops
import torch
from jaxtyping import Bool, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ...hook_tree import AdapterHooks, AttentionHooks, BlockHooks, NormHooks, fire, is_hooked
from ...runtime.devices import bare_forward, weights_present
from ...runtime.instrument import _argument_names, _override_forward, instrument_mlp
from ...runtime.norms import NormKind, instrument_norm
from ...weights import FusedSlice


def block_diagonal(cu_seqlens: Int[Tensor, "n_blocks_plus_1"], length: int) -> Bool[Tensor, "length length"]:
    """True where two positions of a packed sequence fall in the same `cu_seqlens` block."""
    block = torch.bucketize(torch.arange(length, device=cu_seqlens.device), cu_seqlens[1:].long(), right=True)
    return block[:, None] == block[None, :]


def _spans(cu_seqlens: Int[Tensor, "n_blocks_plus_1"]) -> list[tuple[int, int]]:
    """(start, end) of each image's block in the packed sequence."""
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _points(group: nn.Module) -> list[HookPoint]:
    return [m for m in group.modules() if isinstance(m, HookPoint)]


def _any(points: list[HookPoint]) -> bool:
    return any(p._forward_hooks or p._backward_hooks for p in points)


def instrument_packed_attention(
    attn: nn.Module, hooks: AttentionHooks, use_result: Callable[[], bool], rotary: bool = True
) -> None:
    """Hugging Face's code while nothing listens; else the eager maths over the whole packed
    sequence with the block-diagonal mask, firing TL's attention points. `rotary=False` is a spec
    that forgets the 2-D rotary embedding (which loading refuses)."""
    original = bare_forward(attn)
    rotate = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision") if rotary else None
    d_head, n_heads = attn.head_dim, attn.num_heads
    hooks._weight_source = (*(FusedSlice(attn.qkv, i, 3) for i in range(3)), attn.proj, d_head)  # views of q, k, v

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not hooks.any_hooked():
            return original(hidden_states, *args, **kwargs)
        kwargs.update(zip(("cu_seqlens", "position_embeddings"), args))
        length = hidden_states.shape[0]
        q, k, v = attn.qkv(hidden_states).reshape(length, 3, n_heads, d_head).permute(1, 0, 2, 3).unbind(0)
        q, k, v = (fire(point, x[None])[0] for point, x in ((hooks.hook_q, q), (hooks.hook_k, k), (hooks.hook_v, v)))
        if rotate is not None:
            q, k = rotate(q, k, *kwargs["position_embeddings"])
        q = fire(hooks.hook_rot_q, q[None])
        k = fire(hooks.hook_rot_k, k[None])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v[None].transpose(1, 2)  # [1, heads, n, d_head]
        if is_hooked(hooks.hook_attn_scores) or is_hooked(hooks.hook_pattern):
            # the packed matrices, the other images' entries at the dtype's minimum (exactly zero after the
            # softmax), so that what the hooks see or write is what the rest of the attention reads
            scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
            same_block = block_diagonal(kwargs["cu_seqlens"], length)
            scores = fire(hooks.hook_attn_scores, scores.masked_fill(~same_block, torch.finfo(scores.dtype).min))
            pattern = fire(hooks.hook_pattern, nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
            z = torch.matmul(pattern, v)
        else:  # nobody reads the matrices: each image attends within its own block, as Hugging Face computes it
            blocks = []
            for start, end in _spans(kwargs["cu_seqlens"]):
                block_scores = torch.matmul(q[..., start:end, :], k[..., start:end, :].transpose(2, 3)) * attn.scaling
                block_pattern = nn.functional.softmax(block_scores, dim=-1, dtype=torch.float32).to(q.dtype)
                blocks.append(torch.matmul(block_pattern, v[..., start:end, :]))
            z = torch.cat(blocks, dim=2)
        z = fire(hooks.hook_z, z.transpose(1, 2).contiguous())  # [1, n, heads, d_head]
        if use_result() and is_hooked(hooks.hook_result):
            with weights_present(attn.proj):  # an offloaded proj holds meta tensors outside its forward
                w_o = einops.rearrange(attn.proj.weight, "m (h d) -> h d m", d=d_head)
                result = hooks.hook_result(einops.einsum(z, w_o, "b s h d, h d m -> b s h m"))
                out = result.sum(dim=-2)[0]
                return out if attn.proj.bias is None else out + attn.proj.bias  # GLM-4V's proj has none
        return attn.proj(z.reshape(length, -1))

    _override_forward(attn, forward)


def instrument_packed_block(
    layer: nn.Module, hooks: BlockHooks, gated_mlp: bool, use_result: Callable[[], bool], norm: NormKind,
    rotary: bool = True,
) -> None:
    """A pre-norm vision block `x + attn(norm1(x))`, `+ mlp(norm2(.))` on the packed sequence. The
    block is taken apart whenever any of its points listens, so that its norms and MLP fire with
    the batch dimension of one like its residual points."""
    instrument_norm(layer.norm1, hooks.ln1, norm)
    instrument_norm(layer.norm2, hooks.ln2, norm)
    instrument_packed_attention(layer.attn, hooks.attn, use_result, rotary)
    instrument_mlp(layer.mlp, hooks.mlp, gated_mlp)
    original = bare_forward(layer)
    names = _argument_names(layer)
    points = _points(hooks)

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not _any(points):
            return original(hidden_states, *args, **kwargs)
        kwargs.update(zip(names, args))
        resid_pre = fire(hooks.hook_resid_pre, hidden_states[None])
        attn_out = fire(hooks.hook_attn_out, layer.attn(layer.norm1(resid_pre)[0], **kwargs)[None])
        resid_mid = fire(hooks.hook_resid_mid, resid_pre + attn_out)
        mlp_out = fire(hooks.hook_mlp_out, layer.mlp(layer.norm2(resid_mid)))
        return fire(hooks.hook_resid_post, resid_mid + mlp_out)[0]

    _override_forward(layer, forward)


def hook_first_block_input(block: nn.Module, point: HookPoint) -> torch.utils.hooks.RemovableHandle:
    """`vision.hook_embed`: the patch embeddings as the first block receives them (after
    Qwen2.5-VL's window reordering, so in the same order as every block)."""

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict):
        if not is_hooked(point):
            return None
        return (fire(point, args[0][None])[0], *args[1:]), kwargs

    return block.register_forward_pre_hook(pre_hook, with_kwargs=True)


def merger_parts(merger: nn.Module) -> tuple[nn.Module, nn.Linear, nn.Module, nn.Linear]:
    """(norm, first linear, activation, second linear) of a patch merger: Qwen2-VL's `ln_q` and
    `mlp`, or Qwen3-VL's `norm`, `linear_fc1`, `act_fn`, `linear_fc2`."""
    if hasattr(merger, "ln_q"):
        return (merger.ln_q, *merger.mlp)
    return merger.norm, merger.linear_fc1, merger.act_fn, merger.linear_fc2


def instrument_merger(
    merger: nn.Module, ln_post: NormHooks, adapter: AdapterHooks, norm: NormKind, llm_order: Callable[[], Tensor | None]
) -> None:
    """The 2x2 patch merger: `ln_q` (Qwen3-VL: `norm`) fires `vision.ln_post` on the packed sequence; `adapter.hook_in`
    is each group of merged patches concatenated (`[1, n_tokens, 4 d_vision]`), `hook_hidden` the
    MLP's hidden layer and `hook_out` what the LLM receives, all in the LLM's token order.
    `llm_order()` gives, for each LLM token, its group's index in the tower's order (None when the
    two orders agree); the output goes back to the tower's order, which Hugging Face then undoes."""
    ln_q, linear_1, act, linear_2 = merger_parts(merger)
    instrument_norm(ln_q, ln_post, norm)
    original = bare_forward(merger)
    points = list(adapter._own_points) + _points(ln_post)  # not Qwen3-VL's deepstack points under it

    def forward(x: Tensor) -> Tensor:
        if not _any(points):
            return original(x)
        grouped = ln_q(x[None]).reshape(1, -1, merger.hidden_size)
        order = llm_order()
        if order is not None:
            grouped = grouped[:, order]
        hidden = fire(adapter.hook_hidden, act(linear_1(fire(adapter.hook_in, grouped))))
        out = fire(adapter.hook_out, linear_2(hidden))
        if order is not None:
            out = out[:, torch.argsort(order)]
        return out[0]

    _override_forward(merger, forward)
