"""Config values that only the machine, the model or the dataset can judge, checked before any stage.

The schema (`config.py`) checks what a config says on its own. Whether `knockout.layers: [12]`
exists, a hook name is real, `device: cuda` is usable or the dataset is big enough to split is
known only once the model and data are loaded; checking it then, before the first stage, keeps
a typo from failing hours later, after the probe sweep.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import HookNameError, InputError
from ..placement import placement_problem
from ..probing.split import split_sizes
from .config import StudyConfig


def device_problems(config: StudyConfig) -> list[str]:
    """Whether this machine (and, under torchrun, this rank) has the configured device or GPUs."""
    problem = placement_problem(config.device, config.device_map)
    return [problem] if problem else []


def model_problems(config: StudyConfig, model: Any, n_images: int) -> list[str]:
    """Every config value that names something the model or the dataset must have."""
    problems = []
    n_layers = model.cfg.n_layers
    layer_lists = [("position.layers", config.position.enabled, config.position.layers),
                   ("knockout.layers", config.knockout.enabled, config.knockout.layers),
                   ("recovery.window", config.recovery.enabled, config.recovery.window)]
    for key, enabled, layers in layer_lists:
        missing = [layer for layer in layers or [] if layer >= n_layers]
        if enabled and missing:
            problems.append(f"{key}: layer(s) {missing} do not exist; {config.model}'s LLM has layers 0..{n_layers - 1}")
    if isinstance(config.probe.sites, list):
        problems += [p for i, site in enumerate(config.probe.sites) if (p := _hook_problem(model, f"probe.sites[{i}]", site))]
    problems += _recovery_layer_problems(config, model)
    for key, enabled, hook in [("knockout.reference", config.knockout.enabled, config.knockout.reference),
                               ("recovery.reference", config.recovery.enabled, config.recovery.reference),
                               ("recovery.readout", config.recovery.enabled, config.recovery.readout)]:
        if enabled and hook is not None and (problem := _hook_problem(model, key, hook)):
            problems.append(problem)
    try:
        split_sizes(n_images, config.probe.test_fraction)
    except InputError as error:
        problems.append(f"dataset.n: the dataset has {n_images} images; {error}")
    return problems


def _recovery_layer_problems(config: StudyConfig, model: Any) -> list[str]:
    """The recovery reads blocks.L.hook_resid_post: L must exist and be probed."""
    layer, n_layers = config.probe.recovery_layer, model.cfg.n_layers
    if layer == "last":
        return []
    if layer >= n_layers:
        return [f"probe.recovery_layer: layer {layer} does not exist; {config.model}'s LLM has layers 0..{n_layers - 1}"]
    sites = config.probe.sites
    hook = f"blocks.{layer}.hook_resid_post"
    probed = sites in ("all", "llm") or (isinstance(sites, list) and any(
        _hook_problem(model, "", s) is None and model.resolve_hook_name(s) == hook for s in sites))
    return [] if probed else [f"probe.recovery_layer: {hook} is not among probe.sites; add it or use last"]


def _hook_problem(model: Any, key: str, name: str) -> str | None:
    try:
        model.resolve_hook_name(name)
    except HookNameError:
        close = difflib.get_close_matches(name, model.hook_names(), n=3, cutoff=0.5)
        return f"{key}: {name!r} is not a hook of this model; closest: {close or 'none'} (`mmlens hooks MODEL` lists them)"
    return None


__all__ = ["device_problems", "model_problems"]
