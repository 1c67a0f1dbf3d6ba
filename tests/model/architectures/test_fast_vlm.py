"""FastVLM: FastViTHD (timm: RepMixer stages, then attention stages, then a final convolution) -> an
MLP projector -> Qwen2, on LLaVA's fixed grid of 64 px cells. The family tier runs on a tiny model
with FastViTHD's five stages (64 px images: 4x4 tokens; the first attention stage on 8x8); the
tower's points are checked against timm's modules, its knockouts against timm's attention given the
mask, and probes on the finer stages read and label each stage's own grid.

Hugging Face builds the tower through timm, which imports torchvision: without both this module is
skipped (test_fast_vlm_without_timm.py checks the refusal there)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("timm", reason="FastVLM's tower is a timm model, and timm needs torchvision: "
                    "pip install timm torchvision (a torchvision built for this torch)", exc_type=ImportError)

from mmlens import HookedMLLM  # noqa: E402 - after the skip: nothing here runs without timm
from mmlens.data import load_segmentation  # noqa: E402
from mmlens.data.schema import segmentation_info  # noqa: E402
from mmlens.errors import HookNameError, InputError, LayoutMismatchError, UnsupportedModelError  # noqa: E402
from mmlens.model.architectures.fast_vlm import fastvit  # noqa: E402
from mmlens.model.images.pixel_map import TokenGrid  # noqa: E402
from mmlens.model.runtime.attention_masks import additive_mask  # noqa: E402
from mmlens.probing import probe_sweep  # noqa: E402
from mmlens.probing.batches import labelled_batches  # noqa: E402
from mmlens.probing.sites import default_sites, gather_image_tokens, site_for  # noqa: E402
from mmlens.probing.token_labels import token_labels  # noqa: E402
from mmlens.testing.families.fast_vlm import tiny_fast_vlm  # noqa: E402

import family_tier as tier  # noqa: E402
from family_tier import *  # noqa: E402, F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"fast_vlm": lambda attn: tiny_fast_vlm(attn_implementation=attn)})

FINE = "vision.stages.3"  # the first attention stage: 8x8 cells of 8 px, under the final 4x4 grid


def _tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """timm's [image, channels, h, w] as mmlens's [image, h * w, channels] (HF's flatten order)."""
    return feature_map.flatten(2).transpose(1, 2)


def _timm_outputs(reference, inputs, modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Each timm module's output ([image, channels, h, w]) in one Hugging Face forward, by name."""
    seen = {}
    handles = [m.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out))
               for name, m in modules.items()]
    try:
        reference(**inputs.hf_kwargs())
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def test_tower_points_equal_timm_modules(eager):
    """Each tower point holds what timm's module computes: the stem, every stage's entry and blocks
    (RepMixer and attention, on their own grids), the final convolution; the projector reads it."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    tower = reference.model.vision_tower.timm_model
    modules = {"vision.hook_embed": tower.stem, "vision.hook_final_conv": tower.final_conv}
    for s, stage in enumerate(tower.stages):
        if not isinstance(stage.downsample, torch.nn.Identity):
            modules[f"vision.stages.{s}.hook_downsampled"] = stage.downsample
        for j, block in enumerate(stage.blocks):
            name = f"vision.blocks.{j}" if s == 4 else f"vision.stages.{s}.blocks.{j}"
            modules[f"{name}.hook_resid_post"] = block
    modules[f"{FINE}.hook_pos_embed"] = tower.stages[3].pos_emb
    seen = _timm_outputs(reference, inputs, modules)
    _, cache = model.run_with_cache(inputs, names_filter=lambda name: name.startswith(("vision.", "adapter.hook_in")))
    for name, out in seen.items():
        # 1e-5 of the point's scale (up to about 10 here): timm attends through fused sdpa, which sums in
        # another order than the step-by-step attention
        scale = max(1.0, float(out.abs().max()))
        torch.testing.assert_close(cache[name], _tokens(out), atol=1e-5 * scale, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert cache["vision.hook_embed"].shape[1] == 16 * 16 and cache[f"{FINE}.blocks.0.hook_resid_post"].shape[1] == 64
    assert cache["vision.blocks.1.hook_resid_post"].shape[1] == 16 == model.cfg.adapter.n_image_tokens
    torch.testing.assert_close(cache["adapter.hook_in"], cache["vision.hook_final_conv"], atol=0, rtol=0)
    # TL's names on the attention blocks: the pattern is a softmax over the grid, the residual adds up
    pattern = cache[f"{FINE}.blocks.0.attn.hook_pattern"]
    assert pattern.shape == (3, 1, 64, 64)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(3, 1, 64), atol=1e-5, rtol=0)
    block = "vision.blocks.0"
    torch.testing.assert_close(cache[f"{block}.hook_resid_mid"],
                               cache[f"{block}.hook_resid_pre"] + cache[f"{block}.hook_attn_out"], atol=1e-6, rtol=0)


@torch.no_grad()
def test_the_weight_surface_reads_timms_fused_qkv_and_pointwise_convolutions(eager):
    """`W_Q` is the query rows of timm's fused qkv (`hook_q` = the normalised residual times it), `W_in` /
    `b_in` the MLP's first 1x1 convolution (`hook_pre` = `hook_conv` times it), on a stage before the final
    grid and on `vision.blocks`; `layer_scale(0)` is the attention branch's LayerScale2d as a vector."""
    model, inputs = eager.model, eager.inputs
    names = [f"{block}.{point}" for block in (f"{FINE}.blocks.1", "vision.blocks.0")
             for point in ("ln1.hook_normalized", "attn.hook_q", "mlp.hook_conv", "mlp.hook_pre", "hook_attn_out", "attn.hook_z")]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    tower = eager.reference.model.vision_tower.timm_model
    for block, hooks, timm_block in ((f"{FINE}.blocks.1", model.vision.stages[3].blocks[1], tower.stages[3].blocks[1]),
                                     ("vision.blocks.0", model.vision.blocks[0], tower.stages[4].blocks[0])):
        queries = torch.einsum("bpd,hde->bphe", cache[f"{block}.ln1.hook_normalized"], hooks.attn.W_Q)
        torch.testing.assert_close(queries, cache[f"{block}.attn.hook_q"], atol=1e-5, rtol=0)
        pre = cache[f"{block}.mlp.hook_conv"] @ hooks.mlp.W_in + hooks.mlp.b_in
        torch.testing.assert_close(pre, cache[f"{block}.mlp.hook_pre"], atol=1e-5, rtol=0)
        out = (torch.einsum("bphd,hde->bpe", cache[f"{block}.attn.hook_z"], hooks.attn.W_O) + hooks.attn.b_O) * hooks.layer_scale(0)
        torch.testing.assert_close(out, cache[f"{block}.hook_attn_out"], atol=1e-5, rtol=0)
        assert torch.equal(hooks.layer_scale(0), timm_block.layer_scale_1.gamma.view(-1))


def _masked_timm_attention(monkeypatch, masks: dict[int, torch.Tensor]) -> None:
    """timm's fused attention (scaled_dot_product_attention) given `masks[n_positions]` (additive,
    [image, 1, query, key]) wherever it attends over that many positions."""
    plain = torch.nn.functional.scaled_dot_product_attention

    def masked(q, k, v, *args, **kwargs):
        mask = masks.get(q.shape[-2])
        return plain(q, k, v, *args, attn_mask=None if mask is None else mask.to(q.dtype), **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", masked)


@torch.no_grad()
def test_final_grid_knockout_equals_timm_attention_with_its_mask(eager, monkeypatch):
    """`knockout(stage="vision")` on the final-grid attention blocks (every image token cut off from the
    top-left token's cell) = timm's attention given the effective mask, at the logits; verified."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    ko, ours = tier.verified_vision_knockout(model, inputs)
    unedited = model(inputs)
    _masked_timm_attention(monkeypatch, {16: additive_mask(~ko.blocked.cpu())})
    theirs = reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - unedited)[valid].abs().max() > 1e-4, "the knockout changed something"


@torch.no_grad()
def test_fine_attention_stage_knockout_by_hand_equals_timm_with_its_mask(eager, monkeypatch):
    """On the first attention stage (8x8), the 2x2 cells under the top-left token cut off from every other
    cell by an edit of `hook_attn_scores` = timm's attention given that mask, at the image tokens the LLM
    receives and at the logits; no attention is left on the blocked edges."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    corner = torch.zeros(8, 8, dtype=torch.bool)
    corner[:2, :2] = True
    corner = corner.flatten()
    blocked = (~corner[:, None] & corner[None, :]).expand(3, 64, 64)
    left = []

    def block(scores, hook):
        return scores.masked_fill(blocked[:, None], float("-inf"))

    hooks = [(f"{FINE}.blocks.{j}.attn.hook_attn_scores", block) for j in range(2)]
    hooks += [(f"{FINE}.blocks.{j}.attn.hook_pattern", lambda p, hook: left.append(float(p[blocked[:, None].expand_as(p)].abs().max())))
              for j in range(2)]
    read = {}
    hooks.append(("adapter.hook_out", lambda x, hook: read.__setitem__("edited", x)))
    ours = model.run_with_hooks(inputs, fwd_hooks=hooks)
    assert left == [0.0, 0.0]
    _, clean = model.run_with_cache(inputs, names_filter="adapter.hook_out")
    _masked_timm_attention(monkeypatch, {64: additive_mask(~blocked)})
    theirs = reference(**inputs.hf_kwargs())
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs.logits[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(read["edited"], theirs.image_hidden_states, atol=1e-6, rtol=0)
    # a random-weight LLM barely moves for one corner of one stage: the image tokens it reads did
    assert (read["edited"] - clean["adapter.hook_out"]).abs().max() > 1e-4


def test_a_finer_attention_stage_head_is_painted_on_its_own_grid(eager):
    """attention_on_image on the first attention stage (8x8 cells of 8 px): a query cell's pattern row,
    read by hand from the cache, on that stage's cells (boxes of 8 px on the layout's canvas), the
    other images' cells zero; the final grid's stage name keeps working beside it."""
    from mmlens.experiments.attention_on_image import attention_on_image

    model, inputs = eager.model, eager.inputs
    result = attention_on_image(model, inputs, 1, heads=[0], query=(5, 2), stage=FINE, image=2)
    _, cache = model.run_with_cache(inputs, names_filter=f"{FINE}.blocks.1.attn.hook_pattern")
    row = cache[f"{FINE}.blocks.1.attn.hook_pattern"][2, 0, 5 * 8 + 2].float()
    torch.testing.assert_close(result.segment_grid(0, 2).flatten(), row)
    assert result.values.shape == (1, 3, 64) and float(result.mass[0, :2].abs().max()) == 0
    assert result.grid_cells(2, 0).x_edges.tolist() == list(range(0, 65, 8))
    final = attention_on_image(model, inputs, 0, heads=[1], query=(1, 3), stage="vision", image=0)
    assert final.values.shape[-1] == 16
    with pytest.raises(InputError, match=r"vision.stages.0 layer 0 has no softmax attention pattern"):
        attention_on_image(model, inputs, 0, stage="vision.stages.0", query=(0, 0))


@torch.no_grad()
def test_stage_sites_give_the_probe_timms_feature_maps_row_for_row(eager):
    """What a probe on a finer stage's point reads, per image and cell in raster order: the feature map
    timm's block computes there, flattened by hand (stage 0 on 16x16, the first attention stage on 8x8);
    an attention point's heads come concatenated."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    tower = reference.model.vision_tower.timm_model
    blocks = {"vision.stages.0.blocks.0.hook_resid_post": tower.stages[0].blocks[0],
              f"{FINE}.blocks.1.hook_resid_post": tower.stages[3].blocks[1]}
    seen = _timm_outputs(reference, inputs, blocks)
    q = f"{FINE}.blocks.0.attn.hook_q"
    _, cache = model.run_with_cache(inputs, names_filter=[*blocks, q])
    for name, feature_map in seen.items():
        site = site_for(model, name)
        features = gather_image_tokens(site, cache[name], inputs.layout)
        n_images, channels, rows, cols = feature_map.shape
        by_hand = torch.stack([torch.stack([feature_map[i, :, r, c] for r in range(rows) for c in range(cols)])
                               for i in range(n_images)])
        assert site.grid == name.rsplit(".blocks.", 1)[0] and features.shape == (3, rows * cols, channels)
        torch.testing.assert_close(features, by_hand, atol=1e-5 * max(1.0, float(by_hand.abs().max())), rtol=0, msg=name)
    assert gather_image_tokens(site_for(model, q), cache[q], inputs.layout).shape == (3, 64, 32)
    assert torch.equal(gather_image_tokens(site_for(model, q), cache[q], inputs.layout), cache[q].flatten(2))


def test_stage_cells_are_labelled_on_their_own_grid_in_probing_batches(eager):
    """The probing batches label each finer stage's cells from the masks on the layout's canvas (the one
    the tower read): `token_labels` on that stage's 8x8 / 16x16 grid of 64 px, by hand."""
    model = eager.model
    scenes = load_segmentation("scenes", split="validation", n=4, seed=0, image_size=64)
    (batch,) = labelled_batches(model, scenes, range(4), batch_size=4)
    masks = np.stack([model.transform_mask(np.asarray(scenes[i]["mask"])) for i in range(4)])
    n_classes = len(segmentation_info(scenes).class_names)
    for stage, side in ((FINE, 8), ("vision.stages.0", 16)):
        by_hand = token_labels(masks, TokenGrid(side, side, (64, 64)), n_classes=n_classes)
        ours = batch.labels[stage]
        assert ours.labels.shape == (4, side * side) and torch.equal(ours.labels, by_hand.labels)
        assert torch.equal(ours.valid, by_hand.valid) and len(torch.unique(ours.labels[ours.valid])) > 1
    assert batch.labels["vision"].labels.shape == (4, 16)  # the final grid keeps its own 4x4 labels


def test_a_sweep_over_the_stages_and_the_llm_runs_end_to_end(eager):
    """A sweep over a point of every stage grid, the final grid and the LLM: one curve per grid in pipeline
    order, each stage scored on its own grid (and ceiling), and the held-out predictions at the first
    attention stage the fitted probe's on its features read by hand."""
    model = eager.model
    scenes = load_segmentation("scenes", split="validation", n=12, seed=0, image_size=64)
    hooks = ["blocks.1.hook_resid_post", "vision.blocks.1.hook_resid_post", f"{FINE}.blocks.1.hook_resid_post",
             f"{FINE}.blocks.0.hook_resid_post", "vision.stages.0.blocks.0.hook_resid_post"]
    sweep = probe_sweep(model, scenes, sites=hooks, probe="ridge", progress=False, alpha=1e-2)
    rows = sweep.table[sweep.table.condition == "model"].sort_values("depth")
    curves = {grid: list(part.hook) for grid, part in rows.groupby("grid", sort=False)}
    assert list(curves) == ["vision.stages.0", FINE, "vision", "llm"]
    assert curves[FINE] == [f"{FINE}.blocks.0.hook_resid_post", f"{FINE}.blocks.1.hook_resid_post"]
    assert list(rows[rows.grid == FINE].site) == ["stages.3.V0", "stages.3.V1"]
    assert np.isfinite(rows.miou).all() and set(sweep.grids) == {"vision", "llm", "vision.stages.0", FINE}
    assert rows[rows.grid == FINE].ceiling.nunique() == 1
    assert sweep.ceilings[FINE].miou > sweep.ceilings["vision"].miou  # 8 px cells paint finer than 16 px ones
    test_images = [scenes[int(i)]["image"] for i in sweep.test_indices]
    inputs = model.prepare(test_images, "")
    hook = f"{FINE}.blocks.1.hook_resid_post"
    _, cache = model.run_with_cache(inputs, names_filter=[hook])
    features = gather_image_tokens(site_for(model, hook), cache[hook], inputs.layout)
    by_hand = sweep.probe(hook).predict(features.flatten(0, 1).float()).view(len(test_images), 64)
    assert torch.equal(sweep.predictions[("model", hook)].long(), by_hand.long())


# every vision point outside the blocks, as (label, grid) in pipeline order with a block of each grid among them:
# the stem on the first stage's 16x16 grid (the same 4 px cells), each stage's entry (halving, then
# position encoding) before its blocks, the final convolution after the final grid's blocks
POINTS_IN_ORDER = [
    ("vision.hook_embed", "V-emb", "vision.stages.0"),
    ("vision.stages.0.blocks.0.hook_resid_post", "stages.0.V0", "vision.stages.0"),
    ("vision.stages.3.hook_downsampled", "stages.3.downsampled", FINE),
    ("vision.stages.3.hook_pos_embed", "stages.3.pos_embed", FINE),
    ("vision.stages.3.blocks.1.hook_resid_post", "stages.3.V1", FINE),
    ("vision.stages.4.hook_downsampled", "stages.4.downsampled", "vision"),
    ("vision.stages.4.hook_pos_embed", "stages.4.pos_embed", "vision"),
    ("vision.blocks.1.hook_resid_post", "V1", "vision"),
    ("vision.hook_final_conv", "V-final_conv", "vision"),
]


def test_vision_points_outside_the_blocks_have_their_grid_place_and_own_label(eager):
    """Every entry and exit point of the tower (given in reverse) sorts into pipeline order, each with a
    label naming it and the grid it is computed on; each reads there row for row."""
    model = eager.model
    hooks = [hook for hook, _, _ in POINTS_IN_ORDER]
    sites = default_sites(model, hooks[::-1])
    assert [(s.hook, s.label, s.grid) for s in sites] == POINTS_IN_ORDER
    assert [s.layer for s in sites] == [-1, 0, -1, -1, 1, -1, -1, 1, 2]  # entries before the blocks, the exit after
    inputs = eager.inputs
    _, cache = model.run_with_cache(inputs, names_filter=hooks)
    for site in sites:
        features = gather_image_tokens(site, cache[site.hook], inputs.layout)
        assert torch.equal(features, cache[site.hook]), site.hook  # one image row per image, raster order


def test_vision_and_default_sweeps_probe_every_grid_in_pipeline_order(eager):
    """`sites="vision"` and the default `"all"` run (the stem on its first stage's grid): every row on the
    grid its activation is on, vision sites in pipeline order, then the adapter and the LLM."""
    model = eager.model
    scenes = load_segmentation("scenes", split="validation", n=12, seed=0, image_size=64)
    vision = [("V-emb", "vision.stages.0"), ("stages.0.V0", "vision.stages.0"), ("stages.1.V0", "vision.stages.1"),
              ("stages.2.V0", "vision.stages.2"), ("stages.3.V0", FINE), ("stages.3.V1", FINE), ("V0", "vision"),
              ("V1", "vision")]
    assert [(s.label, s.grid) for s in default_sites(model, "vision")] == vision
    for sites, expected in (("vision", vision), ("all", vision + [("A-in", "llm"), ("A-hidden", "llm"), ("A-out", "llm"),
                                                                  ("L0", "llm"), ("L1", "llm")])):
        sweep = probe_sweep(model, scenes, sites=sites, probe="ridge", progress=False, alpha=1e-2)
        rows = sweep.table[sweep.table.condition == "model"].sort_values("depth")
        assert list(zip(rows.site, rows.grid)) == expected, sites
        assert np.isfinite(rows.miou).all()
    stem = rows[rows.site == "V-emb"]
    assert float(stem.ceiling.iloc[0]) == sweep.ceilings["vision.stages.0"].miou  # scored on the 4 px cells


def test_an_llm_sweep_labels_no_stage_grid_and_scores_the_same(eager, monkeypatch):
    """Batches label only the grids the sweep's sites read: an LLM-only sweep labels none of the finer
    stages' grids (each many labels per token at full size), and scores exactly as with every grid labelled."""
    from mmlens.probing import batches

    model = eager.model
    scenes = load_segmentation("scenes", split="validation", n=12, seed=0, image_size=64)
    labelled, original = [], batches.labelled_batches

    def recording(*args, every_grid=False, **kwargs):
        if every_grid:
            kwargs["vision_grids"] = None
        for batch in original(*args, **kwargs):
            labelled.append(set(batch.labels))
            yield batch

    settings = dict(sites=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], probe="ridge", progress=False,
                    alpha=1e-2)
    monkeypatch.setattr(batches, "labelled_batches", recording)
    lean = probe_sweep(model, scenes, **settings).table
    assert labelled and all(keys == {"vision", "llm"} for keys in labelled)
    labelled.clear()
    monkeypatch.setattr(batches, "labelled_batches", lambda *a, **k: recording(*a, every_grid=True, **k))
    full = probe_sweep(model, scenes, **settings).table
    assert all(keys == {"vision", "llm", *model.architecture.vision_grid_prefixes} for keys in labelled)
    assert lean.equals(full)


@torch.no_grad()
def test_stages_that_do_not_exist_or_points_off_their_grid_are_refused(eager):
    """A stage past the tower's is refused with the closest names; an attention stage's pattern (per query
    and key) is refused naming what the stage's grid reads; a finer activation read as the final grid is
    refused naming its grid and pointing at `layout.on_grid`; final-grid points gather."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs, names_filter=[f"{FINE}.blocks.1.hook_resid_post", "vision.hook_embed",
                                                          "vision.stages.4.hook_pos_embed"])
    layout = inputs.layout
    with pytest.raises(LayoutMismatchError, match=rf"8x8 grid of {FINE}\.\*.*layout\.on_grid\('{FINE}'\).*covers 2x2"):
        layout.gather("vision", cache[f"{FINE}.blocks.1.hook_resid_post"])
    with pytest.raises(LayoutMismatchError, match=r"16x16 grid of vision\.hook_embed and vision\.stages\.0\.\* and "
                       r"vision\.stages\.1\.\* and vision\.stages\.2\.\* \(4 px cells\)"):
        layout.gather("vision", cache["vision.hook_embed"])
    assert layout.gather("vision", cache["vision.stages.4.hook_pos_embed"]).shape == (3, 16, 64)
    with pytest.raises(LayoutMismatchError, match=r"no grid 'vision\.stages\.9'.*Closest: \['vision\.stages\.\d'"):
        layout.on_grid("vision.stages.9")
    scenes = load_segmentation("scenes", split="validation", n=8, seed=0, image_size=64)
    settings = dict(probe="ridge", progress=False, alpha=1e-2)
    with pytest.raises(HookNameError, match=r"Closest: \['vision\.stages\.\d\.blocks\.0\.hook_resid_post'"):
        probe_sweep(model, scenes, sites=["vision.stages.7.blocks.0.hook_resid_post"], **settings)
    with pytest.raises(LayoutMismatchError, match=rf"not on the 8x8 grid of {FINE}\.\*.*patterns are per query and key"):
        probe_sweep(model, scenes, sites=[f"{FINE}.blocks.0.attn.hook_pattern"], **settings)


def test_a_wrong_tower_spec_is_refused_at_load(monkeypatch):
    """A tower attention spec with the wrong scale leaves plain logits exact; loading names the block."""
    monkeypatch.setattr(fastvit, "ATTENTION", replace(fastvit.ATTENTION, scaling="head_dim"))
    hf_model, processor = tiny_fast_vlm()
    with pytest.raises(UnsupportedModelError, match=r"vision\.stages\.3\.blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


@pytest.mark.parametrize("part, field, value", [("vision_config", "architecture", "fastvit_sa12"),
                                                ("text_config", "model_type", "llama")])
def test_towers_and_llms_outside_the_family_are_refused_by_name(part, field, value):
    """A config naming another timm tower or another LLM is refused at load, naming the field and what is supported."""
    hf_model, processor = tiny_fast_vlm()
    setattr(getattr(hf_model.config, part), field, value)
    with pytest.raises(UnsupportedModelError, match=rf"config\.{part}\.{field} = '{value}' .*supported: \['(fastvit_mci3|qwen2)'\]"):
        HookedMLLM.from_hf(hf_model, processor)


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=64)
    # the sweep's table must hold the first attention stage's site, probed on its own 8x8 grid
    tier.every_analysis_runs(eager.model, scenes, extra_sites=(f"{FINE}.blocks.1.hook_resid_post",))
