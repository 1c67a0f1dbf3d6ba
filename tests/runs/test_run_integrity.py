"""Every file of a run folder is what its stage wrote, or it is refused; no user file is ever lost.

A real study on the embedded model (every stage) is damaged file by file, edited and truncated:
`mmlens report` and a resumed `mmlens study` both refuse, naming the file and the `--rerun` that
rebuilds it. The toy stages of test_runs (real tables, no model) cover the manifest, the
temp-file sweep, the scratch folder, and full or read-only disks (a real tmpfs when the kernel
lends one through a user namespace, else the folder's one low-level writer made to fail).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mmlens.runs.folder as folder_module
from mmlens.cli import main
from mmlens.errors import InputError, RunFolderError
from mmlens.runs import RunFolder
from mmlens.runs.folder import SCRATCH, TEMP_MARK

from test_runs import run_toy, tiny_config, toy_stages  # noqa: F401

STUDY = {
    "model": "tiny-shapes-llava", "batch_size": 16, "n_boot": 1000,
    "dataset": {"name": "scenes", "n": 24, "image_size": 32},
    "probe": {"kind": "ridge", "sites": ["adapter.hook_out", "blocks.3.hook_resid_post"], "controls": ["shuffled_labels"]},
    "knockout": {"n_pairs": 2, "n_control": 1},
    "position": {"early_fraction": 0.25},
    "recovery": {"corruption": "counterfactual", "n_images": 4, "n_maps": 1, "top_k": 2},
}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Every stage of a study on the embedded model, with its report (about 40 s on 2 cores)."""
    root = tmp_path_factory.mktemp("real")
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    assert main(["study", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    return config, root / "run"


def _edited(file: Path) -> None:
    """A careless hand edit that leaves a valid file of the same kind with one value changed."""
    if file.suffix == ".parquet":
        table = pd.read_parquet(file)
        numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and table[c].notna().any()
                   and not pd.api.types.is_bool_dtype(table[c])]
        column = numeric[0] if numeric else table.columns[0]
        table[column] = table[column] + 1 if numeric else table[column].astype(str) + "x"
        table.to_parquet(file)
    elif file.suffix == ".safetensors":
        tensors = load_file(file)
        name = next(n for n, t in tensors.items() if t.numel())
        tensors[name] = ~tensors[name] if tensors[name].dtype == torch.bool else tensors[name] + 1
        save_file(tensors, file)
    else:
        document = json.loads(file.read_text())
        if file.name == "done.json":
            document["summary"] = [line.replace("0", "9") + " (edited)" for line in document["summary"]]
        elif not _bump_first_number(document):
            document["edited"] = True
        file.write_text(json.dumps(document, indent=1))


def _bump_first_number(value) -> bool:
    """Add one to the first number found in a JSON document (in place); False if it has none."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            value[key] = item + 1
            return True
        if _bump_first_number(item):
            return True
    return False


def _truncated(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_edited, _truncated], ids=["edited", "truncated"])
def test_every_file_of_every_stage_is_refused_by_report_and_resume(real_run, capsys, damage):
    config, run = real_run
    files = sorted(p for p in (run / "stages").rglob("*") if p.is_file())
    kinds = {p.parent.name if p.name != "done.json" else "done" for p in files}
    assert kinds == {"tables", "tensors", "figures", "data", "done"} and len(files) > 30
    for file in files:
        original = file.read_bytes()
        damage(file)
        assert file.read_bytes() != original
        stage = file.relative_to(run / "stages").parts[0]
        try:
            capsys.readouterr()
            assert main(["report", str(run)]) == 2, file
            err = capsys.readouterr().err
            assert str(file) in err and f"--out {run} --rerun {stage}" in err, err
            assert main(["study", str(config), "--out", str(run), "--quiet", "--no-report"]) == 2, file
            err = capsys.readouterr().err
            assert str(file) in err and f"--rerun {stage}" in err and "Traceback" not in err, err
        finally:
            file.write_bytes(original)
    # put back as written, the folder is whole again: nothing was rerun or rewritten by a refusal
    assert main(["report", str(run)]) == 0
    assert all(p.read_bytes() for p in files)


def test_a_truncated_table_is_refused_on_resume_and_the_remedy_repairs_it(tmp_path):
    run = run_toy(tiny_config(), tmp_path / "run").folder.path
    table = run / "stages/draws/seed-0/tables/draws.parquet"
    _truncated(table)
    with pytest.raises(RunFolderError, match=rf"(?s){table} is missing or changed.*--rerun draws"):
        run_toy(tiny_config(), run)
    again = run_toy(tiny_config(), run, rerun=("draws",))
    assert [u.ran for u in again.units] == [True, True]
    assert RunFolder.open(run).load("draws/seed-0").tables["draws"].shape == (5, 2)


@pytest.mark.parametrize("edit", ["created", "versions", "summary_status", "config"])
def test_edited_manifest_metadata_is_refused(tmp_path, capsys, edit):
    run = tmp_path / "run"
    run_toy(tiny_config(), run)
    manifest_file = run / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    if edit == "created":
        manifest["created"] = "2020-01-01T00:00:00+00:00"
    elif edit == "versions":
        manifest["versions"]["torch"] = "9.9.9"
    elif edit == "summary_status":
        manifest["stages"]["total/seed-0"]["seconds"] += 1000  # a toy stage may well have taken 0.001 s
    else:
        manifest["config"]["n_boot"] = 5000
    manifest_file.write_text(json.dumps(manifest, indent=1))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{manifest_file} was changed after mmlens wrote it" in err and "--overwrite" in err
    with pytest.raises(RunFolderError, match="manifest.json was changed after mmlens wrote it"):
        run_toy(tiny_config(), run)


def test_a_record_rewritten_with_its_files_hashes_is_still_refused(tmp_path):
    """Editing a result and fixing its sha256 in done.json is not enough: done.json's own hash
    lives in the sealed manifest."""
    run = tmp_path / "run"
    run_toy(tiny_config(), run)
    unit = run / "stages/draws/seed-0"
    pd.DataFrame({"i": range(5), "value": [0.5] * 5}).to_parquet(unit / "tables/draws.parquet")
    record = json.loads((unit / "done.json").read_text())
    record["files"]["tables/draws.parquet"] = hashlib.sha256((unit / "tables/draws.parquet").read_bytes()).hexdigest()
    (unit / "done.json").write_text(json.dumps(record, indent=1))
    with pytest.raises(RunFolderError, match=r"done.json is damaged or was changed.*sha256 no longer matches"):
        RunFolder.open(run).load("draws/seed-0")
    with pytest.raises(RunFolderError, match=r"done.json is damaged or was changed.*--rerun draws"):
        run_toy(tiny_config(), run)


def test_resume_removes_only_what_mmlens_left(tmp_path):
    run = tmp_path / "run"
    run_toy(tiny_config(), run)
    (run / "stages/total/seed-0/done.json").unlink()  # as if killed before total finished
    users = [run / "notes.tmp-draft.txt", run / "stages/notes.tmp-draft.txt",
             run / "stages/draws/seed-0/notes.tmp-1", run / f"mine{TEMP_MARK}12"]
    for file in users:
        file.write_text("x")
    leftovers = [run / f"manifest.json{TEMP_MARK}4242", run / f"config.yaml{TEMP_MARK}4242",
                 run / f"stages/draws/seed-0/tables/draws.parquet{TEMP_MARK}4242",
                 run / SCRATCH / "store-rank0" / "acts.bin"]
    for file in leftovers:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"half")
    again = run_toy(tiny_config(), run)
    assert [u.ran for u in again.units] == [False, True]
    assert [f.read_text() for f in users] == ["x"] * len(users)
    assert not any(f.exists() for f in leftovers) and not (run / SCRATCH).exists()


def _failing_writer(fail_on: str, code: int):
    real = folder_module._write_file

    def write(path, data):
        if fail_on in path.name:
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    return write


@pytest.mark.parametrize("fail_on, code", [("total.parquet", errno.ENOSPC), ("done.json", errno.ENOSPC),
                                           ("manifest.json", errno.EROFS)])
def test_a_failed_write_is_a_clear_error_and_nothing_half_written_counts_as_done(tmp_path, monkeypatch, fail_on, code):
    run = tmp_path / "run"
    run_toy(tiny_config(), run)
    first = RunFolder.open(run).load("total/seed-0").tables["total"]
    monkeypatch.setattr(folder_module, "_write_file", _failing_writer(fail_on, code))
    expected = "no space left on its disk" if code == errno.ENOSPC else "cannot be written"
    with pytest.raises(RunFolderError, match=rf"{run}.*{expected}") as caught:
        run_toy(tiny_config(), run, rerun=("total",))
    assert "Traceback" not in str(caught.value) and ("--out" in str(caught.value))
    monkeypatch.undo()
    assert not RunFolder.open(run).is_done("total/seed-0")
    assert not list(run.rglob(f"*{TEMP_MARK}*"))
    again = run_toy(tiny_config(), run)
    assert [u.ran for u in again.units] == [False, True]
    assert RunFolder.open(run).load("total/seed-0").tables["total"].equals(first)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the namespace test covers read-only")
def test_a_read_only_folder_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run_toy(tiny_config(), run)
    for path in [run, *run.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    try:
        with pytest.raises(RunFolderError, match=rf"{run} cannot be written .*writable --out"):
            run_toy(tiny_config(), run, rerun=("total",))
    finally:
        for path in [run, *run.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)


# A real small filesystem: a 1 MiB tmpfs in a user and mount namespace. One stage fills the disk
# before its files are written; another turns its own folder read-only mid-run (a read-only bind
# mount); last, the whole disk is remounted read-only before a resume.
ON_A_SMALL_DISK = r"""
import json, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_runs import draws_stage, restore_draws, tiny_config, toy_stages
from mmlens.errors import RunFolderError
from mmlens.runs import FunctionStage, RunFolder, run_study

disk = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
filler = disk / "filler"

filled = []

def filling(context):
    if not filled:  # the first attempt only: the resumed one runs on a disk with room again
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"x" * 4096)
        except OSError:
            filled.append(True)
        finally:
            os.close(fd)
    return draws_stage(context)

def turning_read_only(context):
    output = draws_stage(context)
    unit = str(context.session.folder.unit_dir(f"draws/seed-{context.seed}"))
    subprocess.run(["mount", "--bind", unit, unit], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", unit], check=True)
    return output

out = {}
for name, function in (("full", filling), ("read_only", turning_read_only)):
    stages = toy_stages()
    stages["draws"] = FunctionStage("draws", "Draws", function, restore_fn=restore_draws, config_sections=("probe",))
    run = disk / name
    try:
        run_study(tiny_config(), run, stages=stages, progress=False, report=False, echo=lambda t: None)
        out[name] = "no error"
    except RunFolderError as error:
        out[name] = str(error)
    except BaseException as error:
        out[name] = f"RAW {type(error).__name__}: {error}"
    if name == "full":
        filler.unlink()
        out["full_done_after_error"] = RunFolder.open(run).is_done("draws/seed-0")
        again = run_study(tiny_config(), run, stages=stages, progress=False, report=False, echo=lambda t: None)
        out["full_resumed"] = [u.ran for u in again.units]
    else:
        subprocess.run(["umount", str(run / "stages/draws/seed-0")], check=True)
subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
try:
    run_study(tiny_config(), disk / "full", stages=toy_stages(), progress=False, report=False, echo=lambda t: None)
except RunFolderError as error:
    out["read_only_at_start"] = str(error)
print(json.dumps(out))
"""


def test_a_real_full_disk_and_a_folder_turned_read_only(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("no user namespaces here: the monkeypatched writer test covers the same paths")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", ON_A_SMALL_DISK,
                             str(disk), str(Path(__file__).parent)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["full"].startswith(f"{disk / 'full'}: no space left on its disk"), out
    assert "Free some space" in out["full"] and "rerun the same command" in out["full"]
    assert out["full_done_after_error"] is False and out["full_resumed"] == [True, True]
    assert out["read_only"].startswith(f"{disk / 'read_only'} cannot be written (Read-only file system"), out
    assert "writable --out" in out["read_only"]
    assert out["read_only_at_start"].startswith(f"{disk / 'full'} cannot be written (Read-only file system"), out


def test_a_saved_sweep_refuses_a_changed_file(tmp_path):
    from mmlens import HookedMLLM
    from mmlens.data import load_segmentation
    from mmlens.probing import load_sweep, probe_sweep, save_sweep

    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="validation", n=12, image_size=32)
    with torch.no_grad():
        sweep = probe_sweep(model, scenes, sites=["adapter.hook_out"], probe="ridge", n_boot=1000, progress=False)
    folder = save_sweep(sweep, tmp_path / "sweep")
    for file in sorted(folder.iterdir()):
        original = file.read_bytes()
        for damage in (_edited, _truncated):
            damage(file)
            with pytest.raises(InputError, match=rf"{file.name}.*changed after save_sweep wrote it.*save_sweep"):
                load_sweep(folder, scenes)
            file.write_bytes(original)
    pd.testing.assert_frame_equal(load_sweep(folder, scenes).table, sweep.table, check_exact=True)
