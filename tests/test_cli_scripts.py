"""The `mmlens` command in scripts: a fast start, --quiet, --json, and `load_run` / `load_sweep` on a run folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import mmlens
from mmlens.cli import main
from mmlens.errors import InputError, RunFolderError
from mmlens.probing import load_sweep, save_sweep
from mmlens.runs import RunFolder, load_config

HEAVY = ("torch", "transformers", "transformer_lens", "datasets", "plotly")
TINY_STUDY = {
    "model": "tiny-shapes-llava",
    "dataset": {"name": "scenes", "n": 16},
    "n_boot": 1000,
    "probe": {"sites": ["adapter.hook_in", "adapter.hook_out", "blocks.3.hook_resid_post"], "controls": [],
              "alpha": 0.01, "sensitivity": False},
    "knockout": {"enabled": False},
    "position": {"enabled": False},
    "recovery": {"enabled": False},
}
BAR = re.compile(r"\d+%\||it/s|Loading weights")  # a tqdm frame, wherever it comes from


def _imported(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m mmlens ARGS`; (the process, every module it imported)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONIMPORTTIME"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mmlens", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    modules = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, flags=re.M))
    assert "mmlens.cli" in modules, done.stderr[-2000:]  # the log was read
    return done, modules


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_help_and_config_errors_do_not_import_the_model_stack(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "tiny-shapes-llava", "dataset": {"name": "scenes", "n": -3},
                                   "probe": {"knd": "ridge"}}))
    cases = {("--help",): (0, "COMMAND"), ("study", "--help"): (0, "--json"),
             ("study", str(bad), "--out", str(tmp_path / "run")): (2, "probe.knd: unknown key; did you mean 'kind'?"),
             ("study", str(tmp_path / "missing.yaml")): (2, "no such config file")}
    for args, (status, says) in cases.items():
        done, modules = _imported(list(args), tmp_path)
        assert done.returncode == status, (args, done.stderr[-2000:])
        assert says in done.stdout + done.stderr, args
        assert not _heavy(modules), (args, _heavy(modules))
    assert not (tmp_path / "run").exists()


def _fresh_python(code: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter (nothing imported yet, as in a script); fails the test if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONIMPORTTIME"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_public_names_still_resolve_lazily():
    from mmlens import HookedMLLM, load_run, load_sae  # noqa: F401

    assert mmlens.HookedMLLM is HookedMLLM and mmlens.errors.ConfigError.__name__ == "ConfigError"
    with pytest.raises(AttributeError, match="did you mean 'HookedMLLM'"):
        mmlens.HookedMLM  # noqa: B018
    # every public name of the package and of each subpackage resolves, from a fresh process; the
    # package lists only its own names; a submodule is an attribute as it was before names were lazy
    done = _fresh_python("""
import importlib, pkgutil, mmlens
helpers = {"TYPE_CHECKING", "annotations", "importlib", "after_import", "lazy_exports"}
assert not helpers & set(dir(mmlens)), sorted(helpers & set(dir(mmlens)))
assert mmlens.checksums is importlib.import_module("mmlens.checksums")
assert mmlens.runs.stages is importlib.import_module("mmlens.runs.stages")
packages = ["mmlens"] + sorted(f"mmlens.{m.name}" for m in pkgutil.iter_modules(mmlens.__path__) if m.ispkg)
for name in packages:
    package = importlib.import_module(name)
    for public in getattr(package, "__all__", ()):  # mmlens.zoo only registers models: no __all__
        assert getattr(package, public) is not None or public == "__version__", (name, public)
print(len(packages))
""")
    assert int(done.stdout.split()[-1]) >= 10


def test_stages_imported_directly_run_the_built_in_stages(tmp_path):
    """`from mmlens.runs.stages import run_study` (no `mmlens.runs` name used first) runs the
    built-in stages, and a stage registered there may depend on them."""
    done = _fresh_python(f"""
import json
from mmlens.runs.stages import run_study
from mmlens.runs.stages import STAGES, FunctionStage, add_stage
from mmlens.runs.outputs import StageOutput
from mmlens.runs import config_from_dict
assert list(STAGES)[:2] == ["probe_sweep", "anchor_knockout"], list(STAGES)
add_stage(FunctionStage("after_probes", "After the probes", lambda context: StageOutput(
    summary=[f"{{len(context.result('probe_sweep').table)}} rows"]), depends_on=("probe_sweep",)))
run = run_study(config_from_dict({TINY_STUDY!r}), {str(tmp_path / "run")!r}, progress=False, report=False,
                echo=lambda text: None)
print(json.dumps([(unit.unit, unit.ran) for unit in run.units]))
""", cwd=tmp_path)
    assert json.loads(done.stdout.splitlines()[-1]) == [["probe_sweep/seed-0", True], ["after_probes/seed-0", True]]


def test_quiet_restores_the_bars_of_libraries_first_imported_inside_it():
    done = _fresh_python("""
import importlib.resources, pkgutil, sys, warnings
from importlib.machinery import SourceFileLoader
from mmlens.progress import quiet
with quiet():
    import transformers, datasets
    from transformers.utils import logging
    assert not logging.is_progress_bar_enabled()
assert logging.is_progress_bar_enabled()
import huggingface_hub.utils as hub, datasets.utils.logging
assert not hub.are_progress_bars_disabled() and datasets.is_progress_bar_enabled()
# the import hook gave the modules their own loaders back: package data reads as usual
for module in (transformers, datasets):  # (transformers' lazy module stand-in has __loader__ None)
    assert isinstance(module.__spec__.loader, SourceFileLoader), module
    assert module.__loader__ in (None, module.__spec__.loader), module
assert pkgutil.get_data("datasets", "utils/resources/languages.json")
assert importlib.resources.files("datasets").joinpath("utils/resources/languages.json").read_bytes()
import mmlens.model.loading as loading
assert isinstance(loading.__loader__, SourceFileLoader) and loading.__spec__.loader is loading.__loader__
assert "mmlens.zoo" in sys.modules  # and the shipped models registered
print("ok")
""")
    assert done.stdout.split()[-1] == "ok"
    done = _fresh_python("""
from mmlens.cli import main
assert main(["hooks", "tiny-shapes-llava", "--quiet", "--json"]) == 0
from transformers.utils import logging
assert logging.is_progress_bar_enabled()
print("ok")
""")
    assert done.stdout.split()[-1] == "ok"


def test_a_failing_after_import_step_warns_and_the_import_works(tmp_path, monkeypatch):
    from mmlens.lazy import after_import

    package = tmp_path / "mmlens_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 3\n")
    (package / "data.txt").write_text("kept")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mmlens_probe_pkg", raising=False)
    calls = []

    def then():
        calls.append(1)
        raise AttributeError("module 'mmlens_probe_pkg' has no attribute 'renamed'")

    after_import("mmlens_probe_pkg", then)
    with pytest.warns(RuntimeWarning, match="after importing mmlens_probe_pkg failed.*renamed"):
        import mmlens_probe_pkg
    assert mmlens_probe_pkg.VALUE == 3 and calls == [1]
    import importlib.resources
    import pkgutil

    assert pkgutil.get_data("mmlens_probe_pkg", "data.txt") == b"kept"
    assert importlib.resources.files("mmlens_probe_pkg").joinpath("data.txt").read_text() == "kept"
    monkeypatch.delitem(sys.modules, "mmlens_probe_pkg")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """One probe-sweep-only study on 16 scenes, run as a script would: --quiet --json (captured by
    hand: capsys is per test)."""
    root = tmp_path_factory.mktemp("tiny_run")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_STUDY))
    out = root / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["study", str(config), "--out", str(out), "--quiet", "--json"])
    assert status == 0, stderr.getvalue()
    return out, json.loads(stdout.getvalue()), stderr.getvalue()


def test_quiet_json_study_prints_one_document_and_no_bar(tiny_run):
    out, document, stderr = tiny_run
    assert not BAR.search(stderr), stderr  # no bar of mmlens's, transformers' (Loading weights) or datasets'
    folder = RunFolder.open(out)
    assert document["run_folder"] == str(out.resolve())
    assert document["config_sha256"] == folder.config_sha256
    assert [(s["unit"], s["ran"], s["status"]) for s in document["stages"]] == [("probe_sweep/seed-0", True, "done")]
    assert document["findings"]["probe_sweep/seed-0"] == folder.record("probe_sweep/seed-0")["summary"]
    assert document["report"] == str((out / "report.html").resolve()) and Path(document["report"]).is_file()


def test_hooks_json_and_quiet_silences_the_libraries_bars(capsys):
    assert main(["hooks", "tiny-shapes-llava", "--json"]) == 0
    loud = capsys.readouterr()
    assert "Loading weights" in loud.err  # transformers' own bar: what --quiet must remove
    document = json.loads(loud.out)
    shapes = {h["name"]: h["shape"] for stage in document["hooks"].values() for h in stage}
    assert shapes["adapter.hook_out"] == [1, 64, 128] and document["n_image_tokens"] == 64
    assert list(document["hooks"]) == ["vision", "adapter", "llm"]

    assert main(["hooks", "tiny-shapes-llava", "--json", "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert not BAR.search(quiet.err), quiet.err
    assert json.loads(quiet.out) == document
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()  # restored once the command returned


def test_compare_and_report_json(tiny_run, capsys, tmp_path):
    out, _, _ = tiny_run
    assert main(["compare", str(out), str(out), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    table = document["seeds"]["0"]["table"]
    assert table and all(isinstance(row, dict) for row in table)
    assert document["seeds"]["0"]["findings"]
    assert main(["report", str(out), "--out", str(tmp_path / "again.html"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str((tmp_path / "again.html").resolve())}


def test_load_run_gives_tables_findings_config_and_status(tiny_run, tmp_path):
    out, _, _ = tiny_run
    run = mmlens.load_run(out)
    folder = RunFolder.open(out)
    assert run.stages == {"probe_sweep/seed-0": "done"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_STUDY))
    assert run.config == load_config(tmp_path / "config.yaml")
    assert isinstance(run.table("probe_table"), pd.DataFrame)
    pd.testing.assert_frame_equal(run.tables["probe_sweep/seed-0"]["summary"], folder.table("probe_sweep/seed-0", "summary"))
    assert run.findings["probe_sweep/seed-0"] == folder.record("probe_sweep/seed-0")["summary"]
    assert run.report == out / "report.html"
    text = repr(run)
    assert "probe_sweep/seed-0: done" in text and run.findings["probe_sweep/seed-0"][0] in text
    with pytest.raises(RunFolderError, match="did you mean 'summary'"):
        run.table("sumary")
    with pytest.raises(RunFolderError, match=r"no manifest.json; run folders inside it: .*run"):
        mmlens.load_run(out.parent)


def test_load_sweep_finds_the_sweep_of_a_run_folder(tiny_run, tmp_path):
    out, _, _ = tiny_run
    expected = mmlens.load_run(out).table("probe_table")
    for where in (out, out / "stages" / "probe_sweep" / "seed-0"):
        pd.testing.assert_frame_equal(load_sweep(where).table, expected)
    with pytest.raises(RunFolderError, match="no finished probe sweep for seed 5; finished: probe_sweep/seed-0"):
        load_sweep(out, seed=5)
    sweep = load_sweep(out)
    for name in ("a", "b"):
        save_sweep(sweep, tmp_path / "sweeps" / name)
    with pytest.raises(InputError, match=r"sweeps saved below it: .*sweeps/a, .*sweeps/b"):
        load_sweep(tmp_path / "sweeps")
    (tmp_path / "one").mkdir()
    save_sweep(sweep, tmp_path / "one" / "only")
    pd.testing.assert_frame_equal(load_sweep(tmp_path / "one").table, expected)


def test_load_sweep_refuses_wrong_paths_inside_a_run_folder(tiny_run, tmp_path):
    out, _, _ = tiny_run
    with pytest.raises(InputError, match="no such folder"):
        load_sweep(out / "no" / "such" / "folder")
    (out / "stages" / "sae_features").mkdir()  # another stage's folder is not the probe sweep
    try:
        for where in (out / "stages", out / "stages" / "sae_features", out / "stages" / "probe_sweep"):
            with pytest.raises(InputError, match=r"inside the run folder .*stages.probe_sweep.seed-N"):
                load_sweep(where)
    finally:
        (out / "stages" / "sae_features").rmdir()
    with pytest.raises(InputError, match="probe sweep of seed 0, not of seed=1"):
        load_sweep(out / "stages" / "probe_sweep" / "seed-0", seed=1)
    # the seed is read inside the run folder, not from a "seed-N" anywhere in its path
    copy = tmp_path / "seed-7" / "run"
    shutil.copytree(out, copy)
    expected = mmlens.load_run(out).table("probe_table")
    pd.testing.assert_frame_equal(load_sweep(copy).table, expected)
