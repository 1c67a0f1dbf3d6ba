"""The hook points of a multimodal model, arranged so module paths are the hook names.

Hook points are TransformerLens `HookPoint`s held in a small module tree (`vision.blocks.3.attn`,
`adapter`, `blocks.7.mlp` ...), separate from the Hugging Face modules they observe, so names
stay the same for every architecture. `fire` skips a point that has no hook, which keeps a
forward without hooks as fast as the bare model; every point checks that its hooks return what
they received (`hook_contract`).
"""

from __future__ import annotations

from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .hook_contract import CheckedHookPoint
from .weights import AttentionWeights, BlockOutputs, MLPWeights, NormWeights, StackedWeights


def is_hooked(point: HookPoint) -> bool:
    return bool(point._forward_hooks or point._backward_hooks)


def fire(point: HookPoint, x: Tensor) -> Tensor:
    """Pass `x` through `point` only when something listens there."""
    if point._forward_hooks or point._backward_hooks:
        return point(x)
    return x


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


class MLPHooks(MLPWeights, HookGroup):
    def __init__(self, gated: bool):
        super().__init__("hook_pre", "hook_post", *(["hook_pre_linear"] if gated else []))


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
