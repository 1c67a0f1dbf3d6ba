"""docs/sae.md's snippets run as written on the embedded model."""

from __future__ import annotations

from pathlib import Path

import torch

from test_snippets import ROOT, python_snippets


def test_sae_page_snippets_run(tmp_path: Path, monkeypatch) -> None:
    snippets = python_snippets(ROOT / "docs" / "sae.md")
    assert len(snippets) >= 3  # load, splice, features on the image
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__snippet__"}
    with torch.no_grad():
        for i, code in enumerate(snippets):
            exec(compile(code, f"docs/sae.md snippet {i + 1}", "exec"), namespace)
    assert namespace["features"].shape[-1] == namespace["sae"].cfg.d_sae
    assert (tmp_path / "my_sae" / "cfg.json").exists()
    assert namespace["iou"].shape == (3, 9) and len(namespace["lens"].labels) == namespace["model"].cfg.n_layers + 1
