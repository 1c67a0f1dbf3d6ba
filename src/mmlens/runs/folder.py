"""A run folder: one study's results on disk, written so that a killed run can resume safely.

Every file is written to a temporary name in its final folder, flushed, and renamed over the
target (`os.replace`, atomic on POSIX), so a reader sees either the old file or the whole new
one. A stage unit counts as done only when its completion record (`done.json`, listing every
file with its sha256) is written, and that record is written last; a unit without it is wiped
and rerun. `manifest.json` names the config (its canonical form and hash) and package versions;
opening the folder with a different config is refused rather than mixing two studies.

Testing hook: `MMLENS_KILL_AT=UNIT:K` (e.g. `anchor_knockout/seed-0:2`) makes the process send
itself SIGKILL during the K-th file write of that unit, after the temporary file is written and
before it is renamed: a deterministic stand-in for a run killed mid-stage.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import plotly.io
import plotly.utils
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import RunFolderError
from .config import StudyConfig
from .outputs import StageOutput, StoredOutput

MANIFEST = "manifest.json"
DONE = "done.json"
TEMP_MARK = ".tmp-"
FORMAT = 1
PACKAGES = ("mmlens", "torch", "transformers", "transformer-lens")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


class RunFolder:
    """The folder of one study run. Use `RunFolder.create(path, config)` to start or resume a
    run, `RunFolder.open(path)` to read a finished one."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self._writes: dict[str, int] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | Path, config: StudyConfig, *, overwrite: bool = False) -> "RunFolder":
        """Start a run in `path`, or resume the one there if it was made by the same config."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} is a file, not a run folder; pick another --out")
        existing = path / MANIFEST
        if overwrite and existing.is_file():
            shutil.rmtree(path)
        elif path.is_dir() and not existing.is_file() and any(path.iterdir()):
            raise RunFolderError(f"{path} is not empty and holds no {MANIFEST}, so it is not an mmlens run folder; "
                                 "pick a new or empty --out")
        if existing.is_file():
            folder = cls.open(path)
            folder._check_config(config)
            folder._remove_temporaries()
            return folder
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "config_sha256": config.sha256(),
            "config": config.canonical(),
            "created": now(),
            "versions": package_versions(),
            "stages": {},
        }
        folder = cls(path, manifest)
        folder._atomic(path / "config.yaml", lambda tmp: tmp.write_text(config.to_yaml()))
        folder._save_manifest()
        return folder

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise RunFolderError(f"{path} is not an mmlens run folder (no {MANIFEST}); "
                                 "run `mmlens study CONFIG --out DIR` or `mmlens demo` first")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise RunFolderError(f"{manifest_path} is damaged ({error}); rerun with --overwrite") from None
        if manifest.get("format") != FORMAT:
            raise RunFolderError(f"{path} was written by an incompatible mmlens (format {manifest.get('format')}, "
                                 f"this version reads {FORMAT}); pick a new --out or pass --overwrite")
        return cls(path, manifest)

    @property
    def config_sha256(self) -> str:
        return self.manifest["config_sha256"]

    def _check_config(self, config: StudyConfig) -> None:
        if config.sha256() == self.config_sha256:
            return
        changes = _differences(self.manifest["config"], config.canonical())
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise RunFolderError(
            f"{self.path} holds results of a different config (sha256 {self.config_sha256[:12]}, this config "
            f"{config.sha256()[:12]}): {shown}. Results are never mixed: pick a new --out, or pass --overwrite to "
            "delete the old results."
        )

    def _remove_temporaries(self) -> None:
        """Temporary files are what a killed write leaves behind; they are never results."""
        for tmp in self.path.rglob(f"*{TEMP_MARK}*"):
            tmp.unlink()

    # ------------------------------------------------------------------ units
    def unit_dir(self, unit: str) -> Path:
        return self.path / "stages" / unit

    def record(self, unit: str) -> dict[str, Any] | None:
        """The unit's completion record, or None when it has not finished."""
        done = self.unit_dir(unit) / DONE
        if not done.is_file():
            return None
        record = json.loads(done.read_text())
        return record if record.get("config_sha256") == self.config_sha256 else None

    def is_done(self, unit: str) -> bool:
        return self.record(unit) is not None

    def done_units(self) -> list[str]:
        """Finished units in the order they finished."""
        units = [u for u in self.manifest["stages"] if self.is_done(u)]
        return sorted(units, key=lambda u: self.record(u)["finished"])

    def begin(self, unit: str) -> str:
        """Clear whatever an interrupted attempt left and mark the unit as running; returns the
        start time."""
        directory = self.unit_dir(unit)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        entry = self.manifest["stages"].setdefault(unit, {"attempts": 0})
        entry.update(status="running", started=now(), attempts=entry["attempts"] + 1)
        for stale in ("finished", "seconds", "error", "failed"):
            entry.pop(stale, None)
        self._save_manifest()
        return entry["started"]

    def fail(self, unit: str, error: BaseException) -> None:
        """Note in the manifest why a unit stopped (it reruns from scratch next time)."""
        entry = self.manifest["stages"].setdefault(unit, {"attempts": 1})
        entry.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000], failed=now())
        self._save_manifest()

    def save(self, unit: str, output: StageOutput, *, started: str, seconds: float, extra: dict | None = None) -> dict:
        """Write a unit's output, then its completion record (last), then update the manifest."""
        files: dict[str, str] = {}
        for name, table in output.tables.items():
            files[f"tables/{name}.parquet"] = self._write(unit, f"tables/{name}.parquet",
                                                         lambda tmp, t=table: t.to_parquet(tmp))
        for name, tensors in output.tensors.items():
            contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            files[f"tensors/{name}.safetensors"] = self._write(unit, f"tensors/{name}.safetensors",
                                                              lambda tmp, t=contiguous: save_file(t, str(tmp)))
        for name, value in output.data.items():
            text = json.dumps(value, indent=1, sort_keys=True)
            files[f"data/{name}.json"] = self._write(unit, f"data/{name}.json", lambda tmp, s=text: tmp.write_text(s))
        figures = {}
        for name, entry in output.figure_entries().items():
            text = plotly.io.to_json(entry.figure)
            files[f"figures/{name}.json"] = self._write(unit, f"figures/{name}.json", lambda tmp, s=text: tmp.write_text(s))
            figures[name] = {"how_to_read": entry.how_to_read, "title": entry.title, "table": entry.table,
                             "notes": entry.notes}
        record = {"unit": unit, "config_sha256": self.config_sha256, "started": started, "finished": now(),
                  "seconds": round(seconds, 3), "files": files, "figures": figures, "summary": list(output.summary),
                  "versions": package_versions(), **(extra or {})}
        text = json.dumps(record, indent=1)
        self._write(unit, DONE, lambda tmp: tmp.write_text(text))
        entry = self.manifest["stages"].setdefault(unit, {"attempts": 1})
        entry.update(status="done", started=started, finished=record["finished"], seconds=record["seconds"])
        entry.pop("error", None)
        entry.pop("failed", None)
        self._save_manifest()
        return record

    def load(self, unit: str) -> StoredOutput:
        """A finished unit's tables, tensors and JSON results, checked against their hashes."""
        record = self.record(unit)
        if record is None:
            raise RunFolderError(f"stage {unit} has not finished in {self.path}")
        directory = self.unit_dir(unit)
        for relative, digest in record["files"].items():
            file = directory / relative
            if not file.is_file() or _sha256(file) != digest:
                raise RunFolderError(f"{file} is missing or changed since stage {unit} finished; "
                                     "rerun with --overwrite (or a new --out)")
        tables, tensors, data = {}, {}, {}
        for relative in record["files"]:
            kind, _, filename = relative.partition("/")
            name = filename.rsplit(".", 1)[0]
            if kind == "tables":
                tables[name] = pd.read_parquet(directory / relative)
            elif kind == "tensors":
                tensors[name] = load_file(str(directory / relative))
            elif kind == "data":
                data[name] = json.loads((directory / relative).read_text())
        return StoredOutput(unit=unit, record=record, tables=tables, tensors=tensors, data=data)

    def figure(self, unit: str, name: str):
        """A saved figure of a finished unit, as a plotly Figure (arrays decoded back to NumPy)."""
        text = (self.unit_dir(unit) / "figures" / f"{name}.json").read_text()
        return plotly.io.from_json(json.dumps(_decode_arrays(json.loads(text)), cls=plotly.utils.PlotlyJSONEncoder))

    # ------------------------------------------------------------------ writing
    def _write(self, unit: str, relative: str, write: Callable[[Path], Any]) -> str:
        """Atomically write one file of `unit`; return its sha256."""
        self._writes[unit] = self._writes.get(unit, 0) + 1
        target = self.unit_dir(unit) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return self._atomic(target, write, kill_point=(unit, self._writes[unit]))

    def _atomic(self, target: Path, write: Callable[[Path], Any], kill_point: tuple[str, int] | None = None) -> str:
        tmp = target.with_name(f"{target.name}{TEMP_MARK}{os.getpid()}")
        try:
            write(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            digest = _sha256(tmp)
            if kill_point is not None and _kill_requested(*kill_point):
                os.kill(os.getpid(), signal.SIGKILL)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return digest

    def _save_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1)
        self._atomic(self.path / MANIFEST, lambda tmp: tmp.write_text(text))


def _kill_requested(unit: str, write_number: int) -> bool:
    wanted = os.environ.get("MMLENS_KILL_AT")
    if not wanted:
        return False
    name, _, number = wanted.rpartition(":")
    return name == unit and number.isdigit() and int(number) == write_number


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decode_arrays(value: Any) -> Any:
    """Plotly writes NumPy arrays as {"dtype", "bdata"(, "shape")} base64 blocks and reads them
    back as plain dicts; turn them into arrays again so a reloaded figure is a normal figure."""
    if isinstance(value, dict):
        if set(value) in ({"dtype", "bdata"}, {"dtype", "bdata", "shape"}):
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
            if "shape" in value:
                array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
            return array.tolist()
        return {k: _decode_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_arrays(v) for v in value]
    return value


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable key paths whose values differ between two canonical configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {json.dumps(old)} -> {json.dumps(new)}"]


__all__ = ["RunFolder", "RunFolderError", "package_versions"]
