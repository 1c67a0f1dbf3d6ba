"""The examples: `--help` works for each, each runs on the embedded model at a small size, and
every figure it writes opens offline in headless Chromium, sharing one plotly.js per folder."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from mmlens.testing.browser import dump_dom, rendered_figures
from test_report import require_chromium

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# Small but complete runs of every example that writes figures: (script, arguments).
RUNS = {
    "02_scenes_and_model": ["--out", "{out}/scene.html"],
    "03_dropoff_recovery": ["--images", "24", "--probe", "ridge", "--out", "{out}"],
    "04_anchors_and_positions": ["--images", "32", "--probe", "ridge", "--out", "{out}"],
    "05_recovery_heads": ["--images", "32", "--study-images", "8", "--probe", "ridge", "--corruptions", "counterfactual",
                          "--out", "{out}"],
    # reads a study config (examples/configs/ are all `mmlens study` configs) and runs its probe sweep
    "run_probe_config": [str(ROOT / "examples" / "configs" / "tiny_shapes_scenes.yaml"), "--images", "24", "--out", "{out}"],
}


def run_example(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / f"{script}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_help_works(example, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(example), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(example), run_name="__main__")  # in-process: the imports are paid once
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and example.name in out
    assert not list(tmp_path.iterdir())                                     # --help does nothing else


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_figures_open_offline(script, tmp_path):
    out = tmp_path / "out"
    done = run_example(script, [a.format(out=out) for a in RUNS[script]], tmp_path)
    pages = sorted(out.rglob("*.html"))
    assert pages, done.stdout[-2000:]
    for folder in {p.parent for p in pages}:
        assert (folder / "plotly.min.js").is_file()                          # one library per folder ...
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "* plotly.js v" not in text and "cdn.plot.ly" not in text     # ... not inlined, not the CDN
        assert page.stat().st_size < 1_000_000, (page.name, page.stat().st_size)
    require_chromium()
    for page in pages:
        figures = rendered_figures(dump_dom(page))
        assert figures and all(n >= 1 for n in figures.values()), (page.name, figures)


def test_cache_and_hooks_example_runs(tmp_path):
    done = run_example("01_cache_and_hooks", [], tmp_path)
    assert "cached" in done.stdout and "adapter.hook_out" in done.stdout
