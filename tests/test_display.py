"""A result shown in a notebook keeps the rows its findings are about, however long its table:
the anchor knockout's headline readout is the last of five, past the first twelve effect rows."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.display import MAX_ROWS, result_html
from mmlens.errors import InputError
from mmlens.experiments import anchor_knockout
from mmlens.probing import probe_sweep

SITES = ["adapter.hook_out"] + [f"blocks.{layer}.hook_resid_post" for layer in range(4)]


@pytest.fixture(scope="module")
def knockout_result():
    torch.set_grad_enabled(False)
    try:
        model = HookedMLLM.from_pretrained("tiny-shapes-llava")
        scenes = load_segmentation("scenes", split="validation", n=64, seed=0)
        sweep = probe_sweep(model, scenes, sites=SITES, probe="ridge", progress=False, n_boot=1000)
        yield anchor_knockout(model, sweep, n_control=1, n_boot=1000)
    finally:
        torch.set_grad_enabled(True)


def test_the_knockout_display_shows_the_rows_its_finding_names(knockout_result):
    effects = knockout_result.effects[knockout_result.effects.metric == "target_accuracy"]
    last = knockout_result.readouts[-1]
    assert len(effects) > MAX_ROWS and effects.hook.tolist().index(last.hook) >= MAX_ROWS  # the old cut hid them
    assert last.label in knockout_result.findings()[1]                                       # the finding names it
    page = knockout_result._repr_html_()
    table = page.split("<b>effects</b>")[1].split("</table>")[0]
    body = table.split("<tbody>")[1]
    rows = body.split("</tr>")[:-1]
    named = effects[effects.hook == last.hook]
    assert len(rows) == MAX_ROWS and table.count(last.hook) == len(named) == 3
    for row, (_, effect) in zip(rows, named.iterrows()):                       # first, highlighted, in table order
        assert 'style="background:#fff3bf"' in row and effect.comparison in row and last.hook in row
    assert not any("background" in row for row in rows[len(named):])
    assert "the 3 rows the findings name first, highlighted; 12 of 15 rows" in page


def test_focus_keeps_every_named_row_and_refuses_a_wrong_mask():
    table = pd.DataFrame({"site": [f"s{i}" for i in range(30)], "value": range(30)})
    named = table.site.isin(["s0", "s20", "s29"])
    page = result_html("r", ["about s20 and s29"], {"t": table}, focus={"t": named})
    body = page.split("<tbody>")[1]
    assert body.index("s20") < body.index("s1<") and "s29" in body and "s11<" not in body   # 3 named + 9 others
    assert "first 12 of 30 rows" in result_html("r", [], {"t": table})                      # no focus: the old cut
    with pytest.raises(InputError, match="one entry per row"):
        result_html("r", [], {"t": table}, focus={"t": named[:5]})
    with pytest.raises(InputError, match="not tables of this result"):
        result_html("r", [], {"t": table}, focus={"effects": named})
