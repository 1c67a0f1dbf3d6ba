"""Probe sites: a hook point read at the image tokens, with the token grid its labels live on.

Vision sites are read at the patch positions of the vision sequence (CLS left out) and labelled
on the patch grid; adapter and LLM sites are read at the image tokens the LLM sees and labelled
on the LLM token grid. A second vision tower's sites (a prefix in the family's
`vision_grid_prefixes`, e.g. DeepSeek-VL hybrid's `vision.high_res`; or an earlier, finer stage of
the one tower, FastVLM's `vision.stages.{s}`) are read and labelled on that grid
(`layout.on_grid(prefix)`); a point named outside such a prefix but computed on its grid is read
there too (the family's `vision_points_on_grids`: FastVLM's stem on its first stage's cells). Within a
grid, sites run in pipeline order: its entry points (the family's `vision_entry_points`), its blocks,
then every other point (a neck, a final convolution). Rows always come out image by image in
`pixel_values` order.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from ..model import HookedMLLM, ImageTokenLayout
from ..model.hook_names import Stage, parse_hook_name
from ..model.images.vision_grids import blocks_on_grid, grid_of_hook

STAGES: tuple[Stage, ...] = ("vision", "adapter", "llm")


@dataclass(frozen=True)
class Site:
    """A hook point a probe reads: its stage, its layer within the stage and a short label."""

    hook: str
    stage: Stage
    # within the stage; -1 for the stage's input (patch embeddings, adapter input) and a vision grid's
    # entry points, the grid's block count for its points after the blocks (a neck, a final conv)
    layer: int
    label: str  # short name for tables and plots
    vision_grid: str | None = None  # the hook prefix of a second tower's grid it is read on; None: the layout's own

    @property
    def grid(self) -> str:
        """The grid its rows and labels live on: "vision", "llm" or a second tower's prefix."""
        return self.vision_grid or ("vision" if self.stage == "vision" else "llm")


def site_for(model: HookedMLLM, hook: str) -> Site:
    hook = model.resolve_hook_name(hook)
    parsed = parse_hook_name(hook)
    layer = -1 if parsed.layer is None else parsed.layer
    if parsed.stage == "vision":
        return _vision_site(model, hook)
    if parsed.stage == "adapter":
        part = parsed.point.removeprefix("hook_")
        return Site(hook, "adapter", {"in": -1, "hidden": 0, "out": 1}.get(part, 0), f"A-{part}")
    return Site(hook, "llm", layer, hook if parsed.layer is None else f"L{layer}")


def _vision_site(model: HookedMLLM, hook: str) -> Site:
    """A vision point: a block's on its grid's layer; an entry point (`_entry_rank`) before the blocks
    (-1), any other after them (the grid's depth). Labelled by the tower it is named under."""
    tower, inner = _within_tower(model, hook)
    # a point named outside a grid's prefix but computed on that grid (FastVLM's stem on its first stage's)
    grid = model.architecture.vision_points_on_grids.get(hook, tower)
    name = "" if tower is None else tower.removeprefix("vision.") + "."
    if inner.layer is not None:
        return Site(hook, "vision", inner.layer, f"{name}V{inner.layer}", grid)
    layer = -1 if _entry_rank(model, inner) is not None else _grid_depth(model, grid)
    point = inner.site.replace("hook_", "")
    if inner.site == "hook_embed":
        label = f"{name}V-emb"
    elif tower is None and inner.site == inner.point:  # a point of the tower itself, e.g. V-final_conv
        label = f"V-{point}"
    else:  # its name within the tower says where it is, e.g. stages.4.pos_embed, high_res.neck_out
        label = f"{name}{point}"
    return Site(hook, "vision", layer, label, grid)


def _within_tower(model: HookedMLLM, hook: str):
    """The prefix of the second tower or stage `hook` is named under (None: the layout's own tower),
    and the point's name inside it parsed as a vision point."""
    tower = grid_of_hook(model.architecture.vision_grid_prefixes, hook)
    return tower, parse_hook_name(hook if tower is None else "vision" + hook[len(tower):])


def _entry_rank(model: HookedMLLM, inner) -> int | None:
    """Where an entry point comes among its grid's entries (None: not an entry)."""
    entries = model.architecture.vision_entry_points
    return next((i for i, entry in enumerate(entries) if entry in (inner.site, inner.point)), None)


def default_sites(model: HookedMLLM, sites: str | list[str] = "all") -> list[Site]:
    """'all', a stage name, or explicit hook names, in pipeline order."""
    if isinstance(sites, str) and sites in ("all", *STAGES):
        wanted = STAGES if sites == "all" else (sites,)
        cfg = model.cfg
        names = []
        if "vision" in wanted:
            names += ["vision.hook_embed"] + [f"vision.blocks.{i}.hook_resid_post" for i in range(cfg.vision.n_layers)]
            for tower in model.architecture.vision_grid_prefixes:  # a second tower or stage: its input and blocks
                names += [name for name in [f"{tower}.hook_embed"] if name in model.hook_dict]
                names += [f"{tower}.blocks.{i}.hook_resid_post" for i in range(_tower_depth(model, tower))]
        vision = sorted((site_for(model, n) for n in names), key=_pipeline_key(model))
        names = []
        if "adapter" in wanted:
            names += model.hook_names("adapter")
        if "llm" in wanted:
            names += [f"blocks.{l}.hook_resid_post" for l in range(cfg.n_layers)]
        return vision + [site_for(model, n) for n in names]
    if isinstance(sites, str):
        sites = [sites]
    return sorted((site_for(model, n) for n in sites), key=_pipeline_key(model))


def _pipeline_key(model: HookedMLLM):
    """Sort key of sites in pipeline order: by stage, then vision grid, then within the grid its entry
    points (in `vision_entry_points` order), its blocks, and the points after them (in hook order)."""
    order = {s: i for i, s in enumerate(STAGES)}
    prefixes = model.architecture.vision_grid_prefixes
    towers = {t: i + 1 for i, t in enumerate(prefixes)}
    own = len(prefixes) + 1 if model.architecture.vision_grids_first else 0  # the layout's own grid: after earlier stages
    hook_order = {name: i for i, name in enumerate(model.hook_dict)}

    def key(site: Site):
        if site.stage != "vision":
            return order[site.stage], 0, site.layer, 0
        _, inner = _within_tower(model, site.hook)
        if inner.layer is not None:  # a block's points keep the order they were given in
            within = 0
        else:
            within = (_entry_rank(model, inner) or 0) if site.layer < 0 else hook_order.get(site.hook, 0)
        return order[site.stage], towers.get(site.vision_grid, own), site.layer, within

    return key


def _grid_depth(model: HookedMLLM, grid: str | None) -> int:
    """How many blocks a vision grid has: the layout's own (None) or a second tower's or stage's."""
    return model.cfg.vision.n_layers if grid is None else _tower_depth(model, grid)


def _tower_depth(model: HookedMLLM, tower: str) -> int:
    """How many blocks a second vision tower has (its `blocks.{i}.hook_resid_post` points)."""
    return blocks_on_grid(model.hook_dict, tower)


def site_layout(site: Site, layout: ImageTokenLayout) -> ImageTokenLayout:
    """The layout whose `gather`, `table` and `pixels` at `site.stage` give the site's rows, their
    boxes and their pixel map (`layout.on_grid(site.grid)`)."""
    return layout.on_grid(site.grid)


def gather_image_tokens(site: Site, activation: Tensor, layout: ImageTokenLayout) -> Float[Tensor, "n_images n_tokens d"]:
    """The site's activation at every image token, image by image (`ImageTokenLayout.gather`)."""
    return site_layout(site, layout).gather(site.stage, activation)
