"""A run folder: one study's results on disk, written so that a killed run can resume safely.

Every file is written to a temporary name in its final folder, flushed, and renamed over the
target (`os.replace`, atomic on POSIX), so a reader sees either the old file or the whole new
one. A stage unit counts as done only when its completion record (`done.json`, listing every
file with its sha256) is written, and that record is written last; a unit without it is wiped
and rerun. `manifest.json` names the config (its canonical form and hash), package versions and
the key of every planned unit (a hash of the config sections the unit reads); a unit's record
counts only while its key matches, so results of two configs are never mixed. A process holds
the folder's lock (`lock.py`) from opening to closing, so two processes never write one study.

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

from ..errors import RunFolderError
from .config import StudyConfig
from .lock import LOCK_NAME, RunLock
from .outputs import StageOutput, StoredOutput

MANIFEST = "manifest.json"
DONE = "done.json"
TEMP_MARK = ".tmp-"
FORMAT = 2  # 2: per-unit keys
PACKAGES = ("mmlens", "torch", "transformers", "transformer-lens", "torchvision")  # torchvision: processor backend


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
    """The folder of one study run. Use `RunFolder.create(path, config, unit_keys)` to start or
    resume a run (it holds the folder's lock until `close()`), `RunFolder.open(path)` to read one."""

    def __init__(self, path: Path, manifest: dict[str, Any], lock: RunLock | None = None):
        self.path = path
        self.manifest = manifest
        self.lock = lock
        self._writes: dict[str, int] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        config: StudyConfig,
        unit_keys: dict[str, str],
        *,
        overwrite: bool = False,
        rerun: set[str] | frozenset[str] = frozenset(),
        echo: Callable[[str], None] = print,
    ) -> "RunFolder":
        """Start a run in `path`, or resume the one there. A changed config is taken over when it
        leaves every finished unit valid, or when the units it invalidates are in `rerun`."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} is a file, not a run folder; pick another --out")
        if path.is_dir() and not (path / MANIFEST).is_file() and any(p.name != LOCK_NAME for p in path.iterdir()):
            raise RunFolderError(f"{path} is not empty and holds no {MANIFEST}, so it is not an mmlens run folder; "
                                 "pick a new or empty --out")
        lock = RunLock(path).acquire()  # before anything is read or deleted
        try:
            if overwrite:
                for entry in path.iterdir():
                    if entry.name != LOCK_NAME:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            if (path / MANIFEST).is_file():
                folder = cls.open(path)
                folder.lock = lock
                folder._adopt(config, unit_keys, rerun, echo)
                folder._remove_temporaries()
                return folder
            manifest = {
                "format": FORMAT,
                "config_sha256": config.sha256(),
                "config": config.canonical(),
                "unit_keys": dict(unit_keys),
                "created": now(),
                "versions": package_versions(),
                "stages": {},
            }
            folder = cls(path, manifest, lock)
            folder._atomic(path / "config.yaml", lambda tmp: tmp.write_text(config.to_yaml()))
            folder._save_manifest()
            return folder
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        """A run folder for reading (no lock: a report can be rebuilt while a study runs)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise RunFolderError(f"{path} is not an mmlens run folder (no {MANIFEST}); "
                                 "run `mmlens study CONFIG --out DIR` or `mmlens demo` first")
        try:
            manifest = json.loads(manifest_path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        except ValueError as error:
            raise RunFolderError(f"{manifest_path} is damaged ({error}); without it the results cannot be matched to "
                                 "their config: start over with --overwrite, or pick a new --out") from None
        if manifest.get("format") != FORMAT:
            raise RunFolderError(f"{path} was written by an incompatible mmlens (format {manifest.get('format')}, "
                                 f"this version reads {FORMAT}); pick a new --out or pass --overwrite")
        return cls(path, manifest)

    def close(self) -> None:
        """Release the folder's lock (a no-op for folders opened for reading)."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def config_sha256(self) -> str:
        return self.manifest["config_sha256"]

    def rerun_command(self, stage: str) -> str:
        """The command that reruns one stage of this folder's study alone."""
        return f"mmlens study {self.path / 'config.yaml'} --out {self.path} --rerun {stage}"

    def _adopt(self, config: StudyConfig, unit_keys: dict[str, str], rerun: set[str] | frozenset[str],
               echo: Callable[[str], None]) -> None:
        """Take over `config`: finished units it leaves valid are kept, the rest rerun."""
        if config.sha256() == self.config_sha256 and self.manifest["unit_keys"] == unit_keys:
            return
        finished = {unit: self._read_record(unit) for unit in self.manifest["stages"] if unit not in rerun}
        finished = {unit: r for unit, r in finished.items() if r is not None
                    and r.get("key") == self.manifest["unit_keys"].get(unit)}
        invalidated = [u for u in finished if u in unit_keys and finished[u]["key"] != unit_keys[u]]
        invalidated += [u for u in rerun if u in self.manifest["stages"]]
        kept = [u for u in finished if unit_keys.get(u) == finished[u]["key"]]
        changes = _differences(self.manifest["config"], config.canonical())
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        blocked = [u for u in invalidated if u not in rerun]
        if blocked:
            stages = sorted({u.split("/")[0] for u in blocked})
            raise RunFolderError(
                f"{self.path} holds results of another config ({shown}). Finished unit(s) {', '.join(blocked)} were "
                f"computed with the old settings and would be replaced. Pass --rerun {' --rerun '.join(stages)} to "
                f"replace just those{' (kept: ' + ', '.join(kept) + ')' if kept else ''}, --overwrite to delete every "
                "result, or pick a new --out."
            )
        echo(f"config changed ({shown}); kept: {', '.join(kept) or 'nothing'}; "
             f"rerun: {', '.join(invalidated) or 'only unfinished stages'}")
        self.manifest.update(config_sha256=config.sha256(), config=config.canonical(), unit_keys=dict(unit_keys))
        self._atomic(self.path / "config.yaml", lambda tmp: tmp.write_text(config.to_yaml()))
        self._save_manifest()

    def _remove_temporaries(self) -> None:
        """Temporary files are what a killed write leaves behind; they are never results."""
        for tmp in self.path.rglob(f"*{TEMP_MARK}*"):
            tmp.unlink()

    # ------------------------------------------------------------------ units
    def unit_dir(self, unit: str) -> Path:
        return self.path / "stages" / unit

    def _read_record(self, unit: str) -> dict[str, Any] | None:
        done = self.unit_dir(unit) / DONE
        if not done.is_file():
            return None
        try:
            record = json.loads(done.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
                raise ValueError("not a completion record")
        except ValueError as error:
            raise RunFolderError(f"{done} is damaged ({error}); rerun that stage alone: "
                                 f"{self.rerun_command(unit.split('/')[0])}") from None
        return record

    def record(self, unit: str) -> dict[str, Any] | None:
        """The unit's completion record, or None when it has not finished under this config."""
        record = self._read_record(unit)
        expected = self.manifest["unit_keys"].get(unit)
        return record if record is not None and expected is not None and record.get("key") == expected else None

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
        record = {"unit": unit, "key": self.manifest["unit_keys"][unit], "config_sha256": self.config_sha256,
                  "started": started, "finished": now(),
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
        record = self._finished(unit)
        directory = self.unit_dir(unit)
        for relative in record["files"]:
            self.verified(unit, relative, record)
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

    def _finished(self, unit: str) -> dict[str, Any]:
        record = self.record(unit)
        if record is None:
            raise RunFolderError(f"stage {unit} has not finished in {self.path}")
        return record

    def verified(self, unit: str, relative: str, record: dict[str, Any] | None = None) -> Path:
        """The path of a finished unit's file, after checking it against the sha256 its record
        holds (`record`: the unit's record when the caller has read it already)."""
        record = self._finished(unit) if record is None else record
        file = self.unit_dir(unit) / relative
        digest = record["files"].get(relative)
        if digest is None or not file.is_file() or _sha256(file) != digest:
            state = "not part of" if digest is None else "missing or changed since"
            raise RunFolderError(f"{file} is {state} stage {unit}'s results; rerun that stage alone: "
                                 f"{self.rerun_command(unit.split('/')[0])}")
        return file

    def table(self, unit: str, name: str) -> pd.DataFrame:
        """A saved table of a finished unit, checked against its hash."""
        return pd.read_parquet(self.verified(unit, f"tables/{name}.parquet"))

    def figure(self, unit: str, name: str):
        """A saved figure of a finished unit, as a plotly Figure (arrays decoded back to NumPy),
        checked against its hash."""
        text = self.verified(unit, f"figures/{name}.json").read_text()
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
