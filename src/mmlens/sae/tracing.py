"""A vision SAE's feature traced through the adapter into the LLM, by ablation.

The vision SAE is spliced with its error term and the feature zeroed at every patch; the change
this makes downstream is measured against the same spliced run without the ablation: at the
adapter's output, per LLM image token (the norm of the change), and, when an LLM-side SAE is
given, in that SAE's features at the image tokens. With the error term the ablation removes
exactly the feature's decoder contribution, so a token that changes is one the feature reaches
through the adapter's path (its projection, pixel shuffle or pooling), whatever the family. One
forward per traced feature; ablation rather than a Jacobian, so nonlinear adapters are measured
as they run (the causal tracing of Meng et al. 2022, https://arxiv.org/abs/2202.05262, applied to
a feature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..probing.sites import gather_image_tokens, site_for, site_layout
from .maps import FEATURES_POINT, checked_features
from .sae import SAE

if TYPE_CHECKING:
    from ..model import HookedMLLM, MultimodalInputs

ADAPTER_OUTPUT = "adapter.hook_out"


@dataclass(frozen=True)
class FeatureTrace:
    """Where vision feature `feature` goes: its activation at the patches (`vision`, gather rows
    of the vision stage), the change its ablation makes at the adapter output per LLM image token
    (`token_change`, the L2 norm; adapter gather rows), and, with an LLM SAE, each of its features'
    mean absolute change over the image tokens (`llm_feature_change`, [d_sae of the LLM SAE])."""

    feature: int
    vision: Float[Tensor, "n_images n_patches"]
    token_change: Float[Tensor, "n_images n_tokens"]
    llm_feature_change: Float[Tensor, "llm_d_sae"] | None

    def top_llm_features(self, k: int = 5) -> list[tuple[int, float]]:
        """The LLM SAE's features the ablation moves most, with their mean absolute change."""
        if self.llm_feature_change is None:
            raise InputError("no LLM SAE was traced into: pass llm_sae= to trace_vision_feature")
        values, index = self.llm_feature_change.topk(min(k, len(self.llm_feature_change)))
        return [(int(i), float(v)) for i, v in zip(index, values)]


@torch.no_grad()
def trace_vision_feature(model: "HookedMLLM", vision_sae: SAE, inputs: "MultimodalInputs", feature: int,
                         llm_sae: SAE | None = None) -> FeatureTrace:
    """Ablate `feature` of `vision_sae` at every patch and measure what changes at the adapter's
    output and in `llm_sae`'s features (an adapter or LLM SAE) at the image tokens."""
    vision_site = site_for(model, vision_sae.cfg.hook_name)
    if vision_site.stage != "vision":
        raise InputError(f"trace_vision_feature traces a vision-tower SAE; this one reads {vision_site.hook}")
    checked_features(vision_sae, [feature])
    adapter_site = site_for(model, ADAPTER_OUTPUT)
    saes, names = [vision_sae], [ADAPTER_OUTPUT, f"{vision_site.hook}.{FEATURES_POINT}"]
    llm_site = None
    if llm_sae is not None:
        llm_site = site_for(model, llm_sae.cfg.hook_name)
        if llm_site.stage == "vision":
            raise InputError(f"llm_sae reads {llm_site.hook}, a vision point; give an adapter or LLM SAE")
        saes.append(llm_sae)
        names.append(f"{llm_site.hook}.{FEATURES_POINT}")

    def ablate(acts: Tensor, hook) -> Tensor:
        acts = acts.clone()
        acts[..., feature] = 0.0
        return acts

    kept, ablated = {}, {}
    with model.saes(saes=saes, use_error_term=True):
        for store, hooks in ((kept, []), (ablated, [(names[1], ablate)])):
            def keep(activation: Tensor, hook, store=store) -> None:
                store[hook.name] = activation.detach()
            model.run_with_hooks(inputs, fwd_hooks=[*hooks, *((n, keep) for n in names)], return_type=None)
    layout = inputs.layout
    change = (ablated[ADAPTER_OUTPUT] - kept[ADAPTER_OUTPUT]).float().norm(dim=-1)
    token_change = gather_image_tokens(adapter_site, change, layout).cpu()
    vision = gather_image_tokens(vision_site, kept[names[1]][..., feature], layout).cpu()
    llm_change = None
    if llm_site is not None:
        moved = gather_image_tokens(llm_site, (ablated[names[2]] - kept[names[2]]).abs().float(), layout)
        present = site_layout(llm_site, layout).table(llm_site.stage).present.to(moved.device)
        llm_change = (moved[present].mean(0)).cpu()
    return FeatureTrace(int(feature), vision, token_change, llm_change)
