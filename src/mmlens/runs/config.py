"""The study configuration: typed sections, validated up front, with a canonical hash.

A YAML file becomes a `StudyConfig` of nested dataclasses. Validation walks every field against
its type hint and its constraint and reports every problem at once with its key path
("dataset.n: must be a positive integer, got -3"); an unknown key is an error that suggests the
closest known one. The canonical form (sorted-key JSON of every setting, defaults filled in) is
hashed so that a run folder can tell whether it was made by the same study.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml

# Only light modules here: a config is validated (and its errors shown) without importing torch.
from ..defaults import DEFAULT_FOLDS, LOGISTIC_L2S, MAX_ITER, MIN_IMAGE_SIZE, RIDGE_ALPHAS
from ..errors import ConfigError, HookNameError
from ..resampling import DEFAULT_N_BOOT, MIN_N_BOOT
from .config_yaml import parse_config_yaml

# Seeds are stored in int64 table columns and seed torch's generators (at most 2**64 - 1).
MAX_SEED = 2**63 - 1
# An index array of n_boot x images is held per interval: 10**5 x 2,000 images is 1.6 GB.
MAX_N_BOOT = 100_000


# Constraints: each returns an error message (without the key path) or None. Numbers that are not
# finite are refused by every numeric constraint: inf and nan pass comparisons such as `> 0`.
def positive(value: Any) -> str | None:
    kind = "integer" if isinstance(value, int) else "number"
    return None if value > 0 and math.isfinite(value) else f"must be a positive {kind}, got {value!r}"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 and math.isfinite(value) else f"must be zero or more, got {value!r}"


def valid_seed(value: Any) -> str | None:
    return None if 0 <= value <= MAX_SEED else f"must be a seed in 0..2**63-1, got {value!r}"


def image_side(value: Any) -> str | None:
    return None if value >= MIN_IMAGE_SIZE else (f"must be at least {MIN_IMAGE_SIZE} px (smaller images hold less "
                                                 f"than one patch of a vision encoder), got {value!r}")


def at_least_two(value: Any) -> str | None:
    return None if value >= 2 else f"must be at least 2, got {value!r}"


def open_unit(value: Any) -> str | None:
    return None if 0 < value < 1 else f"must be strictly between 0 and 1, got {value!r}"


def unit_fraction(value: Any) -> str | None:
    return None if 0 <= value <= 1 else f"must be between 0 and 1, got {value!r}"


def up_to_half(value: Any) -> str | None:
    return None if 0 < value <= 0.5 else f"must be in (0, 0.5], got {value!r}"


def penalty(value: Any) -> str | None:
    if value == "cv":
        return None
    return None if value > 0 and math.isfinite(value) else f"must be a positive number or cv, got {value!r}"


def non_empty_positive(values: Any) -> str | None:
    if not values:
        return "must not be empty"
    bad = [v for v in values if not (v > 0 and math.isfinite(v))]
    return f"must hold positive numbers only, got {bad}" if bad else None


def layer_or_last(value: Any) -> str | None:
    if value == "last":
        return None
    return None if value >= 0 else f"must be last or a layer number (0 or more), got {value!r}"


def enough_resamples(value: Any) -> str | None:
    if value > MAX_N_BOOT:
        return f"must be at most {MAX_N_BOOT} (memory grows with the resamples; the default is {DEFAULT_N_BOOT}), got {value!r}"
    return None if value >= MIN_N_BOOT else (f"must be at least {MIN_N_BOOT} (a 95% interval's tails rest on 2.5% of "
                                             f"the resamples; the default is {DEFAULT_N_BOOT}), got {value!r}")


def non_empty(value: Any) -> str | None:
    return None if len(value) > 0 else "must not be empty"


def at_least_four(value: Any) -> str | None:
    return None if value >= 4 else f"must be at least 4 (2 images choose the heads, 2 score them), got {value!r}"


def layer_list(values: Any) -> str | None:
    if not values:
        return "must not be empty (null: the default layers); to skip the stage set enabled: false"
    return each(non_negative)(values)


def all_of(*checks: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def check_all(value: Any) -> str | None:
        return next((problem for check in checks if (problem := check(value))), None)

    return check_all


def each(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def check_items(values: Any) -> str | None:
        for i, v in enumerate(values):
            problem = check(v)
            if problem:
                return f"item {i} {problem}"
        return None

    return check_items


def checked(default: Any = dataclasses.MISSING, *, check: Callable | None = None, doc: str = "",
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a constraint and a one-line description (shown in docs/cli.md)."""
    return field(default=default, default_factory=default_factory, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class DatasetConfig:
    name: Literal["scenes", "ade20k", "scene_parse_150", "voc", "cityscapes"] = checked()
    path: str | None = checked(None, doc="dataset folder (not for scenes)")
    split: str = checked("validation")
    n: int | None = checked(200, check=positive, doc="number of images (null: all)")
    image_size: int | None = checked(None, check=image_side,
                                     doc="square side; null: native resolution (scenes: 64 px, the embedded models' size)")
    seed: int = checked(0, check=valid_seed, doc="which synthetic scenes are drawn (scenes only)")


@dataclass(frozen=True)
class ProbeConfig:
    sites: Union[str, list[str]] = checked("all", doc="all, vision, adapter, llm or a list of hook names")
    kind: Literal["ridge", "logistic", "sparse"] = checked(
        "ridge", doc="ridge: closed form from streamed sums, its penalty cross-validated at little cost; logistic: "
                     "L-BFGS over a disk store, folds x l2s + 1 fits per site under cv; sparse: logistic on the k raw "
                     "dimensions per class with the largest class-mean difference, k cross-validated from 1, 2, 4, 8, 16")
    controls: list[Literal["shuffled_labels", "control_task", "random_llm", "random_init"]] = checked(
        default_factory=lambda: ["shuffled_labels", "control_task", "random_llm", "random_init"],
        doc="random_llm: trained vision tower and adapter, re-drawn LLM (the control for recovery); control_task: "
            "a fixed random class per visual type (selectivity)")
    test_fraction: float = checked(0.25, check=open_unit)
    alpha: Union[float, Literal["cv"]] = checked("cv", check=penalty, doc="ridge penalty, or cv: chosen per site by "
                                                 "k-fold cross-validation on the training images from alphas")
    l2: Union[float, Literal["cv"]] = checked("cv", check=penalty, doc="logistic penalty, or cv (from l2s)")
    alphas: list[float] = checked(default_factory=lambda: list(RIDGE_ALPHAS), check=non_empty_positive,
                                  doc="ridge candidates for cv")
    l2s: list[float] = checked(default_factory=lambda: list(LOGISTIC_L2S), check=non_empty_positive,
                               doc="logistic candidates for cv")
    cv_folds: int = checked(DEFAULT_FOLDS, check=at_least_two, doc="folds of training images for cv")
    recovery_layer: Union[int, Literal["last"]] = checked("last", check=layer_or_last, doc="LLM layer the recovery "
                                                          "reads, fixed before looking at test images (last: the deepest)")
    sensitivity: bool = checked(True, doc="refit the summary's probes a decade either side of their penalty")
    max_iter: int = checked(MAX_ITER, check=positive, doc="logistic: L-BFGS guard (fits stop at convergence)")
    min_valid_fraction: float = checked(0.5, check=unit_fraction)
    max_train_tokens_per_image: int | None = checked(None, check=positive, doc="logistic: training tokens kept per image (bounds the store's disk)")
    logistic_memory_mb: float = checked(1024.0, check=positive, doc="logistic: features held in memory at once while fitting")
    stats_device: str | None = checked(None, doc="where ridge statistics live (cpu on small GPUs)")
    store_dir: str | None = checked(None, doc="logistic: folder for the activation store (null: scratch/ in the run "
                                              "folder, removed when the stage ends and on resume)")


@dataclass(frozen=True)
class KnockoutConfig:
    enabled: bool = checked(True)
    reference: str = checked("adapter.hook_out", doc="site whose probe defines conflicting pairs and anchors")
    layers: list[int] | None = checked(None, check=layer_list, doc="LLM layers edited (null: after the reference)")
    n_pairs: int = checked(4, check=positive)
    n_control: int = checked(3, check=positive, doc="random same-class control seeds")


@dataclass(frozen=True)
class PositionConfig:
    enabled: bool = checked(True)
    layers: list[int] | None = checked(None, check=layer_list, doc="LLM layers made bidirectional (null: all)")
    early_fraction: float = checked(0.25, check=up_to_half)
    exclude: list[Union[int, str]] | None = checked(None, doc="classes not scored (null: background)")


@dataclass(frozen=True)
class RecoveryConfig:
    enabled: bool = checked(True)
    corruption: Literal["recovery_blocked", "anchors_removed", "counterfactual"] = checked(
        "recovery_blocked", doc="how the run is broken before heads are patched back in")
    reference: str = checked("adapter.hook_out", doc="site whose probe defines anchors and recovered tokens")
    readout: str | None = checked(None, doc="probed site scored by the metric (null: the last probed LLM site)")
    window: list[int] | None = checked(None, check=layer_list, doc="LLM layers blocked by recovery_blocked (null: all)")
    tokens: Literal["objects", "all", "recovered"] = checked("objects", doc="tokens the probe margin is averaged over")
    hook: Literal["z", "result"] = checked("z", doc="per-head activation that is patched")
    n_images: int | None = checked(64, check=at_least_four, doc="held-out images patched, half choosing the heads and "
                                                               "half scoring them (null: all)")
    top_k: int = checked(4, check=positive, doc="best heads also patched together")
    attribution: bool = checked(True, doc="also estimate every head's effect by attribution patching")
    n_maps: int = checked(2, check=non_negative, doc="attention recovery maps drawn")
    chunk_size: int | None = checked(None, check=positive, doc="patched runs per forward batch (null: the experiment's default)")


@dataclass(frozen=True)
class SAESectionConfig:
    enabled: bool = checked(False, doc="study an SAE at hook and add its feature page to the report")
    hook: str = checked("adapter.hook_out", doc="site the SAE reads")
    path: str | None = checked(None, doc="load this SAE (mmlens.load_sae) instead of training one on the training "
                                         "images; a relative path is read from the working directory, as dataset.path "
                                         "is. Its files' sha256 is part of the stage's key: a replaced SAE is rerun")
    architecture: Literal["standard", "topk", "batchtopk", "jumprelu"] = checked("topk", doc="trained SAE's kind")
    d_sae: int = checked(128, check=positive, doc="trained SAE's features")
    k: int = checked(4, check=positive, doc="topk, batchtopk: active features per token")
    steps: int = checked(400, check=positive, doc="training steps of 512 tokens")
    lr: float = checked(2e-3, check=positive)
    n_features: int = checked(6, check=positive, doc="features on the feature page, best training-image class IoU first (scored on held-out images)")
    n_images: int = checked(3, check=positive, doc="held-out images each feature is drawn on")
    n_crops: int = checked(4, check=positive, doc="top-activating crops per feature")


@dataclass(frozen=True)
class LensConfig:
    enabled: bool = checked(False, doc="draw the logit lens at every LLM layer over images in the report")
    n_images: int = checked(2, check=positive, doc="images drawn (the first dataset rows)")
    tuned: bool = checked(False, doc="also train a tuned lens (mmlens.sae.train_tuned_lens) on the training images "
                          "other than the drawn ones and draw its maps beside the logit lens's")


@dataclass(frozen=True)
class StudyConfig:
    """A whole study as `mmlens study` reads it from YAML: model, dataset and each stage's settings, checked."""

    model: str = checked(doc="shipped name (tiny-shapes-llava), local folder or hub id")
    dataset: DatasetConfig = checked()
    device: str = checked("cpu", doc="cpu, cuda, cuda:N, mps, or auto (a GPU when there is one); under torchrun "
                                     "cuda and auto are each rank's own GPU, cuda:LOCAL_RANK")
    dtype: Literal["float32", "float16", "bfloat16"] = checked("float32")
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = checked(
        None, doc="split the model over the visible GPUs (accelerate); replaces device. Under torchrun each rank "
                  "splits its copy over its own GPUs: GPUs per node / processes per node, which must divide evenly")
    seeds: list[int] = checked(default_factory=lambda: [0], check=all_of(non_empty, each(valid_seed)),
                               doc="each seed repeats the study (split, bootstrap, controls)")
    batch_size: int = checked(16, check=positive)
    prompt: str = checked("", doc="text beside the image; the chat template is applied")
    n_boot: int = checked(DEFAULT_N_BOOT, check=enough_resamples, doc=f"bootstrap resamples for intervals (at least {MIN_N_BOOT})")
    probe: ProbeConfig = checked(default_factory=ProbeConfig)
    knockout: KnockoutConfig = checked(default_factory=KnockoutConfig)
    position: PositionConfig = checked(default_factory=PositionConfig)
    recovery: RecoveryConfig = checked(default_factory=RecoveryConfig)
    sae: SAESectionConfig = checked(default_factory=SAESectionConfig)
    lens: LensConfig = checked(default_factory=LensConfig)
    collective_timeout_s: float = checked(600.0, check=positive, doc="torchrun: seconds a rank waits in a collective "
                                          "before the run fails (waits while rank 0 writes results are not bounded by it)")
    out: str | None = checked(None, doc="default run folder (--out wins); not part of the hash")

    def canonical(self) -> dict[str, Any]:
        """Every setting that changes results, defaults filled in (the run folder's identity)."""
        data = dataclasses.asdict(self)
        for where in ("out", "collective_timeout_s"):  # where and how long, never what is computed
            data.pop(where)
        data["probe"].pop("store_dir")
        for optional in ("sae", "lens"):  # off, they compute nothing: configs made before them keep their hash
            if not data[optional]["enabled"]:
                data.pop(optional)
        if "lens" in data and not self.lens.tuned:  # logit-lens runs made before the tuned lens keep their hash
            data["lens"].pop("tuned")
        if "sae" in data and self.sae.path is not None:  # another SAE at the same path is another study
            data["sae"]["sha256"] = sae_files_sha256(self.sae.path)
        return data

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


# The files `mmlens.load_sae` reads in each format it knows (SAELens, Gemma Scope, dictionary-learning);
# named here so that hashing them needs no torch.
SAE_FILES = ("cfg.json", "sae_weights.safetensors", "params.npz", "ae.pt", "config.json")
_SAE_DIGESTS: dict[tuple, str] = {}


def sae_files_sha256(path: str | Path) -> str | None:
    """One sha256 over the SAE files at `path` (a folder: those of `SAE_FILES` in it; a file: it, and
    config.json beside an ae.pt), each with its name; None when there is none (the up-front checks
    report a missing SAE). Cached per file size and modification time: an SAE can be gigabytes."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = [path / name for name in SAE_FILES if (path / name).is_file()]
    elif path.is_file():
        beside = path.parent / "config.json"
        files = [path] + ([beside] if path.name == "ae.pt" and beside.is_file() else [])
    else:
        return None
    if not files:
        return None
    stamp = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stamp not in _SAE_DIGESTS:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        _SAE_DIGESTS[stamp] = digest.hexdigest()
    return _SAE_DIGESTS[stamp]


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"no such config file: {path}"])
    try:
        data, repeated = parse_config_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError([f"not valid YAML: {error}"], str(path)) from None
    if repeated:
        raise ConfigError(repeated, str(path))
    return config_from_dict(data, source=str(path))


def config_from_dict(data: Any, source: str | None = None) -> StudyConfig:
    """Validate a plain mapping (as parsed from YAML) into a `StudyConfig`; raise `ConfigError`
    listing every problem."""
    problems: list[str] = []
    config = _build(StudyConfig, data, "", problems)
    if not problems:
        problems += _cross_checks(config)
    if problems:
        raise ConfigError(problems, source)
    return config


def _cross_checks(config: StudyConfig) -> list[str]:
    """Constraints between fields."""
    problems = []
    data = config.dataset
    if data.name == "scenes":
        if data.path is not None:
            problems.append("dataset.path: 'scenes' is generated and takes no path; remove it")
    elif data.path is None and data.name != "scene_parse_150":
        problems.append(f"dataset.path: {data.name!r} is read from a folder; give its path")
    from ..data import DATASET_SPLITS  # the loaders' modules (datasets, PIL): only once the fields are valid

    splits = DATASET_SPLITS[data.name]
    if data.split not in splits:
        problems.append(f"dataset.split: {data.name!r} has no split {data.split!r}; use one of {', '.join(splits)}")
    if len(set(config.seeds)) != len(config.seeds):
        problems.append(f"seeds: must not repeat, got {config.seeds}")
    if len(set(config.probe.controls)) != len(config.probe.controls):
        problems.append(f"probe.controls: must not repeat, got {config.probe.controls}")
    for section in ("knockout", "recovery"):
        problems += _needs_probe_at(config, section, getattr(config, section).reference)
    readout = config.recovery.readout
    if config.recovery.enabled and readout and isinstance(config.probe.sites, list) and readout not in config.probe.sites:
        problems.append(f"recovery.readout: {readout!r} must be one of probe.sites (the stage reuses its probe)")
    return problems


def _names_an_llm_block(name: str) -> bool:
    from ..model.hook_names import parse_hook_name  # mmlens.model loads torch: only when asked

    try:
        parsed = parse_hook_name(name)
    except HookNameError:  # a malformed name is reported by the name checks
        return False
    return parsed.in_llm_block


def _needs_probe_at(config: StudyConfig, section: str, reference: str) -> list[str]:
    """Stages that reuse the sweep's probes need a probe at their reference and in the LLM."""
    if not getattr(config, section).enabled:
        return []
    sites = config.probe.sites
    if isinstance(sites, str) and sites in ("vision", "adapter"):
        return [f"{section}.enabled: this stage reads the sweep's LLM probes, but probe.sites is {sites!r}; "
                f"use 'all', or set {section}.enabled: false"]
    if sites == "llm" and not _names_an_llm_block(reference):
        return [f"{section}.reference: {reference!r} is not probed when probe.sites is 'llm' (LLM layers only); "
                f"use probe.sites: all, list it in probe.sites, or pick an LLM reference (blocks.L.hook_resid_post)"]
    if isinstance(sites, list) and reference not in sites:
        return [f"{section}.reference: {reference!r} must be one of probe.sites (the stage reuses its probe)"]
    return []


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    where = path or "the config"
    if data is None and path == "":
        problems.append("the config is empty; it needs at least `model` and `dataset`")
        return None
    if not isinstance(data, dict):
        problems.append(f"{where}: must be a mapping of keys to values, got {_shown(data)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            problems.append(f"{_join(path, key)}: unknown key{hint}")
    values, missing = {}, False
    for name, f in fields.items():
        key_path = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{key_path}: required, missing")
                missing = True
            continue
        before = len(problems)
        value = _coerce(hints[name], data[name], key_path, problems)
        check = f.metadata.get("check")
        if len(problems) == before and check is not None and value is not None:
            message = check(value)
            if message:
                problems.append(f"{key_path}: {message}")
        values[name] = value
    return None if missing else cls(**values)


def _coerce(hint: Any, value: Any, path: str, problems: list[str]) -> Any:
    """`value` checked against the type `hint`; problems are appended, the value returned."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, problems)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            problems.append(f"{path}: must not be null")
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            trial: list[str] = []
            result = _coerce(option, value, path, trial)
            if not trial:
                return result
        problems.append(f"{path}: must be {' or '.join(_describe(o) for o in options)}, got {_shown(value)}")
        return value
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.6)
            hint_text = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{path}: must be one of {', '.join(map(repr, args))}, got {_shown(value)}{hint_text}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: must be a list ({_describe(hint)}), got {_shown(value)}")
            return value
        return [_coerce(args[0], v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: must be true or false, got {_shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: must be an integer, got {_shown(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: must be a number, got {_shown(value)}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"{path}: must be a string, got {_shown(value)}")
        return value
    raise TypeError(f"no validation for type {hint!r} at {path}")  # a bug in the schema, not in the config


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "values from " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_plural(a) for a in args if a is not type(None))
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(hint, str(hint))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def schema_lines(cls: type = StudyConfig, path: str = "") -> list[str]:
    """One line per setting: key path, type, default and description (for docs and --help)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(path, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            lines += schema_lines(hints[f.name], key)
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default {json.dumps(f.default)}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {json.dumps(f.default_factory())}"
        else:
            default = "required"
        doc = f.metadata.get("doc", "")
        lines.append(f"{key}: {_describe(hints[f.name])}, {default}" + (f". {doc}" if doc else ""))
    return lines
