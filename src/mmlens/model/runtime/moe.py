"""Mixture-of-experts blocks hooked in place, over transformers 5's router and fused-experts modules.

A sparse MoE block sends each token to `top_k` of `n_experts` gated MLPs: a router scores the
experts, the best `top_k` are kept with their weights, and the block's output is the weighted sum
of the chosen experts' outputs (plus a shared expert on every token, in some families). With no
hook listening, Hugging Face's own forward runs, whatever its `_experts_implementation` (eager,
grouped_mm, batched_mm). With one listening, the block is recomputed as HF's eager code computes
it, firing the router's logits, the chosen experts and their weights, each expert's gated-MLP
points on the tokens it serves, and each expert's weighted contribution as a [batch, pos, d_model]
tensor (`experts.{e}.hook_out`, zero at tokens that did not choose it). The block's output is those
contributions summed in expert order, which is what HF's eager loop adds up, plus the shared
expert's (`shared_expert.hook_gated_out` where a gate scales it, else its `hook_out`), so these
sum to the MoE output exactly. `MoESpec` says, field by field, how a family's block
differs from Qwen3's (router scoring, where the weight multiplies, the experts' layout, a shared
expert and its gate); what a spec cannot say is refused at load, naming the part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...errors import HookReturnError, UnsupportedModelError
from ..hook_tree import MoEHooks, SharedExpertHooks, fire, is_hooked
from .devices import bare_forward
from .instrument import _override_forward, instrument_mlp


@dataclass(frozen=True)
class MoESpec:
    """How a Hugging Face MoE block computes, as fields. The defaults are Qwen3-MoE's (and
    Qwen3-VL-MoE's): softmax over the router logits, top-k of the probabilities, renormalised to
    sum to 1, each weight multiplying its expert's output, no shared expert."""

    router: str = "gate"  # the router module: a `weight` [n_experts, d_model] (and a bias, if any)
    experts: str = "experts"  # fused `gate_up_proj` / `down_proj` parameters, one slice per expert
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    # top-k of the scores (Qwen3: of the softmax probabilities) or of the logits, scored after (Llama 4)
    top_k_of: Literal["scores", "logits"] = "scores"
    renormalize: bool = True  # the kept weights divided by their sum
    # the weight multiplies the expert's output (Qwen3) or its input (Llama 4's routed_in)
    weights_on: Literal["output", "input"] = "output"
    # gate_up_proj [E, d_model, 2 d_expert] rather than [E, 2 d_expert, d_model]; None reads the
    # experts module's `is_transposed` (transformers' @use_experts_implementation sets it)
    transposed: bool | None = None
    shared_expert: str | None = None  # a gated MLP on every token, added to the routed sum
    shared_expert_gate: str | None = None  # a Linear(d_model, 1) whose sigmoid scales the shared expert
    returns_router_logits: bool = False  # the block returns (output, router logits) (Llama 4)
    # DeepSeek-V3's routing (GLM-4.5V): a router buffer added to the scores to choose the experts but
    # not to weigh them (`e_score_correction_bias`), and the router attributes holding the number of
    # expert groups and how many of them, ranked by their two best scores, the choice may use
    choice_bias: str | None = None
    groups: tuple[str, str] | None = None
    routed_scale: str | None = None  # a router attribute multiplying the kept weights last (routed_scaling_factor)
    renormalize_epsilon: float = 0.0  # added to the kept weights' sum before dividing (GLM-4.5V: 1e-20)
    router_in_float32: bool = False  # the router's linear runs in float32 whatever the model's dtype


# what transformers' @use_experts_implementation may say about an experts module that the hooked
# recomputation does not do, with the value it assumes
_EXPERT_FLAGS = {"has_bias": False, "has_gate": True, "is_concatenated": True, "has_post_expert_norm": False,
                 "_is_expert_parallel": False}
# router settings a spec must name where they are not neutral (DeepSeek-V3-style routers carry them)
_ROUTER_SETTINGS = {"num_group": 1, "n_group": 1, "routed_scaling_factor": 1.0}


def _refuse_unexpressed(module: nn.Module, router: nn.Module, experts: nn.Module, spec: MoESpec) -> None:
    where = type(module).__name__
    for flag, assumed in _EXPERT_FLAGS.items():
        value = getattr(experts, flag, assumed)
        if value != assumed:
            raise UnsupportedModelError(
                f"{where}: its experts module has {flag}={value}, which the hooked MoE recomputation does not "
                f"express (it assumes {flag}={assumed}); load without hooks on this family, or extend MoESpec")
    for name in ("gate_up_proj", "down_proj"):
        if getattr(experts, name, None) is None or getattr(experts, name).dim() != 3:
            raise UnsupportedModelError(f"{where}: its experts module {spec.experts!r} has no fused 3-D {name} "
                                        "[n_experts, ...]; MoESpec expects transformers' fused experts")
    extra = sorted(n for n, _ in router.named_parameters() if n not in ("weight", "bias"))
    extra += sorted(n for n, _ in router.named_buffers() if n != spec.choice_bias)
    if extra or getattr(router, "weight", None) is None:
        raise UnsupportedModelError(
            f"{where}: its router {spec.router!r} has parameters or buffers {extra or 'but no weight'} beyond a linear "
            "scoring (a score correction bias?) that its MoESpec does not name; name it as the spec's choice_bias")
    renormalizes = getattr(router, "norm_topk_prob", spec.renormalize)
    if renormalizes != spec.renormalize:
        raise UnsupportedModelError(
            f"{where}: its router has norm_topk_prob={renormalizes} but its MoESpec says renormalize={spec.renormalize}; "
            "the hooked routing would weight the experts differently")
    named = {*(spec.groups or ()), spec.routed_scale}
    for attribute, neutral in _ROUTER_SETTINGS.items():
        value = getattr(router, attribute, neutral)
        if attribute not in named and value != neutral:
            raise UnsupportedModelError(
                f"{where}: its router has {attribute}={value}, which its MoESpec does not name (grouped routing or a "
                "routed scaling factor); name it in the spec's groups or routed_scale")


def _grouped_top_k(choice: Tensor, n_group: int, topk_group: int, top_k: int) -> Tensor:
    """The experts DeepSeek-V3's router chooses from `choice` [tokens, E], its scores plus the
    correction bias: the `topk_group` groups whose two best choice scores sum highest, then the best
    `top_k` experts within them (unsorted, as Hugging Face's router returns them)."""
    tokens, n_experts = choice.shape
    group_scores = choice.view(tokens, n_group, n_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    kept = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    in_kept_group = torch.zeros_like(group_scores).scatter_(1, kept, 1).bool()
    allowed = in_kept_group.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(tokens, n_experts)
    return torch.topk(choice.masked_fill(~allowed, float("-inf")), k=top_k, dim=-1, sorted=False)[1]


def _check_indices(indices: Tensor, n_experts: int, name: str) -> None:
    """An edited routing must give every token distinct experts that exist (the hook contract has
    already kept the shape and the integer dtype)."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_experts):
        raise HookReturnError(
            f"{name}: an expert index outside 0..{n_experts - 1} (got {int(indices.min())}..{int(indices.max())}); "
            "a token routed there would have no expert. Route to existing experts, or ablate an expert by zeroing "
            "its weight (hook_expert_weights) or its output (experts.{e}.hook_out)")
    ordered = indices.sort(dim=-1).values
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise HookReturnError(
            f"{name}: a token chooses the same expert twice; top-k routing picks distinct experts. To change how "
            "much an expert counts, edit hook_expert_weights")


def _shared_contribution(x: Tensor, shared: nn.Module, gate: nn.Module | None, hooks: SharedExpertHooks) -> Tensor:
    """What the shared expert adds to the block, [tokens, d_model]: its output (`hook_out`), scaled
    where it has one by the sigmoid of its gate (`hook_gate_logit`, `hook_gate`, `hook_gated_out`)."""
    out = fire(hooks.hook_out, shared(x))
    if gate is not None:
        scale = fire(hooks.hook_gate, torch.sigmoid(fire(hooks.hook_gate_logit, gate(x))))
        out = fire(hooks.hook_gated_out, scale * out)
    return out.reshape(-1, x.shape[-1])


def routed_sum(x: Tensor, shape: torch.Size, indices: Tensor, weights: Tensor, hooks: MoEHooks, experts: nn.Module,
               transposed: bool, weights_on: Literal["output", "input"] = "output") -> Tensor:
    """The chosen experts' weighted outputs summed, [tokens, d_model], in HF's eager order: each expert
    (fused `experts` slices) on the rows of `x` [tokens, d_model] that chose it (`indices`, `weights`
    [tokens, top_k]), through its points; `shape` is x's [batch, pos] for the [batch, pos, ...] points."""
    project = (lambda rows, w: rows @ w) if transposed else F.linear
    total, width = torch.zeros_like(x), x.shape[-1]
    # every expert's tokens in (batch, position) order, as torch.where(indices == e) lists them, and their
    # weights: one stable sort of the flat choices by expert, cut at each expert's count (not two ops per expert)
    choices = indices.flatten()
    order = torch.argsort(choices, stable=True)
    counts = torch.bincount(choices, minlength=len(hooks.experts)).tolist()
    token_runs = torch.div(order, indices.shape[-1], rounding_mode="floor").split(counts)
    weight_runs = weights.flatten()[order].split(counts)
    for e, group in enumerate(hooks.experts):
        tokens = token_runs[e]
        if not counts[e] and not group.any_hooked():
            continue  # HF's loop skips an expert no token chose
        rows, weight = x[tokens], weight_runs[e][:, None]
        if weights_on == "input":
            rows = rows * weight
        gate, up = project(rows, experts.gate_up_proj[e]).chunk(2, dim=-1)
        gate, up = fire(group.hook_pre, gate), fire(group.hook_pre_linear, up)
        out = project(fire(group.hook_post, experts.act_fn(gate) * up), experts.down_proj[e])
        out = (out * weight if weights_on == "output" else out).to(total.dtype)
        if is_hooked(group.hook_out):
            # one token appears once per expert, so the scatter onto zeros is exact and adding it
            # equals HF's index_add_ of the same rows, in the same expert order
            placed = torch.zeros_like(x).index_add_(0, tokens, out)
            total = total + fire(group.hook_out, placed.view(*shape, width)).reshape(-1, width)
        else:
            total.index_add_(0, tokens, out)
    return total


def instrument_moe(module: nn.Module, hooks: MoEHooks, spec: MoESpec | None) -> None:
    """Hook a sparse MoE block: HF's forward while nothing listens, the eager maths with hook
    points otherwise (see the module docstring)."""
    where = type(module).__name__
    if spec is None or not hasattr(module, spec.experts) or not hasattr(module, spec.router):
        raise UnsupportedModelError(
            f"{where}: the model's config makes this block a mixture of experts, but the family's block spec "
            f"{'has no MoE spec' if spec is None else f'names router {spec.router!r} and experts {spec.experts!r}, which it lacks'}")
    if not isinstance(hooks, MoEHooks):
        raise UnsupportedModelError(f"{where}: the block is a mixture of experts but the model's config "
                                    "(StageConfig.moe) marks its layer dense; the config's MoE layers must match")
    router, experts = getattr(module, spec.router), getattr(module, spec.experts)
    _refuse_unexpressed(module, router, experts, spec)
    shared = getattr(module, spec.shared_expert) if spec.shared_expert else None
    shared_gate = getattr(module, spec.shared_expert_gate) if spec.shared_expert_gate else None
    if (shared is None) != (getattr(hooks, "shared_expert", None) is None):
        raise UnsupportedModelError(f"{where}: the config and the MoE spec disagree on whether the block has a "
                                    "shared expert")
    if shared is not None:
        instrument_mlp(shared, hooks.shared_expert, gated=True)
    transposed = bool(getattr(experts, "is_transposed", False)) if spec.transposed is None else spec.transposed
    n_experts = experts.gate_up_proj.shape[0]
    if n_experts != len(hooks.experts):
        raise UnsupportedModelError(f"{where}: {n_experts} experts in the module but {len(hooks.experts)} in the config")
    hooks.bind_moe(router)
    for index, group in enumerate(hooks.experts):
        group.bind_expert(experts, index, transposed)
    top_k = getattr(router, "top_k", None) or getattr(module, "top_k")
    original = bare_forward(module)

    def score(values: Tensor) -> Tensor:
        if spec.scoring == "softmax":
            return F.softmax(values, dtype=torch.float, dim=-1)
        return torch.sigmoid(values.float())

    def route(x: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
        """Router logits [tokens, E], chosen experts and their weights [tokens, k], through the points."""
        if spec.router_in_float32:
            bias = getattr(router, "bias", None)
            logits = F.linear(x.float(), router.weight.float(), None if bias is None else bias.float())
        else:
            logits = F.linear(x, router.weight, getattr(router, "bias", None))
        logits = fire(hooks.hook_router_logits, logits.view(*shape, -1)).reshape(x.shape[0], -1)
        if spec.choice_bias is not None:
            scores = score(logits)
            n_group, topk_group = (getattr(router, name) for name in spec.groups) if spec.groups else (1, 1)
            indices = _grouped_top_k(scores + getattr(router, spec.choice_bias), n_group, topk_group, top_k)
            weights = scores.gather(1, indices)
        elif spec.top_k_of == "scores":
            weights, indices = torch.topk(score(logits), top_k, dim=-1)
        else:
            top, indices = torch.topk(logits, top_k, dim=-1)
            weights = score(top)
        if spec.renormalize:
            total = weights.sum(dim=-1, keepdim=True)
            weights = weights / (total + spec.renormalize_epsilon if spec.renormalize_epsilon else total)
        if spec.routed_scale is not None:
            weights = weights * getattr(router, spec.routed_scale)
        weights = weights.to(logits.dtype)
        if is_hooked(hooks.hook_expert_indices):
            indices = fire(hooks.hook_expert_indices, indices.view(*shape, -1))
            _check_indices(indices, n_experts, hooks.hook_expert_indices.name)
            indices = indices.reshape(x.shape[0], -1)
        weights = fire(hooks.hook_expert_weights, weights.view(*shape, -1)).reshape(x.shape[0], -1)
        return logits, indices, weights

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any):
        if not hooks.any_hooked():
            return original(hidden_states, *args, **kwargs)
        shape, width = hidden_states.shape[:-1], hidden_states.shape[-1]
        x = hidden_states.reshape(-1, width)
        logits, indices, weights = route(x, shape)
        total = routed_sum(x, shape, indices, weights, hooks, experts, transposed, spec.weights_on)
        if shared is not None:
            total = total + _shared_contribution(x.view(*shape, width), shared, shared_gate, hooks.shared_expert)
        out = total.view(*shape, width)
        return (out, logits) if spec.returns_router_logits else out

    _override_forward(module, forward)
