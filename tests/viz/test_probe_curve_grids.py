"""The probe curve with a second vision tower (DeepSeek-VL hybrid's SAM beside SigLIP): each tower's
sites are their own line, never joined into the other's, while a one-tower sweep draws exactly the
figure it drew before towers were told apart."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mmlens.probing.sites import Site
from mmlens.viz import plot_probe_curve

SAM = "vision.high_res"
# The one-tower figure as plot_probe_curve drew it before second grids were split out (plotly JSON
# of `sweep_of(ONE_TOWER)`, template left out): the split must not change it by a single value.
BEFORE = Path(__file__).parent / "data" / "probe_curve_one_tower.json"

ONE_TOWER = [Site("vision.hook_embed", "vision", -1, "V-emb"), Site("vision.blocks.0.hook_resid_post", "vision", 0, "V0"),
             Site("vision.blocks.1.hook_resid_post", "vision", 1, "V1"), Site("adapter.hook_out", "adapter", 0, "A-out"),
             Site("blocks.0.hook_resid_post", "llm", 0, "L0"), Site("blocks.1.hook_resid_post", "llm", 1, "L1")]
TWO_TOWERS = ONE_TOWER[:2] + [Site(f"{SAM}.hook_embed", "vision", -1, "high_res.V-emb", SAM),
                              Site(f"{SAM}.blocks.0.hook_resid_post", "vision", 0, "high_res.V0", SAM),
                              Site(f"{SAM}.blocks.1.hook_resid_post", "vision", 1, "high_res.V1", SAM)] + ONE_TOWER[3:]
CONDITIONS = ("model", "random_init", "shuffled_labels", "penalty/10")


def sweep_of(sites: list[Site]) -> SimpleNamespace:
    """A sweep's table and sites (all `plot_probe_curve` reads), with distinct values at every row."""
    rng = np.random.default_rng(0)
    rows = []
    for condition in CONDITIONS:
        for depth, site in enumerate(sites):
            miou = float(rng.uniform(0.2, 0.8))
            rows.append({"condition": condition, "depth": depth, "stage": site.stage, "grid": site.grid,
                         "layer": site.layer, "site": site.label, "hook": site.hook, "miou": miou,
                         "miou_low": miou - 0.05, "miou_high": miou + 0.05, "token_accuracy": miou + 0.1,
                         "pixel_accuracy": miou + 0.05, "ceiling": 0.9 if site.grid == "llm" else 0.95})
    return SimpleNamespace(table=pd.DataFrame(rows), sites=sites)


def without_template(fig: go.Figure) -> dict:
    drawn = json.loads(fig.to_json())
    drawn["layout"].pop("template")
    return drawn


def lines(fig: go.Figure) -> dict[str, go.Scatter]:
    return {t.name: t for t in fig.data if t.mode == "lines+markers"}


def test_a_second_tower_is_its_own_line_that_never_joins_the_first():
    fig = plot_probe_curve(sweep_of(TWO_TOWERS))
    drawn = lines(fig)
    assert set(drawn) == {"model", "model (high_res)", "random_init", "random_init (high_res)",
                          "shuffled_labels", "shuffled_labels (high_res)"}
    sam, main = drawn["model (high_res)"], drawn["model"]
    assert list(sam.x) == [2, 3, 4] and list(sam.customdata[:, 0]) == [s.hook for s in TWO_TOWERS[2:5]]
    # SigLIP's line stops at V0 (depth 1) and picks up at the adapter (depth 5): a gap, not a segment
    # over SAM's sites
    assert list(main.x) == [0, 1, None, 5, 6, 7] and main.y[2] is None and main.connectgaps is False
    segments = [(a, b) for a, b in zip(main.x, main.x[1:]) if a is not None and b is not None]
    assert all(not (a < 2 <= b or a <= 4 < b) for a, b in segments)
    table = sweep_of(TWO_TOWERS).table
    model_sam = table[(table.condition == "model") & (table.grid == SAM)]
    assert np.allclose(sam.y, model_sam.miou)
    # the same condition's colour and dash, told apart by the marker
    assert sam.line.color == main.line.color and sam.line.dash == main.line.dash
    assert sam.marker.symbol != main.marker.symbol
    # the ceiling is per grid too: SAM's 8x8 patches are not SigLIP's
    ceilings = {t.name: t for t in fig.data if t.name and t.name.startswith("token-resolution ceiling")}
    assert list(ceilings["token-resolution ceiling (high_res)"].x) == [2, 3, 4]
    assert list(ceilings["token-resolution ceiling"].x) == [0, 1, None, 5, 6, 7]
    # each interval band covers its own run of sites only
    bands = [list(t.x) for t in fig.data if t.fill == "toself" and t.name == "model 95% interval"]
    assert sorted(b[: len(b) // 2] for b in bands) == [[0, 1], [2, 3, 4], [5, 6, 7]]


def test_a_one_tower_sweep_draws_the_figure_it_drew_before():
    fig = plot_probe_curve(sweep_of(ONE_TOWER))
    assert without_template(fig) == json.loads(BEFORE.read_text())
    assert list(lines(fig)["model"].x) == [0, 1, 2, 3, 4, 5]  # vision runs into the LLM as one line


def test_a_table_saved_before_grids_were_recorded_still_draws():
    sweep = sweep_of(ONE_TOWER)
    sweep.table = sweep.table.drop(columns="grid")
    assert without_template(plot_probe_curve(sweep)) == json.loads(BEFORE.read_text())


def test_earlier_stages_of_one_tower_stay_on_its_line():
    # FastVLM: two finer stages feed the final grid, so the sweep lists them first; the curve is one
    # pipeline from the stem to the LLM, each stage's sites at their own depth, no line of their own
    stages = [Site(f"vision.stages.{s}.blocks.0.hook_resid_post", "vision", 0, f"stages.{s}.V0", f"vision.stages.{s}")
              for s in (0, 1)]
    sweep = sweep_of(stages + ONE_TOWER[1:])
    fig = plot_probe_curve(sweep)
    drawn = lines(fig)
    assert set(drawn) == {"model", "random_init", "shuffled_labels"}
    assert list(drawn["model"].x) == [0, 1, 2, 3, 4, 5, 6]
    assert list(drawn["model"].customdata[:, 0]) == [s.hook for s in stages + ONE_TOWER[1:]]
    model_rows = sweep.table[sweep.table.condition == "model"]
    assert np.allclose(drawn["model"].y, model_rows.miou)
    ceiling = next(t for t in fig.data if t.name == "token-resolution ceiling")
    assert list(ceiling.x) == [0, 1, 2, 3, 4, 5, 6]
    # a grid after the own grid's sites is a second tower, drawn apart, however it is named
    late = Site("vision.stages.9.blocks.0.hook_resid_post", "vision", 0, "stages.9.V0", "vision.stages.9")
    drawn = lines(plot_probe_curve(sweep_of(ONE_TOWER[:2] + [late] + ONE_TOWER[3:])))
    assert "model (stages.9)" in drawn and list(drawn["model (stages.9)"].x) == [2]
