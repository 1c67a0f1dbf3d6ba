"""Hooking Hugging Face modules in place, without replacing them.

Each attention, MLP and pre-norm block gets an instance-level `forward` that runs the original
Hugging Face code untouched while none of its hook points listens, and otherwise recomputes the
same operations step by step (the eager attention maths, in the same order) with hook points in
between. Modules are never swapped, so Hugging Face's own output capturing (hidden states by
layer class) keeps working, and `restore` undoes everything.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Literal

import einops
import torch
from torch import Tensor, nn

from ...errors import UnsupportedModelError
from ..hook_tree import AttentionHooks, BlockHooks, MLPHooks, MoEHooks, fire, is_hooked
from ..weights import FusedSlice, ungated_linears
from .devices import bare_forward, override_forward, restore_forward, weights_present
from .layer_runs import Z_JOIN, first_rows
from .linear_attention import LinearAttentionSpec, call_linear_attention, linear_attention_forward
from .norms import NormKind, instrument_norm

if TYPE_CHECKING:
    from .moe import MoESpec

_INSTRUMENTED = "_mmlens_instrumented"


@dataclass(frozen=True)
class AttentionSpec:
    """Where a Hugging Face attention module keeps its projections."""

    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    scaling: str = "scaling"
    rotary: bool = True
    # RMSNorms over each head's queries and keys before the rotary embedding (Gemma 3, Qwen3)
    q_norm: str | None = None
    k_norm: str | None = None
    # attribute holding a tanh soft cap on the scaled scores, applied before the mask when not
    # None (Gemma 2); leave None for a family whose Hugging Face code ignores its configured cap
    softcap: str | None = None
    # what the q/k norms normalise: "head" (each head's d_head values, as above) or "width" (the
    # whole projection before it is split into heads: InternViT-6B); `qk_norm_kind` is their kind
    # when it is not the block's (InternViT: RMSNorms on q/k in a LayerNorm block)
    qk_norm_over: Literal["head", "width"] = "head"
    qk_norm_kind: NormKind | None = None
    # the dim `apply_rotary_pos_emb` unsqueezes cos/sin at: 1 for [batch, seq, d_head] tables, 0
    # for a packed sequence's [seq, d_head] table (Pixtral)
    rotary_unsqueeze_dim: int = 1
    # what the attention does to q and k (`[batch, seq, head, d_head]`, after their norms) before the
    # scores, given the module and its keywords, in place of the module's own `apply_rotary_pos_emb(q, k,
    # cos, sin)` after the head transpose: Gemma 4's one-tensor rotary, Llama 4's complex rotary then L2
    # norm, or its NoPE layers' query temperature; `hook_rot_q` / `hook_rot_k` fire on its output
    position_step: Callable[[nn.Module, Tensor, Tensor, dict[str, Any]], tuple[Tensor, Tensor]] | None = None
    # Hugging Face's eager softmax in float32 then cast back (most families) or in the scores' dtype (Llama 4)
    softmax_in_float32: bool = True
    # an RMSNorm over each head's values, after `hook_v` (Gemma 4's unweighted v norm). A module whose
    # `v` projection is None takes the key projection, before `k_norm`, as its values (Gemma 4's
    # `attention_k_eq_v` full-attention layers); `hook_v` then fires on that copy
    v_norm: str | None = None
    # q_proj emits each head's query and a gate side by side ([head, 2 * d_head]); the attention
    # output is multiplied by sigmoid(gate) before o_proj (Qwen3.5). `hook_q_gate` fires on the gate
    # and `hook_z` after the product, as TL's bridge has it (its hook_z is o_proj's input)
    output_gate: bool = False
    # the forward keyword whose tensor ([batch, keys, d]) the keys and values are computed from, for a
    # cross-attention (Mllama's `cross_attention_states`: the images' features); None: the hidden states
    key_source: str | None = None
    # one linear holding q, k and v as three row blocks in that order (BLIP's tower: `qkv`); `q`, `k`
    # and `v` are then ignored
    fused_qkv: str | None = None
    # KV sharing (Gemma 4): the keyword holding the keys and values shared between layers, by layer type.
    # A module with `store_full_length_kv` stores its own there (after rotary and cache); one with
    # `is_kv_shared_layer` has no k/v projections, attends with what an earlier layer stored and has no
    # k/v hook points (`position_step` then rotates q alone, given k=None)
    shared_kv: str = "shared_kv_states"


@dataclass(frozen=True)
class BlockSpec:
    """Attribute names of a pre-norm block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    ln1: str
    attn: str
    ln2: str
    mlp: str
    gated_mlp: bool  # gate_proj/up_proj/down_proj (Llama) vs fc1/fc2 (CLIP, SigLIP)
    attention: AttentionSpec
    # modules (DINOv2) or per-channel parameters (InternViT's lambda_1/2) scaling the attention and
    # MLP outputs before they join the residual
    layer_scale: tuple[str, str] | None = None
    # the layer scales are gates whose tanh is the factor (Mllama's global tower encoder: tanh(gate_attn))
    layer_scale_tanh: bool = False
    # sandwich norms on the attention and MLP outputs before they join the residual (Gemma 2/3):
    # x + post_ln1(attn(ln1(x))), then + post_ln2(mlp(ln2(.))); TL's `ln1_post` / `ln2_post`
    post_norms: tuple[str, str] | None = None
    # a buffer the block's whole output (the residual after the MLP) is multiplied by, which
    # `hook_resid_post` then holds (Gemma 4's `layer_scalar`)
    output_scalar: str | None = None
    # where the blocks of linear-attention layers (`StageConfig.linear_attention_layers`) keep the
    # gated-delta-rule mixer that replaces `attn` there (Qwen3.5); the rest of the spec is theirs too
    linear_attention: LinearAttentionSpec | None = None
    # how the blocks the config marks as mixture-of-experts (`StageConfig.moe`) route and run their
    # experts (`runtime/moe.py`); their MLP hooks are `MoEHooks`
    moe: MoESpec | None = None
    # attention and MLP both read `ln1(x)` and add to the same residual, x + attn(ln1(x)) + mlp(ln1(x))
    # (Cohere2; TL's `parallel_attn_mlp`): `ln2` is not used, and the block has no `hook_resid_mid`
    # and no `ln2` points (`BlockHooks.run_attention_and_mlp_in_parallel`)
    parallel_attention_mlp: bool = False


def _override_forward(module: nn.Module, forward: Callable) -> None:
    override_forward(module, forward)
    setattr(module, _INSTRUMENTED, True)


def restore(model: nn.Module) -> None:
    """Remove every instance-level forward this module installed."""
    for module in model.modules():
        if getattr(module, _INSTRUMENTED, False):
            restore_forward(module)
            delattr(module, _INSTRUMENTED)
        if hasattr(module, Z_JOIN):
            delattr(module, Z_JOIN)


def _argument_names(module: nn.Module) -> list[str]:
    """Names of the positional parameters of the class forward after the first input."""
    params = list(inspect.signature(type(module).forward).parameters.values())[2:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    """`module`'s attribute `name` (None where it is None), or the child a dotted path names."""
    return module.get_submodule(name) if "." in name else getattr(module, name)


class GatedQueryRows(FusedSlice):
    """A gated q_proj's query rows as the weight surface reads a linear: each head's d_head query
    rows, without the gate rows interleaved after them. No view can skip interleaved rows, so `W_Q`
    / `b_Q` are copies: they read right and pass gradients, but editing them in place does not reach
    the model (edit `q_proj.weight`)."""

    def __init__(self, q_proj: nn.Linear, d_head: int):
        super().__init__(q_proj, 0, 2)
        self._d_head = d_head

    def _rows(self, tensor: Tensor) -> Tensor:
        return tensor.unflatten(0, (-1, 2, self._d_head))[:, 0].flatten(0, 1)


class FusedPart(FusedSlice):
    """One row block of a fused linear, callable as a linear of its own (the same rows of the same
    product, up to float summation order)."""

    def __call__(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def apply_attention_mask(
    scores: Tensor, attention_mask: Tensor | None, is_causal: bool
) -> Tensor:
    """Add Hugging Face's mask to raw scores, whatever form the attention backend built it in.

    eager builds an additive float mask; sdpa a boolean one (True = attend) or none at all when
    the mask is plain causal. Masked entries end at the dtype's minimum, as in HF eager, so a
    fully padded row stays finite. `scores` must be the caller's own fresh tensor: it is masked
    in place (a copy of every score matrix costs as much as the softmax on CPU).
    """
    q_len, k_len = scores.shape[-2:]
    if attention_mask is None:
        if not is_causal or q_len == 1:
            return scores
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(
            k_len - q_len
        )
    if attention_mask.dtype == torch.bool:
        return scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
    mask = attention_mask[..., :k_len]
    return scores.add_(mask) if mask.dtype == scores.dtype else scores + mask  # keep a wider mask's promotion


def instrument_attention(
    attn: nn.Module, hooks: AttentionHooks, spec: AttentionSpec, use_result: Callable[[], bool],
    norm_kind: NormKind = "RMS",
) -> None:
    original = bare_forward(attn)
    names = _argument_names(attn)
    step = spec.position_step if spec.rotary else None
    rotary_fn = (
        getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb") if spec.rotary and step is None else None
    )
    # KV sharing (`AttentionSpec.shared_kv`): this layer attends with an earlier layer's keys and values
    reuses, stores = (bool(getattr(attn, flag, False)) for flag in ("is_kv_shared_layer", "store_full_length_kv"))
    if reuses:
        if step is None and spec.rotary:  # the stored keys are rotated; the queries must be too, by a position step
            raise UnsupportedModelError(
                f"{type(attn).__name__} reuses an earlier layer's keys and values and rotates by apply_rotary_pos_emb; "
                "the hooked reuse rotates the queries through AttentionSpec.position_step only: give the spec one")
        hooks.drop_key_value_points()
    # dotted names reach into wrappers (Gemma 4's tower keeps each nn.Linear in `q_proj.linear`)
    if spec.fused_qkv:
        q_proj, k_proj, v_proj = (FusedPart(_submodule(attn, spec.fused_qkv), i, 3) for i in range(3))
    elif reuses:
        q_proj, k_proj, v_proj = _submodule(attn, spec.q), None, None
    else:
        q_proj, k_proj, v_proj = (_submodule(attn, n) for n in (spec.q, spec.k, spec.v))
    o_proj = _submodule(attn, spec.o)
    d_head = attn.head_dim
    scaling = getattr(attn, spec.scaling)
    softcap = getattr(attn, spec.softcap) if spec.softcap else None
    identity = lambda x: x  # noqa: E731
    kv_norms = (None, None) if reuses else (spec.k_norm, spec.v_norm)
    q_norm, k_norm, v_norm = (getattr(attn, n) if n else identity for n in (spec.q_norm, *kv_norms))
    if spec.q_norm:  # per-head RMSNorms act on the last dim, so [b, s, h, d] gives HF's numbers
        instrument_norm(q_norm, hooks.q_ln, spec.qk_norm_kind or norm_kind)
        if not reuses:
            instrument_norm(k_norm, hooks.k_ln, spec.qk_norm_kind or norm_kind)
    if spec.qk_norm_over == "width":  # normalise the whole projection, then split it into heads
        q_norm, k_norm = (lambda x, n=n: n(x.flatten(-2)).unflatten(-1, (-1, d_head)) for n in (q_norm, k_norm))
    # the weight views read the linears themselves (W_V is W_K where the keys are the values)
    queries = GatedQueryRows(q_proj, d_head) if spec.output_gate else q_proj
    linears = SimpleNamespace(q=queries, k=k_proj, v=k_proj if v_proj is None else v_proj, o=o_proj, head_dim=d_head)
    hooks.bind_attention(linears, "q", "k", "v", "o")
    unsqueeze = {} if spec.rotary_unsqueeze_dim == 1 else {"unsqueeze_dim": spec.rotary_unsqueeze_dim}
    if spec.output_gate:
        hooks.add_output_gate()

    def own_keys_and_values(hidden_states: Tensor, q: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v `[batch, head, seq, d_head]` after their norms, rotary and the key cache (k/v stored
        for the layers that reuse them)."""
        batch = hidden_states.shape[0]
        source = hidden_states if spec.key_source is None else kwargs.get(spec.key_source)
        if source is None:
            return q.transpose(1, 2), *cached_cross_keys(attn, kwargs.get("past_key_values"), spec)
        keys = k_proj(source).view(batch, source.shape[1], -1, d_head)
        values = keys.clone() if v_proj is None else v_proj(source).view(batch, source.shape[1], -1, d_head)
        k = k_norm(fire(hooks.hook_k, keys))
        v = v_norm(fire(hooks.hook_v, values))
        if step is not None:  # before the transpose
            q, k = step(attn, q, k, kwargs)
            q, k = fire(hooks.hook_rot_q, q), fire(hooks.hook_rot_k, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rotary_fn is not None:
            cos, sin = kwargs["position_embeddings"]
            q, k = rotary_fn(q, k, cos, sin, **unsqueeze)
            q = fire(hooks.hook_rot_q, q.transpose(1, 2)).transpose(1, 2)
            k = fire(hooks.hook_rot_k, k.transpose(1, 2)).transpose(1, 2)
        cache = kwargs.get("past_key_values")
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        if stores:
            kwargs[spec.shared_kv][attn.layer_type] = k, v
        return q, k, v

    def attend(hidden_states: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """z (before `hook_z` fires) and the pattern."""
        attention_mask = kwargs.get("attention_mask")
        batch, seq, _ = hidden_states.shape
        queries, gate = q_proj(hidden_states), None
        if spec.output_gate:
            queries, gate = queries.view(batch, seq, -1, 2 * d_head).chunk(2, dim=-1)
            gate = fire(hooks.hook_q_gate, gate)
        q = q_norm(fire(hooks.hook_q, queries.view(batch, seq, -1, d_head)))
        if reuses:  # stored normed, rotated, transposed and cached: only q is this layer's own
            q = fire(hooks.hook_rot_q, q if step is None else step(attn, q, None, kwargs)[0]).transpose(1, 2)
            # the rows that attend: a growing batch's rows joining at hook_z skip it (`growing_batch`)
            k, v = (t[:batch] for t in kwargs[spec.shared_kv][attn.layer_type])
        else:
            q, k, v = own_keys_and_values(hidden_states, q, kwargs)
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:  # grouped-query attention: query head h reads kv head h // n_rep
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = fire(hooks.hook_attn_scores, apply_attention_mask(scores, attention_mask, getattr(attn, "is_causal", False)))
        if spec.softmax_in_float32:
            pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            pattern = nn.functional.softmax(scores, dim=-1)
        if attn.training:
            pattern = nn.functional.dropout(pattern, p=getattr(attn, "attention_dropout", 0.0))
        pattern = fire(hooks.hook_pattern, pattern)
        z = torch.matmul(pattern, v).transpose(1, 2).contiguous()
        return (z if gate is None else z * torch.sigmoid(gate)), pattern

    def project(z: Tensor) -> Tensor:
        """The attention output from z, through `hook_z` (and `hook_result`)."""
        z = fire(hooks.hook_z, z)
        batch, seq = z.shape[:2]
        if use_result() and is_hooked(hooks.hook_result):
            with weights_present(o_proj):  # an offloaded o_proj holds meta tensors outside its forward
                w_o = einops.rearrange(o_proj.weight, "m (h d) -> h d m", d=d_head)
                result = hooks.hook_result(einops.einsum(z.to(w_o.device), w_o, "b s h d, h d m -> b s h m"))
                out = result.sum(dim=-2)
                if o_proj.bias is not None:
                    out = out + o_proj.bias
            return out
        return o_proj(z.reshape(batch, seq, -1))

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any):
        join = getattr(attn, Z_JOIN)
        if join is None and not hooks.any_hooked():
            return original(hidden_states, *args, **kwargs)
        kwargs.update(zip(names, args))
        if join is None:
            z, pattern = attend(hidden_states, kwargs)
            return project(z), pattern
        # rows join at hook_z (`growing_batch`): only the first `computed` rows attend
        computed, fill = join
        rows = hidden_states.shape[0]
        z = attend(hidden_states[:computed], {k: first_rows(v, rows, computed) for k, v in kwargs.items()})[0] if computed else None
        return project(fill(z)), None

    setattr(attn, Z_JOIN, None)
    _override_forward(attn, forward)


def cached_cross_keys(attn: nn.Module, cache: Any, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """The keys and values a cross-attention layer computed from its source at the first step of
    generation (normed, `[batch, kv_head, n_keys, d_head]`), which Hugging Face reads from its cache
    at every later step: `hook_k` / `hook_v` fired then, and what their hooks left is what is cached."""
    layers = getattr(cache, "layers", ())
    layer = layers[attn.layer_idx] if attn.layer_idx < len(layers) else None
    if layer is None or not getattr(layer, "is_initialized", False) or layer.keys.numel() == 0:
        raise UnsupportedModelError(
            f"a hooked {type(attn).__name__} got neither its keys' source ({spec.key_source}) nor keys cached for "
            f"layer {attn.layer_idx} by an earlier step; pass {spec.key_source} (the images' features) or a cache "
            "filled by a forward that had them")
    if spec.rotary or spec.position_step is not None:
        raise UnsupportedModelError(f"{type(attn).__name__}: cached cross-attention keys with a position step on the "
                                    "queries are not expressed; the hooked maths supports unrotated cross-attention")
    return layer.keys, layer.values


def _gate_and_up(mlp: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """A gated MLP's gate and up projections of `x`: its `gate_proj` and `up_proj`, or the two halves
    of one fused `gate_up_proj` (GLM-4V: gate first), computed fused and split as Hugging Face does."""
    if hasattr(mlp, "gate_up_proj"):
        return mlp.gate_up_proj(x).chunk(2, dim=-1)
    return mlp.gate_proj(x), mlp.up_proj(x)


def instrument_mlp(mlp: nn.Module, hooks: MLPHooks, gated: bool) -> None:
    original = bare_forward(mlp)
    hooks.bind_mlp(mlp, gated)
    if gated:
        act = getattr(mlp, "act_fn", None) or mlp.activation_fn  # GLM-4V's fused MLP: activation_fn

        def forward(x: Tensor) -> Tensor:
            if not hooks.any_hooked():
                return original(x)
            gate, up = _gate_and_up(mlp, x)
            pre = fire(hooks.hook_pre, gate)
            pre_linear = fire(hooks.hook_pre_linear, up)
            return mlp.down_proj(fire(hooks.hook_post, act(pre) * pre_linear))

    else:
        # CLIP / SigLIP: fc1, activation_fn, fc2; Qwen2-VL's tower: act; Qwen3-VL's: linear_fc1, act_fn, linear_fc2
        act = getattr(mlp, "activation_fn", None) or getattr(mlp, "act", None) or mlp.act_fn
        fc1, fc2 = ungated_linears(mlp)

        def forward(x: Tensor) -> Tensor:
            if not hooks.any_hooked():
                return original(x)
            pre = fire(hooks.hook_pre, fc1(x))
            return fc2(fire(hooks.hook_post, act(pre)))

    _override_forward(mlp, forward)


def _scaling(layer: nn.Module, name: str, tanh: bool = False) -> Callable[[Tensor], Tensor]:
    """A layer scale as a function: the module itself, or `weight * x` for a parameter (in that
    order, as InternViT's `self.lambda_1 * attention_output`; read at call time, since an offloaded
    layer's parameters are put in place only while it runs)."""
    scale = getattr(layer, name)
    if tanh:
        return lambda x: getattr(layer, name).tanh() * x
    return scale if isinstance(scale, nn.Module) else (lambda x: getattr(layer, name) * x)


def instrument_block(
    layer: nn.Module, hooks: BlockHooks, spec: BlockSpec, use_result: Callable[[], bool], norm: NormKind,
    linear_attention: bool = False,
) -> None:
    """Hook a pre-norm block (with sandwich norms if its spec says so), its norms (which fire
    their own points), attention (or, with `linear_attention`, its gated delta net) and MLP."""
    ln1, ln2, mlp = (getattr(layer, n) for n in (spec.ln1, spec.ln2, spec.mlp))
    identity = lambda x: x  # noqa: E731
    scale1, scale2 = (_scaling(layer, n, spec.layer_scale_tanh) for n in spec.layer_scale) if spec.layer_scale \
        else (identity, identity)
    post1, post2 = (getattr(layer, n) for n in spec.post_norms) if spec.post_norms else (identity, identity)
    # read at call time, like a layer scale: an offloaded layer's buffers are in place only while it runs
    rescale = (lambda x: x * getattr(layer, spec.output_scalar)) if spec.output_scalar else identity
    if spec.parallel_attention_mlp:
        hooks.run_attention_and_mlp_in_parallel()
    instrument_norm(ln1, hooks.ln1, norm)
    if not spec.parallel_attention_mlp:
        instrument_norm(ln2, hooks.ln2, norm)
    if spec.post_norms:
        instrument_norm(post1, hooks.ln1_post, norm)
        instrument_norm(post2, hooks.ln2_post, norm)
    if linear_attention:
        if spec.linear_attention is None:
            raise UnsupportedModelError(f"{type(layer).__name__} mixes tokens with linear attention but its block "
                                        "spec has no linear_attention part saying where that mixer keeps its weights")
        mixer = getattr(layer, spec.linear_attention.module)
        _override_forward(mixer, linear_attention_forward(mixer, hooks.linear_attn, spec.linear_attention))
        mix = lambda x, kwargs: call_linear_attention(mixer, x, kwargs)  # noqa: E731
    else:
        attn = getattr(layer, spec.attn)
        instrument_attention(attn, hooks.attn, spec.attention, use_result, norm)
        mix = lambda x, kwargs: attn(hidden_states=x, **kwargs)[0]  # noqa: E731
    if isinstance(hooks.mlp, MoEHooks) or (spec.moe is not None and hasattr(mlp, spec.moe.experts)):
        from .moe import instrument_moe  # moe.py builds on this module (its shared expert is an MLP here)

        instrument_moe(mlp, hooks.mlp, spec.moe)  # refuses a block whose config and module disagree
    else:
        instrument_mlp(mlp, hooks.mlp, spec.gated_mlp)
    # an MoE block that returns (output, router logits) gives its output flat, [tokens, d_model] (Llama 4)
    routes_with_logits = isinstance(hooks.mlp, MoEHooks) and spec.moe is not None and spec.moe.returns_router_logits
    feed_forward = (lambda x: mlp(x)[0].view_as(x)) if routes_with_logits else mlp
    if not linear_attention:  # a linear-attention block has no heads for the cache to decompose into
        hooks.bind_outputs(layer, spec.layer_scale, spec.output_scalar, spec.layer_scale_tanh)  # what the cache decomposes through
    original = bare_forward(layer)
    names = _argument_names(layer)

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not hooks.residual_hooked():
            return original(hidden_states, *args, **kwargs)
        kwargs.update(zip(names, args))
        resid_pre = fire(hooks.hook_resid_pre, hidden_states)
        normed = ln1(resid_pre)  # the instrumented norm fires its own hook_scale / hook_normalized
        attn_out = fire(hooks.hook_attn_out, post1(scale1(mix(normed, kwargs))))
        if spec.parallel_attention_mlp:  # both branches read the same normalised input, summed as HF does
            mlp_out = fire(hooks.hook_mlp_out, post2(scale2(feed_forward(normed))))
            return fire(hooks.hook_resid_post, rescale(resid_pre + attn_out + mlp_out))
        resid_mid = fire(hooks.hook_resid_mid, resid_pre + attn_out)
        normed = ln2(resid_mid)
        mlp_out = fire(hooks.hook_mlp_out, post2(scale2(feed_forward(normed))))
        return fire(hooks.hook_resid_post, rescale(resid_mid + mlp_out))

    _override_forward(layer, forward)


def hook_module_output(module: nn.Module, point) -> torch.utils.hooks.RemovableHandle:
    """Route a module's output through a hook point (for modules with a single tensor output)."""
    return module.register_forward_hook(lambda _m, _i, out: fire(point, out))


def instrument_language_model(lm: nn.Module, layers: Any, spec: BlockSpec | None, root: Any,
                              use_result: Callable[[], bool], final_norm: str | None = "norm",
                              instrument_layer: Callable[..., None] | None = None,
                              ) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook a Hugging Face decoder stack (`embed_tokens`, `layers`, `norm`) into `root`'s LLM
    points: its blocks, final norm, and `hook_embed` then `hook_multimodal_embed` on the merged
    input it receives (text embeddings with the image tokens in place). Blocks of linear-attention
    layers (Qwen3.5) get `linear_attn` points instead of `attn`. `final_norm=None`: the stack's last
    norm is not the one before the unembedding (an encoder's), and the family hooks it itself."""
    norm = root.cfg.llm.normalization_type
    linear = set(root.cfg.llm.linear_attention_layers)
    for index, (layer, hooks) in enumerate(zip(layers, root.blocks)):
        if index in linear:
            hooks.mix_with_linear_attention()
        # a block of another shape than `instrument_block`'s (OPT's MLP linears on the block) brings its own
        (instrument_layer or instrument_block)(layer, hooks, spec, use_result, norm, linear_attention=index in linear)
    if final_norm is not None:
        instrument_norm(getattr(lm, final_norm), root.ln_final, norm)

    def merged_embedding(_module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            # hook_embed is what the embedding step adds to the residual (TL's meaning, which TL's
            # own ActivationCache decomposes from): text embeddings with the image features in place
            merged = fire(root.hook_embed, kwargs["inputs_embeds"])
            kwargs["inputs_embeds"] = fire(root.hook_multimodal_embed, merged)
        return args, kwargs

    return [lm.register_forward_pre_hook(merged_embedding, with_kwargs=True)]
