"""Probe sites: a hook point read at the image tokens, with the token grid its labels live on.

Vision sites are read at the patch positions of the vision sequence (CLS left out) and labelled
on the patch grid; adapter and LLM sites are read at the image tokens the LLM sees and labelled
on the LLM token grid. Rows always come out image by image in `pixel_values` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jaxtyping import Float
from torch import Tensor

from ..model import HookedMLLM, ImageTokenLayout
from ..model.hook_names import Stage, parse_hook_name

STAGES: tuple[Stage, ...] = ("vision", "adapter", "llm")


@dataclass(frozen=True)
class Site:
    """A hook point a probe reads: its stage, its layer within the stage and a short label."""

    hook: str
    stage: Stage
    layer: int  # within the stage; -1 for the stage's input (patch embeddings, adapter input)
    label: str  # short name for tables and plots

    @property
    def grid(self) -> Literal["vision", "llm"]:
        return "vision" if self.stage == "vision" else "llm"


def site_for(model: HookedMLLM, hook: str) -> Site:
    hook = model.resolve_hook_name(hook)
    parsed = parse_hook_name(hook)
    layer = -1 if parsed.layer is None else parsed.layer
    if parsed.stage == "vision":
        return Site(hook, "vision", layer, "V-emb" if parsed.layer is None else f"V{layer}")
    if parsed.stage == "adapter":
        part = parsed.point.removeprefix("hook_")
        return Site(hook, "adapter", {"in": -1, "hidden": 0, "out": 1}.get(part, 0), f"A-{part}")
    return Site(hook, "llm", layer, hook if parsed.layer is None else f"L{layer}")


def default_sites(model: HookedMLLM, sites: str | list[str] = "all") -> list[Site]:
    """'all', a stage name, or explicit hook names, in pipeline order."""
    if isinstance(sites, str) and sites in ("all", *STAGES):
        wanted = STAGES if sites == "all" else (sites,)
        cfg = model.cfg
        names = []
        if "vision" in wanted:
            names += ["vision.hook_embed"] + [f"vision.blocks.{i}.hook_resid_post" for i in range(cfg.vision.n_layers)]
        if "adapter" in wanted:
            names += model.hook_names("adapter")
        if "llm" in wanted:
            names += [f"blocks.{l}.hook_resid_post" for l in range(cfg.n_layers)]
        return [site_for(model, n) for n in names]
    if isinstance(sites, str):
        sites = [sites]
    resolved = [site_for(model, n) for n in sites]
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(resolved, key=lambda s: (order[s.stage], s.layer))


def gather_image_tokens(site: Site, activation: Tensor, layout: ImageTokenLayout) -> Float[Tensor, "n_images n_tokens d"]:
    """The site's activation at every image token, image by image (`ImageTokenLayout.gather`)."""
    return layout.gather(site.stage, activation)
