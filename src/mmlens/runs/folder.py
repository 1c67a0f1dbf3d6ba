"""A run folder: one study's results on disk, written so that a killed run can resume safely.

Every file is written to a temporary name in its final folder (`NAME.mmlens-tmp-PID`), flushed, and
renamed over the target (`os.replace`, atomic on POSIX), so a reader sees either the old file or
the whole new one. A stage unit counts as done only when its completion record (`done.json`,
listing every file with its sha256) is written last and `manifest.json` holds that record's
sha256; the manifest carries the hash of its own content, so a hand-edited number in any file,
the record and the manifest included, or a truncated file is refused wherever it is read
(report, resume, `load`), with the file named and the command that rebuilds it. `manifest.json`
names the config (its canonical form and hash), package versions and the key of every planned
unit (a hash of the config sections the unit reads); a unit's record counts only while its key
matches, so results of two configs are never mixed. A process holds the folder's lock
(`lock.py`) from opening to closing, so two processes never write one study.

Testing hook: `MMLENS_KILL_AT=UNIT:K` (e.g. `anchor_knockout/seed-0:2`) makes the process send
itself SIGKILL during the K-th file write of that unit, after the temporary file is written and
before it is renamed: a deterministic stand-in for a run killed mid-stage.
"""

from __future__ import annotations

import base64
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import plotly.io
import plotly.utils
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..checksums import SEAL, bytes_sha256, file_sha256, seal_holds, sealed
from ..errors import RunFolderError
from .config import StudyConfig
from .disk_errors import disk_errors
from .lock import LOCK_NAME, RunLock
from .outputs import StageOutput, StoredOutput

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
DONE = "done.json"
STAGES_DIR = "stages"
# Working files of a run (e.g. a probe sweep's on-disk activation store): removed on resume,
# since only a killed run leaves anything there.
SCRATCH = "scratch"
TEMP_MARK = ".mmlens-tmp-"
# Only names mmlens itself gives its temporaries are ever deleted: `NAME.mmlens-tmp-PID` under stages/,
# the manifest's and config's at the root, and the report's (viz.report, viz.files) at the root.
TEMPORARY = re.compile(rf".+{re.escape(TEMP_MARK)}\d+")
ROOT_TEMPORARY = re.compile(rf"(?:{re.escape(MANIFEST)}|{re.escape(CONFIG_FILE)}){re.escape(TEMP_MARK)}\d+"
                            r"|\.report\.html\.[A-Za-z0-9_]{8}\.tmp|\.plotly\.min\.js\.tmp")
FORMAT = 3  # 2: per-unit keys; 3: the manifest sealed with its own hash, holding each done.json's sha256
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
        # file -> (sha256, size, mtime_ns) of a file this object wrote or checked: not hashed again while unchanged
        self._known: dict[Path, tuple[str, int, int]] = {}

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
            with disk_errors(path, "preparing the run folder"):
                if overwrite:
                    for entry in path.iterdir():
                        if entry.name != LOCK_NAME:
                            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                if (path / MANIFEST).is_file():
                    folder = cls.open(path)
                    folder.lock = lock
                    folder._adopt(config, unit_keys, rerun, echo)
                    folder._remove_leftovers()
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
                folder._atomic(path / CONFIG_FILE, config.to_yaml().encode())
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
        if not seal_holds(manifest):
            raise RunFolderError(
                f"{manifest_path} was changed after mmlens wrote it (its content no longer matches the sha256 it "
                "carries), so its config, versions and record of finished stages cannot be trusted. Put back the "
                "file as mmlens wrote it, or start over with --overwrite (or a new --out). To change a study, edit "
                f"its config and rerun `mmlens study`, never the manifest.")
        del manifest[SEAL]
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

    def rerun_command(self, *stages: str) -> str:
        """The command that reruns some stages of this folder's study (and what builds on them)."""
        flags = " ".join(f"--rerun {stage}" for stage in stages)
        return f"mmlens study {self.path / CONFIG_FILE} --out {self.path} {flags}"

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
        self._atomic(self.path / CONFIG_FILE, config.to_yaml().encode())
        self._save_manifest()

    def _remove_leftovers(self) -> None:
        """What a killed run leaves behind: its temporary files and its scratch folder. They are
        never results; anything else in the folder (a user's notes, say) is left alone."""
        for entry in self.path.iterdir():
            if entry.is_file() and ROOT_TEMPORARY.fullmatch(entry.name):
                entry.unlink()
        for tmp in (self.path / STAGES_DIR).rglob(f"*{TEMP_MARK}*"):
            if tmp.is_file() and TEMPORARY.fullmatch(tmp.name):
                tmp.unlink()
        if (self.path / SCRATCH).is_dir():
            shutil.rmtree(self.path / SCRATCH)

    # ------------------------------------------------------------------ units
    def unit_dir(self, unit: str) -> Path:
        return self.path / STAGES_DIR / unit

    def _read_record(self, unit: str) -> dict[str, Any] | None:
        """The unit's completion record, checked against the sha256 the manifest holds for it;
        None when the unit has not finished (no record, or killed before the manifest noted it)."""
        record, problem = self._checked_record(unit)
        if problem is not None:
            raise RunFolderError(f"{problem}; rerun that stage alone: {self.rerun_command(unit.split('/')[0])}")
        return record

    def _checked_record(self, unit: str) -> tuple[dict[str, Any] | None, str | None]:
        """(record, None), (None, None) when unfinished, or (None, what is wrong with done.json)."""
        done = self.unit_dir(unit) / DONE
        entry = self.manifest["stages"].get(unit, {})
        if not done.is_file() or entry.get("status") != "done":
            return None, None
        damaged = f"{done} is damaged or was changed after stage {unit} finished"
        if self._sha256(done) != entry.get("done_sha256"):
            return None, f"{damaged} (its sha256 no longer matches the one {MANIFEST} holds)"
        try:
            record = json.loads(done.read_text())
        except ValueError as error:
            return None, f"{damaged} ({error})"
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            return None, f"{damaged} (not a completion record)"
        return record, None

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

    def check(self, units: list[str] | None = None) -> None:
        """Check every file of finished units (default: every unit the manifest says finished)
        against its recorded sha256, and refuse with one message naming each damaged file and the
        command that rebuilds them all."""
        if units is None:
            units = [u for u, entry in self.manifest["stages"].items()
                     if entry.get("status") == "done" and self.manifest["unit_keys"].get(u) is not None]
        problems, stages = [], []
        for unit in units:
            found = self._unit_problems(unit)
            problems += found
            if found and unit.split("/")[0] not in stages:
                stages.append(unit.split("/")[0])
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise RunFolderError(
                f"{len(problems)} file(s) of finished stages in {self.path} changed after they were written (edited, "
                f"truncated or removed); they are not used:\n{lines}\nRerun those stages (everything else is kept): "
                f"{self.rerun_command(*stages)}")

    def _unit_problems(self, unit: str) -> list[str]:
        done = self.unit_dir(unit) / DONE
        if not done.is_file():
            return [f"{done} is missing, though the manifest says stage {unit} finished"]
        record, problem = self._checked_record(unit)
        if problem is not None:
            return [problem]
        directory = self.unit_dir(unit)
        return [f"{directory / relative} is missing or changed since stage {unit} finished"
                for relative, digest in record["files"].items()
                if not (directory / relative).is_file() or self._sha256(directory / relative) != digest]

    def begin(self, unit: str) -> str:
        """Clear whatever an interrupted attempt left and mark the unit as running; returns the
        start time."""
        directory = self.unit_dir(unit)
        with disk_errors(self.path, f"starting stage {unit}"):
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
        entry = self.manifest["stages"].setdefault(unit, {"attempts": 0})
        entry.update(status="running", started=now(), attempts=entry["attempts"] + 1)
        for stale in ("finished", "seconds", "error", "failed", "done_sha256"):
            entry.pop(stale, None)
        self._save_manifest()
        return entry["started"]

    def fail(self, unit: str, error: BaseException) -> None:
        """Note in the manifest why a unit stopped (it reruns from scratch next time)."""
        entry = self.manifest["stages"].setdefault(unit, {"attempts": 1})
        entry.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000], failed=now())
        try:
            self._save_manifest()
        except RunFolderError:
            pass  # a full or read-only disk: the unit is not marked done either, which is what a resume needs

    def save(self, unit: str, output: StageOutput, *, started: str, seconds: float, extra: dict | None = None) -> dict:
        """Write a unit's output, then its completion record (last), then the manifest, which holds
        the record's sha256: from then on the unit is done."""
        files: dict[str, str] = {}
        for name, table in output.tables.items():
            files[f"tables/{name}.parquet"] = self._write(unit, f"tables/{name}.parquet", table.to_parquet(None))
        for name, tensors in output.tensors.items():
            contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            files[f"tensors/{name}.safetensors"] = self._write(unit, f"tensors/{name}.safetensors",
                                                              safetensors_bytes(contiguous))
        for name, value in output.data.items():
            text = json.dumps(value, indent=1, sort_keys=True)
            files[f"data/{name}.json"] = self._write(unit, f"data/{name}.json", text.encode())
        figures = {}
        for name, entry in output.figure_entries().items():
            files[f"figures/{name}.json"] = self._write(unit, f"figures/{name}.json",
                                                        plotly.io.to_json(entry.figure).encode())
            figures[name] = {"how_to_read": entry.how_to_read, "title": entry.title, "table": entry.table,
                             "notes": entry.notes}
        record = {"unit": unit, "key": self.manifest["unit_keys"][unit], "config_sha256": self.config_sha256,
                  "started": started, "finished": now(),
                  "seconds": round(seconds, 3), "files": files, "figures": figures, "summary": list(output.summary),
                  "versions": package_versions(), **(extra or {})}
        done_sha256 = self._write(unit, DONE, json.dumps(record, indent=1).encode())
        entry = self.manifest["stages"].setdefault(unit, {"attempts": 1})
        entry.update(status="done", started=started, finished=record["finished"], seconds=record["seconds"],
                     done_sha256=done_sha256)
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
        if digest is None or not file.is_file() or self._sha256(file) != digest:
            state = f"not part of stage {unit}'s results" if digest is None else \
                f"missing or changed since stage {unit} finished"
            raise RunFolderError(f"{file} is {state}; rerun that stage alone: "
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
    def _sha256(self, file: Path) -> str:
        """The file's sha256; a file this object wrote or hashed is hashed again only once changed."""
        stat = file.stat()
        known = self._known.get(file)
        if known is not None and known[1:] == (stat.st_size, stat.st_mtime_ns):
            return known[0]
        digest = file_sha256(file)
        self._known[file] = (digest, stat.st_size, stat.st_mtime_ns)
        return digest

    def _write(self, unit: str, relative: str, data: bytes) -> str:
        """Atomically write one file of `unit`; return its sha256."""
        self._writes[unit] = self._writes.get(unit, 0) + 1
        target = self.unit_dir(unit) / relative
        with disk_errors(self.path, f"writing stage {unit}"):
            target.parent.mkdir(parents=True, exist_ok=True)
        return self._atomic(target, data, kill_point=(unit, self._writes[unit]))

    def _atomic(self, target: Path, data: bytes, kill_point: tuple[str, int] | None = None) -> str:
        tmp = target.with_name(f"{target.name}{TEMP_MARK}{os.getpid()}")
        digest = bytes_sha256(data)
        try:
            with disk_errors(self.path, f"writing {target.relative_to(self.path)}"):
                _write_file(tmp, data)
                if kill_point is not None and _kill_requested(*kill_point):
                    os.kill(os.getpid(), signal.SIGKILL)
                os.replace(tmp, target)
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # a folder turned read-only: the next resume removes it
        stat = target.stat()
        self._known[target] = (digest, stat.st_size, stat.st_mtime_ns)
        return digest

    def _save_manifest(self) -> None:
        self._atomic(self.path / MANIFEST, json.dumps(sealed(self.manifest), indent=1).encode())


def _write_file(path: Path, data: bytes) -> None:
    """Put `data` on disk at `path`, flushed: the one place a run folder's bytes are written."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _kill_requested(unit: str, write_number: int) -> bool:
    wanted = os.environ.get("MMLENS_KILL_AT")
    if not wanted:
        return False
    name, _, number = wanted.rpartition(":")
    return name == unit and number.isdigit() and int(number) == write_number


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
