"""The hook points of a multimodal model, arranged so module paths are the hook names.

Hook points are TransformerLens `HookPoint`s held in a small module tree (`vision.blocks.3.attn`,
`adapter`, `blocks.7.mlp` ...), separate from the Hugging Face modules they observe, so names
stay the same for every architecture. `fire` skips a point that has no hook, which keeps a
forward without hooks as fast as the bare model; every point checks that its hooks return what
they received (`hook_contract`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from transformer_lens.hook_points import HookPoint

from .hook_contract import CheckedHookPoint
from .config import MoEConfig, StageConfig
from .weights import (
    AttentionWeights, BlockOutputs, ExpertWeights, MLPWeights, MoEWeights, NormWeights, StackedWeights,
)


def is_hooked(point: HookPoint) -> bool:
    return bool(point._forward_hooks or point._backward_hooks)


# torch's own check for global module hooks; a torch without it always takes the module call
_has_global_hooks = getattr(torch_module, "_has_any_global_hook", None)


def _needs_module_call(point: HookPoint) -> bool:
    """Whether firing `point` needs nn.Module.__call__'s whole machinery: backward or pre-hooks,
    global hooks, or a trace or compile that must see the call."""
    return bool(
        point._backward_hooks or point._forward_pre_hooks or point._backward_pre_hooks
        or _has_global_hooks is None or _has_global_hooks()
        or torch._C._get_tracing_state() or torch.compiler.is_compiling()
    )


def fire(point: HookPoint, x: Tensor) -> Tensor:
    """Pass `x` through `point` only when something listens there. Forward hooks alone (caching,
    patching) are called here exactly as nn.Module.__call__ calls them on this identity module,
    without the rest of its machinery, which cost about a tenth of a small model's forward when
    every point caches; anything else takes the module call."""
    hooks = point._forward_hooks
    if not (hooks or point._backward_hooks):
        return x
    if _needs_module_call(point):
        return point(x)
    args, with_kwargs = (x,), point._forward_hooks_with_kwargs
    for hook_id, hook in tuple(hooks.items()):
        returned = hook(point, args, {}, x) if hook_id in with_kwargs else hook(point, args, x)
        if returned is not None:
            x = returned
    return x


def version_of(x: Tensor) -> int | None:
    """`x`'s version counter, which every in-place edit moves (None for an inference tensor: it has none)."""
    return None if x.is_inference() else x._version


def untouched(received: Tensor, returned: Tensor, version: int | None) -> bool:
    """Whether the hooks at a point left `received` as it was, so a hooked forward may go on from
    its own copy of the value: they gave back the same tensor, did not edit it in place since its
    version was `version_of(received)`, and no gradient is to flow into it (where autograd records
    and it requires grad, the rest of the forward must be computed from the tensor the hooks saw).
    An edit through `.data` or numpy moves no version: callers compare values as well."""
    if returned is not received or version is None or received._version != version:
        return False
    return not (torch.is_grad_enabled() and received.requires_grad)


class HookGroup(nn.Module):
    """A module whose attributes named `hook_*` are hook points; `any_hooked` checks them all."""

    def __init__(self, *names: str):
        super().__init__()
        self._own_points: list[HookPoint] = []
        for name in names:
            point = CheckedHookPoint()
            setattr(self, name, point)
            self._own_points.append(point)

    def any_hooked(self) -> bool:
        return any(p._forward_hooks or p._backward_hooks for p in self._own_points)

    def add_points(self, *names: str) -> None:
        """More `hook_*` points on this group (a family's own sites, e.g. Gemma 4's per-layer input)."""
        for name in names:
            setattr(self, name, CheckedHookPoint())
            self._own_points.append(getattr(self, name))


class AttentionHooks(AttentionWeights, HookGroup):
    def __init__(self, rotary: bool, qk_norm: bool = False):
        names = ["hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_result"]
        super().__init__(*names, *(["hook_rot_q", "hook_rot_k"] if rotary else []))
        self._qk_norms: tuple[NormHooks, ...] = ()
        if qk_norm:  # TL's names for per-head q/k RMSNorms (use_qk_norm)
            self.q_ln, self.k_ln = NormHooks(), NormHooks()
            self._qk_norms = (self.q_ln, self.k_ln)

    def any_hooked(self) -> bool:
        # a hooked q/k norm takes the step-by-step path, so its points see [batch, pos, head, d_head]
        return super().any_hooked() or any(n.any_hooked() for n in self._qk_norms)

    def add_output_gate(self) -> None:
        """`hook_q_gate` ([batch, pos, head, d_head], before its sigmoid): the gate q_proj emits beside
        each head's query, by whose sigmoid the attention output is multiplied before `hook_z`
        (Qwen3.5; TL's bridge names the point alike and reads its `hook_z` after the gate too)."""
        if not hasattr(self, "hook_q_gate"):
            self.hook_q_gate = CheckedHookPoint()
            self._own_points.append(self.hook_q_gate)

    def drop_key_value_points(self) -> None:
        """No `hook_k`, `hook_v`, `hook_rot_k` or `k_ln` points: the attention reuses an earlier layer's
        keys and values (Gemma 4's KV sharing), whose points are that layer's; asking for them here is an
        unknown name."""
        for name in ("hook_k", "hook_v", "hook_rot_k"):
            if hasattr(self, name):
                self._own_points.remove(getattr(self, name))
                delattr(self, name)
        if hasattr(self, "k_ln"):
            self._qk_norms = tuple(n for n in self._qk_norms if n is not self.k_ln)
            del self.k_ln


class LinearAttentionHooks(HookGroup):
    """The points of a gated-delta-rule token mixer (Qwen3.5), TransformerLens's names: q, k, v
    before and after the short causal convolution ([batch, pos, head, d_head]; q and k with the key
    heads), the write strength's logit and sigmoid and the log decay ([batch, pos, value head]), the
    recurrence's output and the gate of its norm ([batch, pos, value head, d_head])."""

    def __init__(self):
        super().__init__("hook_q_pre_conv", "hook_k_pre_conv", "hook_v_pre_conv", "hook_q", "hook_k", "hook_v",
                         "hook_beta_logit", "hook_beta", "hook_log_decay", "hook_recurrence_out", "hook_gate_input")


class MLPHooks(MLPWeights, HookGroup):
    def __init__(self, gated: bool):
        super().__init__("hook_pre", "hook_post", *(["hook_pre_linear"] if gated else []))


class ExpertHooks(ExpertWeights, HookGroup):
    """One routed expert: TL's gated-MLP points on the tokens it serves (`hook_pre` the gate
    projection, `hook_pre_linear` the up projection, `hook_post` their product, each [tokens it
    serves, d_expert], tokens in (batch, position) order) and `hook_out` [batch, pos, d_model]: its
    weighted contribution, zero at tokens that did not choose it."""

    def __init__(self):
        super().__init__("hook_pre", "hook_pre_linear", "hook_post", "hook_out")


class SharedExpertHooks(MLPWeights, HookGroup):
    """The expert every token goes through beside the routed ones (Qwen3.5-MoE, Llama 4): a gated
    MLP's points and `hook_out`, its output [batch, pos, d_model] (before any gate, as TL's bridge
    reads `shared_expert.hook_out`). Where a sigmoid gate scales it (Qwen3.5-MoE): `hook_gate_logit`
    (the gate's linear output, TL's `shared_expert_gate.hook_out`) and `hook_gate` (its sigmoid),
    both [batch, pos, 1], and `hook_gated_out`, what the block adds. Ungated, it adds `hook_out`."""

    def __init__(self, gated_output: bool):
        gate_points = ["hook_gate_logit", "hook_gate", "hook_gated_out"] if gated_output else []
        super().__init__("hook_pre", "hook_pre_linear", "hook_post", "hook_out", *gate_points)


class MoEHooks(MoEWeights, HookGroup):
    """A mixture-of-experts block: `hook_router_logits` [batch, pos, n_experts], then the chosen
    experts `hook_expert_indices` and their weights `hook_expert_weights` (both [batch, pos, top_k],
    TL's names; the indices fire first, so a hook on the weights can read them), each expert's
    points (`experts.{e}`) and the shared expert's (`shared_expert`) where the block has one."""

    def __init__(self, moe: MoEConfig, shared_gate: bool = False):
        super().__init__("hook_router_logits", "hook_expert_indices", "hook_expert_weights")
        self.experts = nn.ModuleList(ExpertHooks() for _ in range(moe.n_experts))
        self._groups: list[HookGroup] = list(self.experts)
        if moe.shared_expert:
            self.shared_expert = SharedExpertHooks(shared_gate)
            self._groups.append(self.shared_expert)

    def any_hooked(self) -> bool:
        return super().any_hooked() or any(group.any_hooked() for group in self._groups)


def use_moe_hooks(blocks: nn.ModuleList, stage: StageConfig, shared_gate: bool = False) -> None:
    """Give the blocks the stage's config marks as mixture-of-experts `MoEHooks` in place of a
    dense MLP's points (before the model's hook dictionary is built)."""
    if stage.moe is None:
        return
    for layer in stage.moe.layers:
        blocks[layer].mlp = MoEHooks(stage.moe, shared_gate)


class NormHooks(NormWeights, HookGroup):
    """`hook_scale` (the divisor, [..., 1]) and `hook_normalized` (the output); callable as the norm."""

    def __init__(self):
        super().__init__("hook_scale", "hook_normalized")


class BlockHooks(BlockOutputs, HookGroup):
    """Residual-stream points of one block plus its attention, MLP and norm points."""

    def __init__(self, rotary: bool, gated_mlp: bool, sandwich_norms: bool = False, qk_norm: bool = False):
        super().__init__(
            "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"
        )
        self.ln1 = NormHooks()
        self.ln2 = NormHooks()
        if sandwich_norms:  # TL's names for the norms on the attention and MLP outputs
            self.ln1_post = NormHooks()
            self.ln2_post = NormHooks()
        self.attn = AttentionHooks(rotary, qk_norm)
        self.mlp = MLPHooks(gated_mlp)

    def residual_hooked(self) -> bool:
        """Whether the block-level path (not attention, MLP or norm internals) has to be taken apart."""
        return self.any_hooked()

    def run_attention_and_mlp_in_parallel(self) -> None:
        """Make this a parallel block, `x + attn(ln1(x)) + mlp(ln1(x))` (Cohere2): as in TL's
        `parallel_attn_mlp` blocks there is no `hook_resid_mid` (no residual lies between the
        branches) and no `ln2` (the MLP reads `ln1`'s output), so asking for them is an unknown name."""
        self._own_points.remove(self.hook_resid_mid)
        del self.hook_resid_mid
        del self.ln2

    def mix_with_linear_attention(self) -> None:
        """Make this block's token mixer a linear attention: `linear_attn.hook_*` points instead of
        `attn` (a recurrence has no attention pattern, no `hook_z`, no heads to knock out)."""
        del self.attn
        self.linear_attn = LinearAttentionHooks()

    def mix_with_cross_attention(self, qk_norm: bool) -> None:
        """Make this block a tanh-gated cross-attention block (Mllama): `cross_attn.hook_*` points instead
        of `attn` (queries from the text, keys and values from the images' features), and
        `hook_attn_gate` / `hook_mlp_gate` ([batch, pos, 1]): the factor each branch's output is
        multiplied by before it joins the residual (the MLP's is 0 at text tokens that see no image)."""
        del self.attn
        self.cross_attn = AttentionHooks(rotary=False, qk_norm=qk_norm)
        for name in ("hook_attn_gate", "hook_mlp_gate"):
            setattr(self, name, CheckedHookPoint())
            self._own_points.append(getattr(self, name))

    def __getattr__(self, name: str):
        if name == "attn" and "cross_attn" in self._modules:
            raise AttributeError("this block is a cross-attention block: its queries are text tokens and its keys and "
                                 "values the images' features, so it has no self-attention `attn`; its points are "
                                 "`cross_attn.hook_*`, its weights `cross_attn.W_Q` ...")
        if name == "attn" and "linear_attn" in self._modules:  # say why, to whatever reads every block's attn
            raise AttributeError("this block mixes tokens with linear attention (a gated delta rule): it has no `attn` "
                                 "(no pattern, heads or W_Q/W_K/W_V/W_O); its points are `linear_attn.hook_*`")
        return super().__getattr__(name)


class VisionHooks(StackedWeights, HookGroup):
    def __init__(self, stage):
        super().__init__("hook_embed")
        if stage.has_ln_pre:
            self.ln_pre = NormHooks()
        rotary = stage.positional_embedding_type == "rotary"
        self.blocks = nn.ModuleList(
            BlockHooks(rotary, stage.gated_mlp, stage.use_normalization_before_and_after, stage.use_qk_norm)
            for _ in range(stage.n_layers)
        )
        if stage.has_ln_post:
            self.ln_post = NormHooks()


class AdapterHooks(HookGroup):
    def __init__(self, has_hidden: bool = True):  # a single linear projector has no hidden layer
        super().__init__("hook_in", *(["hook_hidden"] if has_hidden else []), "hook_out")
