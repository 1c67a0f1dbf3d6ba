"""`save_figure` writes offline HTML pages and refuses names that promise another format."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from mmlens.errors import InputError
from mmlens.viz import save_figure
from mmlens.viz.files import PLOTLY_JS


@pytest.mark.parametrize("name", ["figure.png", "figure.svg", "figure.pdf", "figure.jpeg", "figure"])
def test_a_name_that_is_not_html_is_refused_and_nothing_is_written(tmp_path, name):
    with pytest.raises(InputError, match=r"does not end in \.html.*write_image"):
        save_figure(go.Figure(go.Scatter(y=[1, 2])), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_an_html_page_loads_plotly_from_beside_it(tmp_path):
    path = save_figure(go.Figure(go.Scatter(y=[1, 2])), tmp_path / "curve.HTML")
    assert f'<script src="{PLOTLY_JS}"></script>' in path.read_text() and (tmp_path / PLOTLY_JS).is_file()
