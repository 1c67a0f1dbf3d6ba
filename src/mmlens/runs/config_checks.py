"""Config values that only the machine, the model or the dataset can judge, checked before any stage.

The schema (`config.py`) checks what a config says on its own. Whether `knockout.layers: [12]`
exists, a hook name is real, `device: cuda` is usable or the dataset is big enough to split is
known only once the model and data are loaded; checking it then, before the first stage, keeps
a typo from failing hours later, after the probe sweep.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ..errors import HookNameError, InputError
from ..model.hook_names import parse_hook_name
from ..model.runtime.devices import device_problem
from ..placement import placement_problem
from ..probing.sites import default_sites, site_for
from ..probing.split import split_sizes
from .config import StudyConfig

RECOVERY_MIN_IMAGES = 4  # 2 choose the heads, 2 score them: each half needs an interval


def device_problems(config: StudyConfig) -> list[str]:
    """What this machine (and, under torchrun, this rank) must have: the configured device or GPUs,
    the device for ridge statistics, the dataset folder and a usable activation-store folder."""
    problems = []
    problem = placement_problem(config.device, config.device_map)
    if problem:
        problems.append(problem)
    if config.probe.stats_device is not None and (problem := device_problem(config.probe.stats_device)):
        problems.append(f"probe.stats_device: {problem}")
    path = config.dataset.path
    if path is not None and not Path(path).expanduser().is_dir():
        problems.append(f"dataset.path: {path!r} is not a folder on this machine; give the dataset's root folder")
    store = config.probe.store_dir
    if store is not None and Path(store).expanduser().exists() and not Path(store).expanduser().is_dir():
        problems.append(f"probe.store_dir: {store!r} is a file, not a folder; name a folder (it is created if missing)")
    problems += _sae_config(config)[1]
    return problems


def _sae_config(config: StudyConfig) -> tuple[Any, list[str]]:
    """The config of the SAE at `sae.path` (read without its weights where the format allows), or
    the problem that stops it loading; (None, []) when no SAE is loaded."""
    if not config.sae.enabled or config.sae.path is None:
        return None, []
    from ..errors import ModelLoadError
    from ..sae.formats import read_sae_config

    path = config.sae.path
    try:
        return read_sae_config(Path(path).expanduser()), []
    except (ModelLoadError, InputError, OSError, ValueError) as error:
        relative = not Path(path).expanduser().is_absolute()
        where = f" (a relative path is read from the working directory, {Path.cwd()})" if relative else ""
        return None, [f"sae.path: {path!r} cannot be loaded{where}: {error}"]


def _sae_problems(config: StudyConfig, model: Any) -> list[str]:
    """The SAE at `sae.path` must read `sae.hook` of this model at its width. An SAE whose file names
    no hook of this model (Gemma Scope's name none; others name another library's point) is taken to
    read `sae.hook`, as `load_sae(path, hook_name=...)` does; its width is still checked."""
    cfg, problems = _sae_config(config)
    if cfg is None or _hook_problem(model, "", config.sae.hook):  # reported by device_problems / the hook checks
        return []
    path, hook = config.sae.path, model.resolve_hook_name(config.sae.hook)
    own = cfg.hook_name
    if own is not None and not _hook_problem(model, "", own):
        if model.resolve_hook_name(own) != hook:
            return [f"sae.path: the SAE at {path!r} reads {own!r} ({model.resolve_hook_name(own)}), but sae.hook is "
                    f"{config.sae.hook!r} ({hook}); set sae.hook: {own}, or give the SAE trained at {config.sae.hook}"]
    from ..sae.splice import expected_width

    width = expected_width(model, hook)
    if width is not None and cfg.d_in != width:
        problems.append(f"sae.path: the SAE at {path!r} reads {cfg.d_in} dimensions but {hook} of {config.model} "
                        f"has {width}; give the SAE trained at this site of this model")
    return problems


def model_problems(config: StudyConfig, model: Any, dataset: Any) -> list[str]:
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
    site_problems = []
    if isinstance(config.probe.sites, list):
        site_problems = [p for i, site in enumerate(config.probe.sites)
                         if (p := _hook_problem(model, f"probe.sites[{i}]", site))]
    problems += site_problems
    problems += _recovery_layer_problems(config, model)
    hooks = [("knockout.reference", config.knockout.enabled, config.knockout.reference),
             ("recovery.reference", config.recovery.enabled, config.recovery.reference),
             ("recovery.readout", config.recovery.enabled, config.recovery.readout),
             ("sae.hook", config.sae.enabled, config.sae.hook)]
    named = []
    for key, enabled, hook in hooks:
        if enabled and hook is not None:
            problem = _hook_problem(model, key, hook)
            problems += [problem] if problem else []
            named += [] if problem else [(key, hook)]
    # which sites the sweep probes is known only when every name in probe.sites resolves
    probed = None if site_problems else {site.hook: site for site in default_sites(model, config.probe.sites)}
    problems += _reused_probe_problems(config, model, named, probed)
    problems += _knockout_window_problems(config, model)
    problems += _sae_problems(config, model)
    problems += _dataset_problems(config, dataset)
    return problems


def _reused_probe_problems(config: StudyConfig, model: Any, named: list[tuple[str, str]],
                           probed: dict[str, Any] | None) -> list[str]:
    """Knockout and recovery reuse the sweep's probes on the LLM token grid: their sites must be
    probed (`probed`: hook -> site, None when unknown) and must not be vision sites, whose tokens
    are patches, not the LLM's image tokens."""
    problems = []
    for key, hook in named:
        site = site_for(model, hook)
        if site.grid != "llm":
            problems.append(f"{key}: {hook!r} is a vision site; the stage reads image tokens on the LLM grid: use "
                            "adapter.hook_out or an LLM site (blocks.L.hook_resid_post)")
        elif probed is not None and site.hook not in probed:
            problems.append(f"{key}: {hook!r} is not probed with probe.sites: {config.probe.sites!r}; add it to "
                            "probe.sites (the stage reuses the sweep's probe there)")
    if (config.recovery.enabled and config.recovery.readout is None and probed is not None
            and not any(s.stage == "llm" for s in probed.values())):
        problems.append(f"recovery.readout: null reads the last probed LLM site, but probe.sites {config.probe.sites!r} "
                        "holds none; add an LLM site (blocks.L.hook_resid_post) to probe.sites or name a readout")
    return problems


def _knockout_window_problems(config: StudyConfig, model: Any) -> list[str]:
    """With `knockout.layers: null` the knockout edits the LLM layers after its reference: there must be one."""
    knockout = config.knockout
    if not knockout.enabled or knockout.layers is not None or _hook_problem(model, "", knockout.reference):
        return []
    site = site_for(model, knockout.reference)
    if site.stage != "llm":
        return []
    if parse_hook_name(site.hook).first_block_after(model.cfg.n_layers) < model.cfg.n_layers:
        return []
    return [f"knockout.reference: no LLM layer comes after {knockout.reference!r} (the LLM has layers "
            f"0..{model.cfg.n_layers - 1}), so there is nothing to knock out; pick an earlier reference or set "
            "knockout.layers"]


def _dataset_problems(config: StudyConfig, dataset: Any) -> list[str]:
    """Enough images for the split, its folds and the recovery's halves; classes that exist."""
    from ..data import segmentation_info

    problems, n_images = [], len(dataset)
    try:
        n_train, n_test = split_sizes(n_images, config.probe.test_fraction)
    except InputError as error:
        return [f"dataset.n: the dataset has {n_images} images; {error}"]
    probe = config.probe
    cross_validated = (probe.alpha if probe.kind == "ridge" else probe.l2) == "cv"
    if cross_validated and n_train < probe.cv_folds:
        problems.append(f"probe.cv_folds: {n_train} training images cannot be dealt into {probe.cv_folds} folds; "
                        "use fewer folds or more images (dataset.n)")
    recovery = config.recovery
    scored = n_test if recovery.n_images is None else min(recovery.n_images, n_test)
    if recovery.enabled and scored < RECOVERY_MIN_IMAGES:
        problems.append(f"dataset.n: recovery heads need at least {RECOVERY_MIN_IMAGES} held-out images (2 choose the "
                        f"heads, 2 score them); this split holds {n_test}. Use more images or set recovery.enabled: false")
    if config.position.enabled and config.position.exclude is not None:
        problems += _exclude_problems(config.position.exclude, list(segmentation_info(dataset).class_names))
    return problems


def _exclude_problems(exclude: list[int | str], names: list[str]) -> list[str]:
    problems, excluded = [], set()
    for i, item in enumerate(exclude):
        if isinstance(item, str) and item not in names:
            close = difflib.get_close_matches(item, names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"classes: {names}"
            problems.append(f"position.exclude[{i}]: {item!r} is not a class of this dataset; {hint}")
        elif isinstance(item, int) and not 0 <= item < len(names):
            problems.append(f"position.exclude[{i}]: class {item} does not exist; this dataset has classes "
                            f"0..{len(names) - 1} ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
        else:
            excluded.add(names.index(item) if isinstance(item, str) else item)
    if not problems and len(excluded) >= len(names):
        problems.append(f"position.exclude: every class ({names}) is excluded, so no token would be scored; exclude fewer")
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
