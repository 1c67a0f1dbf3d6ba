"""Findings are worded from their intervals: a null effect reads "not distinguishable from zero",
a ratio over a null gap is withheld, and a report built from a run with a null effect says so."""

from __future__ import annotations

import html
import math

import numpy as np
import pytest
import torch
import yaml

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.findings import NOT_DISTINGUISHABLE, ZERO_WIDTH, effect_phrase, excludes_zero, verdict
from mmlens.probing import probe_sweep

# adapter.hook_out and blocks.0.hook_resid_pre carry the same activations at image positions, so
# the "recovery" between them is exactly zero: a null effect by construction.
NULL_SITES = ["adapter.hook_in", "adapter.hook_out", "blocks.0.hook_resid_pre"]
STRONG_CLAIMS = ("Segmentation drops at the adapter", "The LLM recovers segmentation", "Fraction of the drop recovered:",
                 "The study's finding is a drop", "a drop inside the adapter and a recovery")


def test_interval_words():
    assert verdict(0.01, 0.2) == "above zero" and verdict(-0.3, -0.01) == "below zero"
    assert verdict(-0.002, 0.037) == NOT_DISTINGUISHABLE
    # every resample the same value (one image, identical images): no evidence either way
    assert verdict(0.0, 0.0) == ZERO_WIDTH == verdict(0.694, 0.694) and not excludes_zero(0.778, 0.778)
    assert verdict(float("nan"), 1.0) == "no interval" and verdict(np.float32("nan"), np.float32(1)) == "no interval"
    assert excludes_zero(np.float32(0.1), np.float32(0.3)) and not excludes_zero(0.0, 0.3)
    assert effect_phrase(0.017, -0.002, 0.037) == "0.017 [-0.002, 0.037], not distinguishable from zero"
    assert effect_phrase(0.12, 0.08, 0.15) == "0.120 [0.080, 0.150]"
    assert effect_phrase(-0.05, -0.09, -0.01, signed=True) == "-0.050 [-0.090, -0.010]"


@pytest.fixture(scope="module")
def null_sweep():
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="validation", n=32)
    with torch.no_grad():
        return probe_sweep(model, scenes, sites=NULL_SITES, probe="ridge", n_boot=1000, progress=False)


def test_null_sweep_summary_withholds_the_ratio(null_sweep):
    summary = null_sweep.summary()
    recovery = summary.loc["recovery_in_llm"]
    assert recovery.value == recovery.low == recovery.high == 0.0          # the null is exact
    assert recovery.reading == ZERO_WIDTH
    drop = summary.loc["drop_at_adapter"]
    assert not excludes_zero(drop.low, drop.high), drop                    # precondition of the next lines
    assert drop.reading == NOT_DISTINGUISHABLE
    fraction = summary.loc["fraction_recovered"]
    assert all(math.isnan(fraction[c]) for c in ("value", "low", "high"))
    assert fraction.reading.startswith("withheld")
    findings = null_sweep.findings()
    assert findings[0].startswith("No drop at the adapter can be claimed")
    assert findings[1].startswith("No recovery in the LLM can be claimed")
    assert "withheld" in findings[2]
    assert f"], {NOT_DISTINGUISHABLE}" in findings[0] and f"], {ZERO_WIDTH}" in findings[1]  # both intervals, worded
    assert not any(claim in line for claim in STRONG_CLAIMS for line in findings)


def test_sweep_displays_itself_in_a_notebook(null_sweep):
    page = null_sweep._repr_html_()
    assert "ProbeSweep: 3 sites" in page and "No drop at the adapter can be claimed" in page
    assert "<table" in page and "adapter.hook_out" not in page.split("<table")[0]  # findings before tables
    assert "plotly" not in page.lower().replace("plot_probe_curve", "")           # no 4.8 MB library inlined


@pytest.fixture(scope="module")
def null_run(tmp_path_factory):
    from mmlens.cli import main

    root = tmp_path_factory.mktemp("null_run")
    config = {"model": "tiny-shapes-llava", "batch_size": 16, "n_boot": 1000, "dataset": {"name": "scenes", "n": 32},
              "probe": {"kind": "ridge", "sites": NULL_SITES, "controls": []},
              "knockout": {"enabled": False}, "position": {"enabled": False}, "recovery": {"enabled": False}}
    (root / "study.yaml").write_text(yaml.safe_dump(config))
    assert main(["study", str(root / "study.yaml"), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


def test_report_of_a_null_run_claims_nothing(null_run):
    page = (null_run / "report.html").read_text(encoding="utf-8")
    findings = page.split('id="section-1-findings-of-this-run"')[1].split("</section>")[0]
    assert "No drop at the adapter can be claimed" in findings
    assert "No recovery in the LLM can be claimed" in findings
    assert findings.count(f"], {NOT_DISTINGUISHABLE}") == 1 and findings.count(f"], {ZERO_WIDTH}") == 1
    assert "The fraction of the drop recovered is withheld" in findings
    for claim in STRONG_CLAIMS:
        assert claim not in page, claim
    # the summary table shows the withheld ratio as blank cells with the reason
    row = page.split('<td class="text">fraction_recovered</td>')[1].split("</tr>")[0]
    assert row.count('<td class="num"></td>') == 3 and "withheld" in row
    assert page.index("Findings of this run") < page.index("Drop-off and recovery of segmentation")


def test_report_shows_each_finding_once(null_run):
    """The findings section lists every stage's findings; the figure sections do not repeat them
    (the probe sweep's lines used to appear under both of its figures too)."""
    from mmlens.runs.folder import RunFolder

    page = (null_run / "report.html").read_text(encoding="utf-8")
    folder = RunFolder.open(null_run)
    lines = [line for unit in folder.done_units() for line in folder.record(unit)["summary"]]
    assert len(lines) >= 3 and page.count('class="plotly-graph-div"') == 2  # the sweep's curve and predictions
    for line in lines:
        assert page.count(html.escape(line)) == 1, line


def test_run_report_loads_plotly_from_beside_it(null_run):
    page = (null_run / "report.html").read_text(encoding="utf-8")
    assert '<script type="text/javascript" src="plotly.min.js"></script>' in page
    assert "* plotly.js v" not in page                                     # not inlined: the page stays small
    assert (null_run / "plotly.min.js").read_text(encoding="utf-8").lstrip().startswith("/**")
    assert (null_run / "report.html").stat().st_size < 1_000_000


def test_run_report_renders_offline_in_chromium(null_run, tmp_path):
    from mmlens.testing.browser import drawn_fraction, dump_dom, rendered_figures, screenshot
    from test_report import require_chromium

    require_chromium()
    figures = rendered_figures(dump_dom(null_run / "report.html"))
    assert len(figures) == 2 and all(n >= 1 for n in figures.values()), figures  # curve and predictions drew
    png = screenshot(null_run / "report.html", tmp_path / "report.png", width=1280, height=2400)
    assert drawn_fraction(png) > 0.05
