"""docs/sae.md's snippets run as written on the embedded model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from test_snippets import ROOT, python_snippets


def page_text() -> str:
    return " ".join((ROOT / "docs" / "sae.md").read_text().split())


def test_sae_page_snippets_run(tmp_path: Path, monkeypatch) -> None:
    snippets = python_snippets(ROOT / "docs" / "sae.md")
    assert len(snippets) >= 3  # load, splice, features on the image
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__snippet__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: under load a second thread makes the tuned lens's steps 30x slower
    try:
        with torch.no_grad():
            for i, code in enumerate(snippets):
                exec(compile(code, f"docs/sae.md snippet {i + 1}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert namespace["features"].shape[-1] == namespace["sae"].cfg.d_sae
    assert (tmp_path / "my_sae" / "cfg.json").exists()
    assert (namespace["kl_tuned"][:-1] < namespace["kl_logit"][:-1]).all() and namespace["tuned_maps"].lens == "tuned lens"
    # the KL figures the page quotes, to the digits it states
    quoted = re.search(r"logit lens then tuned lens[^:]*:\s*((?:[\d.]+ / [\d.]+,?\s*)+)nats", page_text()).group(1)
    pairs = [tuple(float(v) for v in pair.split(" / ")) for pair in re.split(r",\s*", quoted.strip().rstrip(","))]
    measured = [(round(float(a), 2), round(float(b), 2))
                for a, b in zip(namespace["kl_logit"][:-1], namespace["kl_tuned"][:-1])]
    assert measured == pairs, (measured, pairs)
    assert namespace["iou"].shape == (3, 9) and len(namespace["lens"].labels) == namespace["model"].cfg.n_layers + 1
