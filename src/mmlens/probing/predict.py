"""Apply fitted probes to the image tokens of a batch, on the plain model or under an intervention.

Experiments compare what the same probes read out of the model with and without an edit, so a
prediction is one forward pass whose hooks gather the image tokens at every probed site and
classify them on the spot (nothing else is cached). Extra forward hooks carry the edit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ..model import HookedMLLM, MultimodalInputs
from .linear import LinearProbe
from .sites import gather_image_tokens, site_for


@torch.no_grad()
def predict_image_tokens(
    model: HookedMLLM,
    inputs: MultimodalInputs,
    probes: Mapping[str, LinearProbe],
    *,
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    activations: Mapping[str, Tensor] | None = None,
) -> dict[str, Int[Tensor, "n_images n_tokens"]]:
    """Each probe's class for every grid token of every image (CPU, `pixel_values` order).

    With `activations` (hook name -> activation of these inputs, e.g. a clean cache) no forward
    runs; otherwise one forward with `fwd_hooks` (the edit) and the gathering hooks.
    """
    sites = {name: site_for(model, name) for name in probes}
    out: dict[str, Tensor] = {}

    def classify(name: str, activation: Tensor) -> None:
        x = gather_image_tokens(sites[name], activation, inputs.layout)
        probe = probes[name].to(x.device)
        out[name] = probe.predict(x.flatten(0, 1).float()).view(x.shape[:2]).cpu()

    if activations is not None:
        for name in probes:
            canonical = sites[name].hook
            if canonical not in activations:
                raise KeyError(f"{canonical} is not among the given activations ({sorted(activations)[:5]} ...)")
            classify(name, activations[canonical])
        return out

    def gather(name: str):
        def hook(activation: Tensor, hook) -> None:
            classify(name, activation)
        return hook

    model.run_with_hooks(inputs, fwd_hooks=[*fwd_hooks, *((sites[n].hook, gather(n)) for n in probes)], return_type=None)
    missing = set(probes) - set(out)
    if missing:
        raise RuntimeError(f"the forward pass never reached {sorted(missing)}")
    return out
