"""Probes and whole probe sweeps on disk, exactly: save, load, and get back the same numbers.

A probe is one safetensors file (its standardisation and affine map, with its kind in the
file's metadata). A sweep is a folder: its tensors (probes, held-out predictions, per-image
counts, the train/test split and bootstrap resamples) in safetensors, its tables in parquet,
and its settings, sites and class names in JSON. The dataset is not copied: the caller passes
it back to `load_sweep` (the same loader with the same arguments gives the same rows). The
JSON description lists every file's sha256 and carries the hash of its own content, so a file
edited, truncated or replaced after saving is refused by `load_sweep` by name.
`LinearProbe.save` / `LinearProbe.load` are the probe's own methods; this module builds on them. Tensors
are written contiguous, so a loaded probe computes bit for bit what the fitted one did.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..checksums import SEAL, bytes_sha256, file_sha256, seal_holds, sealed
from ..errors import InputError
from ..model.images.pixel_map import load_pixel_map
from .linear import PROBE_FIELDS, LinearProbe
from .metrics import SegmentationScores
from .sites import Site
from .sparse import add_sparse_parts, restore_sparse
from .sweep import ProbeSweep, SweepSettings
SWEEP_DESCRIPTION = "sweep.json"
SWEEP_FORMAT = 3  # 2: penalties chosen by cross-validation, token-resolution ceilings; 3: file hashes, sealed


def save_probe(probe: LinearProbe, path: str | os.PathLike) -> Path:
    """Write `probe` to one safetensors file (`probe.save(path)`)."""
    return probe.save(path)


def load_probe(path: str | os.PathLike, device: torch.device | str = "cpu") -> LinearProbe:
    """The probe `save_probe` wrote at `path` (`LinearProbe.load(path)`)."""
    return LinearProbe.load(path, device)


def _key(condition: str, hook: str, part: str = "") -> str:
    return f"{condition}|{hook}" + (f"|{part}" if part else "")


@dataclasses.dataclass
class SweepParts:
    """A sweep split into what files hold: groups of tensors, tables and a JSON description."""

    tensors: dict[str, dict[str, Tensor]]
    tables: dict[str, pd.DataFrame]
    description: dict[str, Any]


def sweep_parts(sweep: ProbeSweep) -> SweepParts:
    """Everything a `ProbeSweep` holds but its dataset, as tensors, tables and JSON."""
    probes, predictions, scores = {}, {}, {}
    for (condition, hook), probe in sweep.probes.items():
        for part in PROBE_FIELDS:
            probes[_key(condition, hook, part)] = getattr(probe, part)
        predictions[_key(condition, hook)] = sweep.predictions[(condition, hook)]
        score = sweep.scores[(condition, hook)]
        scores[_key(condition, hook, "per_image")] = torch.from_numpy(np.stack(score.per_image))
        scores[_key(condition, hook, "confusion")] = torch.from_numpy(np.asarray(sweep.confusion[(condition, hook)]))
        scores[_key(condition, hook, "tokens")] = torch.tensor([score.tokens_correct, score.tokens_valid])
    for grid, score in sweep.ceilings.items():
        scores[_key("ceiling", grid, "per_image")] = torch.from_numpy(np.stack(score.per_image))
        scores[_key("ceiling", grid, "confusion")] = torch.from_numpy(np.asarray(score.confusion))
        scores[_key("ceiling", grid, "tokens")] = torch.tensor([score.tokens_correct, score.tokens_valid])
    split = {
        "train_indices": torch.from_numpy(np.asarray(sweep.train_indices, dtype=np.int64)),
        "test_indices": torch.from_numpy(np.asarray(sweep.test_indices, dtype=np.int64)),
        "test_masks": torch.from_numpy(np.ascontiguousarray(sweep.test_masks)),
        "bootstrap": torch.from_numpy(np.asarray(sweep.bootstrap, dtype=np.int64)),
    }
    grids = {}
    for name, pixels in sweep.grids.items():
        grids[name], tensors = pixels.saved_form(name)
        split.update(tensors)
    description = {
        "settings": dataclasses.asdict(sweep.settings),
        "sites": [dataclasses.asdict(s) for s in sweep.sites],
        "class_names": list(sweep.class_names),
        "ignore_index": sweep.ignore_index,
        # a shared grid as its shape; per-image pixel maps (images with their own segments) as tensors
        "grids": grids,
        "probe_kinds": {_key(c, h): p.kind for (c, h), p in sweep.probes.items()},
        "ceilings": sorted(sweep.ceilings),
    }
    add_sparse_parts(sweep, probes, description)  # chosen features, and the SAEs they read
    tables = {"probe_table": sweep.table, "per_class_iou": sweep.per_class_iou.reset_index(),
              "penalty_table": sweep.penalties}
    return SweepParts({"probes": probes, "predictions": predictions, "scores": scores, "split": split}, tables, description)


def sweep_from_parts(parts: SweepParts, dataset, device: torch.device | str = "cpu") -> ProbeSweep:
    """The `ProbeSweep` that `sweep_parts` took apart; `dataset` is supplied by the caller."""
    description, tensors = parts.description, parts.tensors
    probes_t, scores_t, split = tensors["probes"], tensors["scores"], tensors["split"]
    class_names = tuple(description["class_names"])
    ignore_index = description["ignore_index"]
    keys = [tuple(k.split("|")) for k in description["probe_kinds"]]
    probes, predictions, scores, confusion = {}, {}, {}, {}

    def stored_scores(condition: str, hook: str) -> SegmentationScores:
        correct, valid = scores_t[_key(condition, hook, "tokens")].tolist()
        return SegmentationScores(
            len(class_names), ignore_index, per_image=list(scores_t[_key(condition, hook, "per_image")].numpy()),
            confusion=scores_t[_key(condition, hook, "confusion")].numpy().copy(), tokens_correct=correct,
            tokens_valid=valid)

    for condition, hook in keys:
        fields = [probes_t[_key(condition, hook, p)] for p in PROBE_FIELDS]
        probes[(condition, hook)] = LinearProbe(*fields, kind=description["probe_kinds"][_key(condition, hook)]).to(device)
        predictions[(condition, hook)] = tensors["predictions"][_key(condition, hook)]
        scores[(condition, hook)] = stored_scores(condition, hook)
        confusion[(condition, hook)] = scores_t[_key(condition, hook, "confusion")].numpy()
    per_class = parts.tables["per_class_iou"].set_index(["condition", "hook"])
    return restore_sparse(ProbeSweep(
        table=parts.tables["probe_table"],
        per_class_iou=per_class,
        confusion=confusion,
        probes=probes,
        predictions=predictions,
        sites=[Site(**s) for s in description["sites"]],
        class_names=class_names,
        ignore_index=ignore_index,
        grids={name: load_pixel_map(name, entry, split) for name, entry in description["grids"].items()},
        test_indices=split["test_indices"].numpy(),
        train_indices=split["train_indices"].numpy(),
        test_masks=split["test_masks"].numpy(),
        settings=_settings(description["settings"]),
        dataset=dataset,
        bootstrap=split["bootstrap"].numpy(),
        scores=scores,
        penalties=parts.tables["penalty_table"],
        ceilings={grid: stored_scores("ceiling", grid) for grid in description["ceilings"]},
    ), probes_t, description)


def _settings(stored: dict) -> SweepSettings:
    """The settings as saved (JSON has no tuples: the candidate grids come back as lists)."""
    return SweepSettings(**{k: tuple(v) if k in ("alphas", "l2s", "sparse_ks") else v for k, v in stored.items()})


def save_sweep(sweep: ProbeSweep, folder: str | os.PathLike) -> Path:
    """Write `sweep` (all but its dataset) into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = sweep_parts(sweep)
    contents = {f"{name}.safetensors": safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
                for name, tensors in parts.tensors.items()}
    contents.update({f"{name}.parquet": table.to_parquet(None) for name, table in parts.tables.items()})
    for filename, data in contents.items():
        (folder / filename).write_bytes(data)
    n_images = None if sweep.dataset is None else len(sweep.dataset)
    document = {"format": SWEEP_FORMAT, "n_dataset_images": n_images,
                "files": {filename: bytes_sha256(data) for filename, data in contents.items()}, **parts.description}
    # the description is written last: a folder without it is an interrupted save
    (folder / SWEEP_DESCRIPTION).write_text(json.dumps(sealed(document), indent=1))
    return folder


def load_sweep(folder: str | os.PathLike, dataset=None, device: torch.device | str = "cpu", *,
               seed: int | None = None) -> ProbeSweep:
    """The sweep `save_sweep` wrote in `folder`, every file checked against the sha256 saved
    with it. Pass the dataset it was fitted on (loaded with the same arguments) to draw
    prediction maps or run experiments on it; without it the tables, probes, scores and curves
    are all there. `folder` may also be a run folder (its probe sweep of `seed`, needed when
    several seeds finished), its probe-sweep unit folder `stages/probe_sweep/seed-N`, or a folder
    holding one saved sweep below it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} holds no saved sweep: " + ("it is a file; pass the folder save_sweep wrote"
                                                             if folder.exists() else "no such folder"))
    description_file = folder / SWEEP_DESCRIPTION
    if not description_file.is_file():
        return _sweep_below(folder, dataset, device, seed)
    changed = (f"was changed after save_sweep wrote it (edited, truncated or replaced), so the sweep cannot be trusted; "
               "save the sweep again with save_sweep(sweep, folder), or fit it again")
    try:
        description = json.loads(description_file.read_text())
    except ValueError:
        raise InputError(f"{description_file} {changed}") from None
    if not isinstance(description, dict) or (SEAL in description and not seal_holds(description)):
        raise InputError(f"{description_file} {changed}")
    if description.get("format") != SWEEP_FORMAT or not seal_holds(description):
        raise InputError(f"{description_file} was written by another mmlens version (format "
                         f"{description.get('format')}, this one reads {SWEEP_FORMAT}); save the sweep again with this version")
    for filename, digest in description["files"].items():
        if not (folder / filename).is_file() or file_sha256(folder / filename) != digest:
            raise InputError(f"{folder / filename} is missing or {changed}")
    for key in ("format", "files", SEAL):
        description.pop(key)
    expected = description.pop("n_dataset_images", None)
    if dataset is not None and expected is not None and len(dataset) != expected:
        raise InputError(f"the sweep was fitted on a dataset of {expected} images, this one has {len(dataset)}; "
                         "load it with the same arguments (name, split, n, seed, image_size)")
    tensors = {name: load_file(str(folder / f"{name}.safetensors")) for name in ("probes", "predictions", "scores", "split")}
    tables = {name: pd.read_parquet(folder / f"{name}.parquet") for name in ("probe_table", "per_class_iou", "penalty_table")}
    return sweep_from_parts(SweepParts(tensors, tables, description), dataset, device)


def _sweep_below(folder: Path, dataset, device, seed: int | None) -> ProbeSweep:
    """A run folder's probe sweep (`folder` the run folder, or its unit folder
    stages/probe_sweep/seed-N), or the one sweep saved in a subfolder; else what is there."""
    resolved = folder.resolve()
    run = next((p for p in (resolved, *resolved.parents) if (p / "manifest.json").is_file()), None)
    inside = resolved.relative_to(run).parts if run is not None else ()
    unit = re.fullmatch(r"seed-(\d+)", inside[2]) if len(inside) == 3 and inside[:2] == ("stages", "probe_sweep") \
        else None
    if run is not None and (not inside or unit is not None):  # a run folder: its stages read and check their own files
        from ..runs.loading import load_run  # the layer above, reached only when handed its folder

        unit_seed = None if unit is None else int(unit.group(1))
        if seed is not None and unit_seed is not None and seed != unit_seed:
            raise InputError(f"{folder} is the probe sweep of seed {unit_seed}, not of seed={seed}; pass the run "
                             f"folder {run} with seed={seed}, or this folder without a seed")
        return load_run(run).sweep(unit_seed if seed is None else seed, dataset, device)
    saved = sorted(p.parent for p in folder.glob(f"**/{SWEEP_DESCRIPTION}") if p.parent.name != "data")
    if len(saved) == 1:
        return load_sweep(saved[0], dataset, device)
    if run is not None:  # a folder inside a run folder that is not a probe sweep's
        found = (f"; it is inside the run folder {run}: pass that folder (seed=N picks a seed) "
                 f"or its {Path('stages', 'probe_sweep', 'seed-N')}")
    elif saved:
        found = f"; sweeps saved below it: {', '.join(map(str, saved))}; pass one of them"
    else:
        found = "; save one with save_sweep(sweep, folder), or pass a run folder of mmlens study"
    raise InputError(f"{folder} holds no saved sweep ({SWEEP_DESCRIPTION} is missing there){found}")


__all__ = ["SweepParts", "load_probe", "load_sweep", "save_probe", "save_sweep", "sweep_from_parts", "sweep_parts"]
