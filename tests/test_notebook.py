"""The tutorial notebook runs as committed and says what its cells claim.

`examples/tutorial.ipynb` is executed afresh with nbclient (a real kernel, the embedded model,
small subsets): no cell may fail, the numbers it prints must be in their ranges, and every figure
cell must draw a plotly figure. The committed copy must hold the generator's cells with their
outputs, since the docs site shows those outputs without running anything.
"""

from __future__ import annotations

import re
import runpy
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "tutorial.ipynb"
FIGURE = "application/vnd.plotly.v1+json"


def printed(cells: list, pattern: str) -> float:
    text = "".join(out.get("text", "") for cell in cells for out in cell.get("outputs", []) if out.output_type == "stream")
    found = re.search(pattern, text)
    assert found, f"no output matches {pattern!r}"
    return float(found.group(1))


def figures(cells: list) -> list[dict]:
    return [out["data"][FIGURE] for cell in cells for out in cell.get("outputs", []) if FIGURE in out.get("data", {})]


@pytest.fixture(scope="module")
def executed():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    started = time.perf_counter()
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return notebook, time.perf_counter() - started


def test_every_cell_runs_without_error(executed):
    notebook, seconds = executed
    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    stderr = [out.text for cell in notebook.cells for out in cell.get("outputs", [])
              if out.output_type == "stream" and out.name == "stderr"]
    assert not stderr, f"warnings or progress bars in the outputs: {stderr}"
    assert seconds < 240, f"the tutorial took {seconds:.0f} s; keep its subsets small"


def test_printed_results_are_in_range(executed):
    cells = executed[0].cells
    adapter = printed(cells, r"probe mIoU at the adapter output: ([0-9.]+)")
    recovery = printed(cells, r"at the recovery layer: ([0-9.]+)")
    # nine classes: predicting background everywhere scores about 0.1 on these scenes
    assert 0.2 < adapter <= 1 and 0.2 < recovery <= 1
    assert 0.5 < printed(cells, r"variance explained on held-out tokens: ([0-9.]+)") <= 1
    assert printed(cells, r"(\d+) activations cached") > 100
    assert printed(cells, r"largest change of a last-token logit: ([0-9.]+)") > 0  # the hook edited the run


def test_each_figure_cell_draws_a_figure(executed):
    drawn = figures(executed[0].cells)
    assert len(drawn) == 6  # probe curve, knockout, head heatmap, recovery map, attention on the image, SAE feature map
    for figure in drawn:
        assert figure["data"] and figure["layout"].get("width") is None  # traces, fitted to the column


def test_committed_notebook_is_the_generator_with_outputs():
    """examples/build_tutorial.py writes the notebook; the committed copy must be its output, run."""
    cells = runpy.run_path(str(ROOT / "examples" / "build_tutorial.py"))["CELLS"]
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(kind, source) for kind, source in cells], \
        "examples/tutorial.ipynb differs from examples/build_tutorial.py: run `python examples/build_tutorial.py`"
    assert len(figures(committed.cells)) == 6
    assert not [out for cell in committed.cells for out in cell.get("outputs", []) if out.output_type == "error"]
