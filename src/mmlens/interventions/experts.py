"""Expert-level interventions on mixture-of-experts blocks: ablation, and patching of expert outputs.

At each token an MoE block adds the outputs of the experts it chose, each times its routing
weight; the hooked block exposes expert e's weighted contribution as
`blocks.{l}.mlp.experts.{e}.hook_out` ([batch, pos, d_model], zero where the token did not choose
it). Ablating an expert removes that contribution at chosen positions. By default the other chosen
experts keep their weights, so the block's output just loses the term; with `renormalize=True` the
expert's routing weight is zeroed instead and the weights left are scaled back to their sum before
(the router's own renormalisation, as if the token had chosen only the others). Patching copies an
expert's contribution from a source run (clean) into a target run (corrupted), one expert at a
time, through `patch_conditions`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..model import HookedMLLM, MultimodalInputs
from ..model.edits import HookSet
from ..model.hook_names import block_hook, parse_hook_name
from .groups import GroupContext, TokenGroup
from .patching import Metric, Patch, patch_conditions
from .run import Run
from .selection import chosen_indices


def _moe_layers(model: HookedMLLM) -> tuple[int, ...]:
    moe = model.cfg.llm.moe
    if moe is None:
        raise InputError(f"{model.cfg.architecture} has no mixture-of-experts blocks: expert interventions need a "
                         "model whose config lists MoE layers (model.cfg.llm.moe)")
    return moe.layers


def _chosen_layers(model: HookedMLLM, layers: Iterable[int] | None) -> list[int]:
    """The MoE layers named (all of them for None); a dense or missing layer is an InputError."""
    moe_layers = _moe_layers(model)
    chosen = chosen_indices(moe_layers if layers is None else layers, model.cfg.n_layers, "layers", "the LLM")
    dense = sorted(set(chosen) - set(moe_layers))
    if dense:
        raise InputError(f"layers {dense} are not mixture-of-experts blocks; this model's MoE layers are {list(moe_layers)}")
    return chosen


def _chosen_experts(model: HookedMLLM, experts: Mapping[int, Iterable[int]]) -> dict[int, list[int]]:
    if not isinstance(experts, Mapping) or not experts:
        raise InputError(f"experts maps MoE layers to the experts to edit there, e.g. {{{_moe_layers(model)[0]}: [0, 3]}}; "
                         f"got {experts!r:.80}")
    n_experts = model.cfg.llm.moe.n_experts
    return {layer: chosen_indices(experts[layer], n_experts, "experts", f"layer {layer}")
            for layer in _chosen_layers(model, experts)}


class ExpertAblation(HookSet):
    """Hooks that remove the contributions of chosen experts (`experts`: MoE layer -> experts) at
    `positions` (a TokenGroup, None for every position); use `with`, pass `hooks` to
    `run_with_hooks`, or make it a run's edit. After a forward, `ablated[layer]` counts the
    (token, expert) contributions it removed there."""

    def __init__(self, model: HookedMLLM, inputs: MultimodalInputs, experts: Mapping[int, Iterable[int]],
                 positions: TokenGroup | None = None, renormalize: bool = False,
                 context: GroupContext | None = None):
        self.model, self.renormalize = model, renormalize
        self.experts = _chosen_experts(model, experts)
        mask = (torch.ones(inputs.input_ids.shape, dtype=torch.bool) if positions is None
                else positions.resolve(inputs, context))
        if not mask.any():
            raise InputError(f"the positions {positions!r} select no token of these inputs; the ablation would change "
                             "nothing")
        self.positions = mask.to(model.cfg.device)
        self.ablated: dict[int, int] = {}
        self._indices: dict[int, Tensor] = {}
        self.hooks = []
        for layer in self.experts:
            self.hooks.append((block_hook(layer, "mlp.hook_expert_indices"), self._read_indices))
            if renormalize:
                self.hooks.append((block_hook(layer, "mlp.hook_expert_weights"), self._reweight))
            else:
                self.hooks += [(block_hook(layer, f"mlp.experts.{e}.hook_out"), self._zero) for e in self.experts[layer]]

    def _mask(self, activation: Tensor, name: str) -> Tensor:
        if activation.shape[:2] != self.positions.shape:
            raise ValueError(f"{name}: this ablation was resolved on inputs of shape {tuple(self.positions.shape)} "
                             f"but the block runs {tuple(activation.shape[:2])}; build it from the inputs you run")
        return self.positions

    def _hit(self, layer: int) -> Tensor:
        """[batch, pos, top_k]: the slots holding an ablated expert at an ablated position."""
        indices = self._indices[layer]
        chosen = torch.as_tensor(self.experts[layer], device=indices.device)
        return torch.isin(indices, chosen) & self._mask(indices, f"layer {layer}")[..., None]

    def _read_indices(self, indices: Tensor, hook) -> None:
        layer = parse_hook_name(hook.name).layer
        self._indices[layer] = indices
        self.ablated[layer] = self.ablated.get(layer, 0) + int(self._hit(layer).sum())

    def _zero(self, contribution: Tensor, hook) -> Tensor:
        mask = self._mask(contribution, hook.name)
        return torch.where(mask[..., None], torch.zeros_like(contribution), contribution)

    def _reweight(self, weights: Tensor, hook) -> Tensor:
        hit = self._hit(parse_hook_name(hook.name).layer)
        kept = weights.masked_fill(hit, 0)
        left, total = kept.sum(-1, keepdim=True), weights.sum(-1, keepdim=True)
        edited = hit.any(-1, keepdim=True)
        if (edited & (left == 0)).any():
            raise InputError(f"{hook.name}: every expert a token chose is ablated, so no weight is left to renormalise "
                             "(the token would have no expert); ablate fewer experts, or pass renormalize=False to "
                             "zero their contributions")
        return torch.where(edited, kept * (total / left), weights)


def ablate_experts(model: HookedMLLM, inputs: MultimodalInputs, experts: Mapping[int, Iterable[int]], *,
                   positions: TokenGroup | None = None, renormalize: bool = False,
                   context: GroupContext | None = None) -> ExpertAblation:
    """Remove the contributions of `experts` (MoE layer -> experts) at `positions` (None: all);
    with `renormalize`, the other chosen experts' weights are scaled back to their sum instead of
    keeping theirs (see the module docstring). Use it as `knockout`'s result is used."""
    return ExpertAblation(model, inputs, experts, positions, renormalize, context)


def expert_conditions(model: HookedMLLM, layers: Sequence[int] | None = None,
                      positions: TokenGroup | Tensor | None = None) -> tuple[list[int], list[Patch]]:
    """One Patch per (MoE layer, expert) at `mlp.experts.{e}.hook_out`, layer-major."""
    layers = _chosen_layers(model, layers)
    n_experts = model.cfg.llm.moe.n_experts
    return layers, [Patch(block_hook(l, f"mlp.experts.{e}.hook_out"), positions)
                    for l in layers for e in range(n_experts)]


def expert_sweep(
    model: HookedMLLM,
    source: Run | MultimodalInputs,
    target: Run | MultimodalInputs,
    metric: Metric,
    *,
    layers: Sequence[int] | None = None,
    positions: TokenGroup | Tensor | None = None,
    chunk_size: int | None = None,
    context: GroupContext | None = None,
) -> Float[Tensor, "layer expert batch"]:
    """Patch each expert's contribution (`mlp.experts.{e}.hook_out`) at `positions` (default all)
    from source into target, one expert at a time, in the MoE `layers` (default all); the metric
    per layer, expert and row. A patched contribution is the source's, wherever the source routed
    to that expert; the target's routing elsewhere is untouched."""
    layers, conditions = expert_conditions(model, layers, positions)
    values = patch_conditions(model, source, target, metric, conditions, chunk_size=chunk_size, context=context)
    return values.view(len(layers), model.cfg.llm.moe.n_experts, -1)
