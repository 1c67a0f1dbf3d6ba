"""Editing SAE features at chosen image tokens, and attributing a metric to them.

An SAE spliced with its error term makes its features editable without changing anything else:
setting, zeroing or adding to feature f at a token moves the activation there by exactly the
change times f's decoder row (Templeton et al. 2024's feature steering and clamping). Edits
apply only at a token group's positions (`mmlens.interventions.TokenGroup`), mapped onto the
SAE's stage by the layout (LLM positions, the adapter's rows, or the vision patches feeding them).
Attribution patching (Nanda 2023; Syed et al. 2023, https://arxiv.org/abs/2310.10348) estimates,
in one backward, the metric change from patching every feature at every token from a source run
into a target run: the gradient at `hook_sae_acts_post` times the activation difference, as
`interventions.attribution` does for heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import InputError
from ..interventions.groups import GroupContext, TokenGroup
from ..interventions.patching import Metric, check_same_layout, evaluate, metric_hooks
from ..interventions.run import Run, as_run, run_and_collect
from ..probing.sites import Site, gather_image_tokens, site_for
from .activations import image_token_positions
from .maps import FEATURES_POINT, checked_features
from .sae import SAE

if TYPE_CHECKING:
    from ..model import HookedMLLM, MultimodalInputs

EDIT_MODES = ("zero", "set", "add")


@dataclass(frozen=True)
class FeatureEdit:
    """Feature `feature` at the tokens of `group` (None: every position of the SAE's point):
    "zero"ed, "set" to `value`, or `value` "add"ed."""

    feature: int
    group: TokenGroup | None = None
    mode: Literal["zero", "set", "add"] = "zero"
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise InputError(f"FeatureEdit mode must be one of {EDIT_MODES}, got {self.mode!r}")


def feature_edit_hooks(model: "HookedMLLM", sae: SAE, inputs: "MultimodalInputs", edits: Sequence[FeatureEdit],
                       context: GroupContext | None = None) -> list[tuple[str, Callable]]:
    """Forward hooks making `edits` at `<point>.hook_sae_acts_post`, for a forward of `inputs`
    with `sae` spliced (`with model.saes(saes=[sae], use_error_term=True): model.run_with_hooks(...)`)."""
    site = site_for(model, sae.cfg.hook_name)
    checked_features(sae, [e.feature for e in edits])
    masks = [None if e.group is None else group_mask(inputs, site, e.group, context) for e in edits]

    def edit(acts: Tensor, hook) -> Tensor:
        acts = acts.clone()
        for change, mask in zip(edits, masks):
            old = acts[..., change.feature]
            new = torch.zeros_like(old) if change.mode == "zero" else \
                torch.full_like(old, change.value) if change.mode == "set" else old + change.value
            acts[..., change.feature] = new if mask is None else torch.where(_fit(mask, old), new, old)
        return acts

    return [(f"{site.hook}.{FEATURES_POINT}", edit)]


def run_with_feature_edits(model: "HookedMLLM", sae: SAE, inputs: "MultimodalInputs", edits: Sequence[FeatureEdit],
                           context: GroupContext | None = None, **kwargs) -> Tensor:
    """One forward with `sae` spliced with its error term and `edits` made: the model's output
    changes by exactly the edited features' decoder contributions at the edited tokens."""
    hooks = feature_edit_hooks(model, sae, inputs, edits, context)
    with model.saes(saes=[sae], use_error_term=True):
        return model.run_with_hooks(inputs, fwd_hooks=hooks, **kwargs)


def group_mask(inputs: "MultimodalInputs", site: Site, group: TokenGroup,
               context: GroupContext | None = None) -> Bool[Tensor, "..."]:
    """A token group (over LLM positions) as a mask over the site's leading dims: the positions
    for the LLM, the adapter's rows of those tokens, or the vision patches feeding them (on the
    site's own tower's grid)."""
    selected = group.resolve(inputs, context)
    return selected if site.stage == "llm" else image_token_positions(site, inputs.layout, selected)


@dataclass
class FeatureAttribution:
    """Estimated metric change from patching each feature at each position of the SAE's point
    from the source run into the target run (`values`, the point's leading dims then d_sae), and
    the unpatched runs' metrics per row."""

    site: Site
    values: Float[Tensor, "... d_sae"]
    source_metric: Float[Tensor, "batch"]
    target_metric: Float[Tensor, "batch"]

    def at_image_tokens(self, inputs: "MultimodalInputs") -> Float[Tensor, "n_images n_tokens d_sae"]:
        """The estimates at every image's grid tokens (`layout.gather` rows)."""
        return gather_image_tokens(self.site, self.values, inputs.layout)


def feature_attribution(model: "HookedMLLM", sae: SAE, source: Run | "MultimodalInputs",
                        target: Run | "MultimodalInputs", metric: Metric, *, group: TokenGroup | None = None,
                        context: GroupContext | None = None) -> FeatureAttribution:
    """Gradient x activation difference at the SAE's features, from one source forward and one
    target forward + backward with the SAE spliced with its error term; with `group`, estimates
    outside its tokens are zero. The metric must be differentiable (a logit difference, a margin)."""
    source, target = as_run(source, "source"), as_run(target, "target")
    check_same_layout(source.inputs, target.inputs)
    site = site_for(model, sae.cfg.hook_name)
    name = f"{site.hook}.{FEATURES_POINT}"

    def into_graph(acts: Tensor, hook) -> Tensor:
        return acts.detach().requires_grad_()  # frozen weights: start the graph at the features

    with model.saes(saes=[sae], use_error_term=True):
        with torch.no_grad():
            clean = run_and_collect(model, source, [name, *metric_hooks(metric)])
        source_metric = evaluate(metric, clean, source.inputs)
        with torch.enable_grad():
            found = run_and_collect(model, target, [name, *metric_hooks(metric)], detach=False,
                                    extra_hooks=[(name, into_graph)])
            values = evaluate(metric, found, target.inputs)
            if not values.requires_grad:
                raise InputError("the metric has no gradient with respect to the features (an accuracy is a step "
                                 "function); use a differentiable metric such as a logit difference")
            (grad,) = torch.autograd.grad(values.nansum(), [found[name]], allow_unused=True)
    grad = torch.zeros_like(found[name]) if grad is None else grad
    estimate = (clean[name].float() - found[name].detach().float()) * grad.float()
    if group is not None:
        estimate = torch.where(_fit(group_mask(target.inputs, site, group, context), estimate[..., 0])[..., None],
                               estimate, torch.zeros_like(estimate))
    return FeatureAttribution(site, estimate.detach(), source_metric.detach(), values.detach())


def _fit(mask: Tensor, like: Tensor) -> Tensor:
    if tuple(mask.shape) != tuple(like.shape):
        raise InputError(f"a token selection of shape {tuple(mask.shape)} for features at positions {tuple(like.shape)}; "
                         "resolve the group on the inputs of this forward")
    return mask.to(like.device)
