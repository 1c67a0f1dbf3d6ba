"""Gemma 4's mixture of experts beside the dense MLP (26B-A4B), hooked.

In an MoE block the MLP's place holds two branches on the residual r after attention: the dense
MLP on `pre_feedforward_layernorm(r)`, normed by `post_feedforward_layernorm_1`, and the routed
experts on `pre_feedforward_layernorm_2(r)`, normed by `post_feedforward_layernorm_2`; their sum,
through `post_feedforward_layernorm`, is the block's `hook_mlp_out`. The router reads r itself: an
unweighted RMSNorm times a learned scale and d^-1/2, a linear to the logits, softmax, top-k,
renormalised, each kept weight times its expert's `per_expert_scale`. The points are
`runtime/moe.py`'s: `blocks.{l}.mlp.hook_router_logits`, `hook_expert_indices`,
`hook_expert_weights` (per-expert scale included), each expert's `mlp.experts.{e}.hook_*`
(`hook_out`: its weighted output, zero where not chosen; they sum to the routed branch before its
norm), and the dense MLP as `mlp.shared_expert` (the expert every token goes through: `hook_pre`,
`hook_pre_linear`, `hook_post`, `hook_out`, its output before `post_feedforward_layernorm_1`).
`mlp.W_gate` is the router's linear, which reads the router's normed and scaled input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ....errors import UnsupportedModelError
from ...config import MoEConfig
from ...hook_tree import MoEHooks, fire, is_hooked
from ...runtime.moe import _EXPERT_FLAGS, _check_indices, routed_sum


def moe_config(text_config) -> MoEConfig | None:
    """Every block routes when `enable_moe_block`; the dense MLP is the expert every token sees."""
    if not text_config.enable_moe_block:
        return None
    return MoEConfig(layers=tuple(range(text_config.num_hidden_layers)), n_experts=text_config.num_experts,
                     top_k=text_config.top_k_experts, d_expert=text_config.moe_intermediate_size, shared_expert=True)


def bind_experts(layer: nn.Module, hooks: MoEHooks) -> None:
    """The MoE points' weight views, after refusing an experts module the recomputation would misread."""
    for flag, assumed in _EXPERT_FLAGS.items():
        if getattr(layer.experts, flag, assumed) != assumed:
            raise UnsupportedModelError(f"Gemma 4's experts module has {flag}={getattr(layer.experts, flag)}, which the "
                                        f"hooked MoE recomputation does not express (it assumes {flag}={assumed})")
    hooks.bind_moe(layer.router.proj)
    transposed = bool(getattr(layer.experts, "is_transposed", False))
    for index, group in enumerate(hooks.experts):
        group.bind_expert(layer.experts, index, transposed)


def routed_branch(layer: nn.Module, hooks: MoEHooks, residual: Tensor) -> Tensor:
    """The routed experts' weighted sum `[batch, pos, d_model]` on `residual` (before its norm),
    through the router's and the experts' points: Hugging Face's eager computation."""
    router, experts = layer.router, layer.experts
    shape, width = residual.shape[:-1], residual.shape[-1]
    x = residual.reshape(-1, width)
    scaled = router.norm(x) * router.scale * router.scalar_root_size
    logits = fire(hooks.hook_router_logits, router.proj(scaled).view(*shape, -1)).reshape(x.shape[0], -1)
    weights, indices = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), router.config.top_k_experts, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if is_hooked(hooks.hook_expert_indices):
        indices = fire(hooks.hook_expert_indices, indices.view(*shape, -1))
        _check_indices(indices, len(hooks.experts), hooks.hook_expert_indices.name)
        indices = indices.reshape(x.shape[0], -1)
    # each expert's own scale, read after a routing edit: a token sent to another expert gets that
    # expert's scale (unedited, the same product as Hugging Face's router)
    weights = weights * router.per_expert_scale[indices]
    weights = fire(hooks.hook_expert_weights, weights.view(*shape, -1)).reshape(x.shape[0], -1)
    transposed = bool(getattr(experts, "is_transposed", False))
    routed = routed_sum(layer.pre_feedforward_layernorm_2(x), shape, indices, weights, hooks, experts, transposed)
    return routed.view(*shape, width)
