"""DeepSeek-VL hybrid: SigLIP (`vision.*`) and SAM (`vision.high_res.*`) towers -> the two-tower
aligner -> Llama on DeepSeek-VL's fixed grid, each image at two resolutions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.data.schema import segmentation_info
from mmlens.errors import HookNameError, InputError, LayoutMismatchError, UnsupportedModelError
from mmlens.interventions import CacheMetric, Patch, Run, patch_conditions
from mmlens.model.architectures.deepseek_vl_hybrid import sam_tower
from mmlens.probing import probe_sweep
from mmlens.probing.batches import labelled_batches
from mmlens.probing.sites import gather_image_tokens, site_for
from mmlens.probing.token_labels import token_labels
from mmlens.testing.families.deepseek_vl_hybrid import tiny_deepseek_vl_hybrid

import family_tier as tier
from conftest import random_images
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"deepseek_vl_hybrid": lambda attn: tiny_deepseek_vl_hybrid(attn_implementation=attn)})

SAM = "vision.high_res"


@torch.no_grad()
def test_sam_blocks_and_their_per_window_patterns_equal_hf(eager):
    """Each SAM block's `hook_resid_post` is Hugging Face's hidden state, flattened; `hook_pattern` is
    its attention weights, per window in windowed blocks ([images x 9 windows, head, 9, 9]: the 8x8
    grid padded to 9x9 in 3x3 windows) and over the whole grid in the global block; `hook_attn_scores`
    is q.k scaled plus `hook_rel_pos`."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    high_res = inputs.extra["high_res_pixel_values"]
    theirs = reference.model.high_res_vision_model(high_res, output_hidden_states=True, output_attentions=True)
    _, cache = model.run_with_cache(inputs, names_filter=lambda name: name.startswith(SAM))
    n_images, heads = high_res.shape[0], 4
    for layer in range(3):
        torch.testing.assert_close(cache[f"{SAM}.blocks.{layer}.hook_resid_post"],
                                   theirs.hidden_states[layer + 1].flatten(1, 2), atol=1e-5, rtol=0)
        pattern = cache[f"{SAM}.blocks.{layer}.attn.hook_pattern"]
        windows, positions = (n_images, 64) if layer == 1 else (n_images * 9, 9)
        assert pattern.shape == (windows, heads, positions, positions)
        torch.testing.assert_close(pattern, theirs.attentions[layer].view_as(pattern), atol=1e-6, rtol=0)
        q, k = (cache[f"{SAM}.blocks.{layer}.attn.hook_{x}"].transpose(1, 2) for x in "qk")
        plain = q @ k.transpose(-2, -1) * (8 ** -0.5)
        torch.testing.assert_close(cache[f"{SAM}.blocks.{layer}.attn.hook_attn_scores"],
                                   plain + cache[f"{SAM}.blocks.{layer}.attn.hook_rel_pos"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_zeroing_rel_pos_equals_hf_without_relative_positions(eager):
    """`hook_rel_pos` is the whole relative-position term: zeroing it in block 0 equals Hugging Face
    with that block's rel_pos_h / rel_pos_w zeroed, and changes the logits."""
    model, inputs = eager.model, eager.inputs
    ours = model.run_with_hooks(inputs, fwd_hooks=[(f"{SAM}.blocks.0.attn.hook_rel_pos", lambda x, hook: x * 0)])
    edited = copy.deepcopy(eager.reference)
    attention = edited.model.high_res_vision_model.vision_encoder.layers[0].attn
    attention.rel_pos_h.zero_()
    attention.rel_pos_w.zero_()
    theirs = edited(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4


@torch.no_grad()
def test_both_paths_to_the_aligner_and_its_per_tower_points(eager):
    """SAM's neck on the last block, the hybrid's neck on the global block, each resized and
    downsampled to the 4x4 grid, mixed by alpha: `adapter.hook_in_high_res` is what Hugging Face's
    aligner reads from SAM, `adapter.hook_in` what it reads from SigLIP; the aligner's per-tower
    projections, concatenated high-res first, pass GELU into `hook_hidden`."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    hf = reference.model
    high_res = inputs.extra["high_res_pixel_values"]
    sam = hf.high_res_vision_model(high_res, output_hidden_states=True)
    global_neck = hf.high_res_vision_neck(sam.hidden_states[hf.global_attn_index + 1])
    mixed = hf.get_high_res_image_features(high_res).last_hidden_state
    siglip = hf.vision_model(inputs.pixel_values).last_hidden_state
    aligner = hf.aligner
    low, high = aligner.vision_proj(siglip), aligner.high_res_vision_proj(mixed)
    expected = {
        f"{SAM}.hook_neck_out": sam.last_hidden_state.flatten(2).transpose(1, 2),
        f"{SAM}.hook_proj_out": hf.high_res_vision_proj(sam.last_hidden_state).flatten(2).transpose(1, 2),
        f"{SAM}.hook_global_neck_out": global_neck.flatten(2).transpose(1, 2),
        f"{SAM}.hook_global_scaled":
            (hf.high_res_vision_proj(global_neck) * hf.high_res_vision_alpha).flatten(2).transpose(1, 2),
        "adapter.hook_in": siglip, "adapter.hook_in_high_res": mixed,
        "adapter.hook_low_res_proj": low, "adapter.hook_high_res_proj": high,
        "adapter.hook_hidden": aligner.act(torch.cat([high, low], dim=-1)), "adapter.hook_out": aligner(siglip, mixed),
    }
    _, cache = model.run_with_cache(inputs, names_filter=list(expected))
    for name, activation in expected.items():
        torch.testing.assert_close(cache[name], activation, atol=1e-5, rtol=0, msg=name)
    assert cache["adapter.hook_in_high_res"].shape == (3, 16, 32) and model.cfg.adapter.token_grid == (4, 4)


@torch.no_grad()
def test_cutting_the_global_path_equals_hf_with_alpha_zero(eager):
    """Zeroing `hook_global_scaled` removes the global-attention block's path: Hugging Face with
    `high_res_vision_alpha` = 0."""
    model, inputs = eager.model, eager.inputs
    ours = model.run_with_hooks(inputs, fwd_hooks=[(f"{SAM}.hook_global_scaled", lambda x, hook: x * 0)])
    edited = copy.deepcopy(eager.reference)
    edited.model.high_res_vision_alpha.zero_()
    theirs = edited(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4


def test_two_resolutions_follow_the_processor(eager):
    """The geometry gives the processor's `pixel_values` (the 64 px square resized to 32) and, as
    `geometry.high_res`, its `high_res_pixel_values`; a wide mask's padding is `ignore_index` on both
    canvases, at the same fraction of the image."""
    geometry, processor = eager.model.geometry, eager.model.processor
    image = random_images(1)[0]  # 40 x 50 (height x width)
    batch = processor.image_processor(images=[image], return_tensors="pt")
    torch.testing.assert_close(geometry.to_pixel_values(image)[0], batch["pixel_values"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(geometry.high_res.to_pixel_values(image)[0], batch["high_res_pixel_values"][0],
                               atol=1e-5, rtol=0)
    mask = np.ones((40, 50), dtype=np.uint8)
    for labels, side, pad in ((geometry.high_res.transform_mask(mask), 64, 6), (geometry.transform_mask(mask), 32, 3)):
        rows = np.flatnonzero((labels == 1).any(axis=1))
        assert labels.shape == (side, side) and rows[0] == pad and (labels[:pad] == 255).all()


def test_the_high_res_grid_places_sam_patches_on_the_llm_grid(eager):
    """SAM's 8x8 patches tile the 64 px canvas; each LLM token of the 4x4 grid gets the 2x2 patches
    whose centres lie in its box, the same fraction of both canvases."""
    model, inputs = eager.model, eager.inputs
    grid = model.architecture.high_res_grid
    assert grid.patches.shape == (8, 8) and grid.canvas == (64, 64)
    cover = torch.zeros(64, 64, dtype=torch.long)
    for y0, x0, y1, x1 in grid.patches.boxes.tolist():
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    assert torch.equal(torch.bincount(grid.patch_to_token, minlength=16), torch.full((16,), 4))
    token_boxes = inputs.layout.token_grid.boxes * 2  # the 32 px canvas's boxes on the 64 px one
    for patch, token in enumerate(grid.patch_to_token.tolist()):
        y0, x0, y1, x1 = grid.patches.boxes[patch].tolist()
        ty0, tx0, ty1, tx1 = token_boxes[token].tolist()
        assert ty0 <= y0 and y1 <= ty1 and tx0 <= x0 and x1 <= tx1


@torch.no_grad()
def test_a_vision_knockout_edits_siglip_and_leaves_sam_alone(eager):
    """`knockout(stage="vision")` blocks edges in SigLIP's blocks (the layout's vision grid): SAM's
    tower, whose windows already keep a query from keys outside them, computes what it computed."""
    model, inputs = eager.model, eager.inputs
    names = ["adapter.hook_in", "adapter.hook_in_high_res", f"{SAM}.blocks.2.hook_resid_post"]
    _, clean = model.run_with_cache(inputs, names_filter=names)
    ko, _ = tier.verified_vision_knockout(model, inputs)
    with ko:
        _, edited = model.run_with_cache(inputs, names_filter=names)
    assert (edited["adapter.hook_in"] - clean["adapter.hook_in"]).abs().max() > 1e-4
    for name in names[1:]:
        assert torch.equal(edited[name], clean[name]), name


@torch.no_grad()
def test_patching_sam_points_in_one_forward_equals_hooks_by_hand(eager):
    """Activation patching from a clean run into one with other images, at SAM points whose leading dim
    is not the image (a windowed block's pattern: images x windows) as well as at per-image ones, all
    conditions batched into one forward, equals a hand-written hook per condition."""
    model, clean = eager.model, eager.inputs
    corrupt = model.prepare(random_images(6)[3:], list(tier.PROMPTS[:3]))
    last = "blocks.1.hook_resid_post"
    metric = CacheMetric(lambda acts, inp: acts[last][:, -1].norm(dim=-1), [last])
    names = [f"{SAM}.blocks.0.attn.hook_pattern", f"{SAM}.hook_global_scaled", f"{SAM}.blocks.2.hook_resid_post"]
    batched = patch_conditions(model, Run(clean), Run(corrupt), metric, [Patch(n) for n in names], chunk_size=3)
    _, source = model.run_with_cache(clean, names_filter=names)
    for name, effect in zip(names, batched):
        read = {}
        model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda x, hook: source[hook.name]),
                                                 (last, lambda x, hook: read.__setitem__(last, x))])
        torch.testing.assert_close(effect, metric(read, corrupt), atol=1e-5, rtol=1e-5)
    assert (batched - metric({last: model.run_with_cache(corrupt, names_filter=[last])[1][last]}, corrupt)).abs().max() > 1e-4


@torch.no_grad()
def test_sam_sites_give_the_probe_hf_hidden_states_row_for_row(eager):
    """What a probe on a SAM point reads, per image and patch in raster order: Hugging Face's hidden
    state, and its `qkv` projection's query channels, which a windowed block (0) computes per window
    (9 windows of the 8x8 grid padded to 9x9), put back on the grid by Hugging Face's own
    `window_unpartition` (padding dropped), and a global block (1) computes on the whole grid."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    tower = reference.model.high_res_vision_model
    high_res = inputs.extra["high_res_pixel_values"]
    queries = {}
    handles = [layer.attn.qkv.register_forward_hook(lambda m, a, out, i=i: queries.__setitem__(i, out))
               for i, layer in enumerate(tower.vision_encoder.layers[:2])]
    try:
        theirs = tower(high_res, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    names = [f"{SAM}.blocks.{i}.{point}" for i in (0, 1) for point in ("hook_resid_post", "attn.hook_q")]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    layers, d_model = tower.vision_encoder.layers, high_res_width(model)
    for layer in (0, 1):
        q = queries[layer][..., :d_model]  # qkv's channels are (q, k, v) x head x d_head
        if layers[layer].window_size:
            assert q.shape[0] == 3 * 9  # per window
            q = layers[layer].window_unpartition(q, layers[layer].window_size, (9, 9), (8, 8))
        expected = {f"{SAM}.blocks.{layer}.hook_resid_post": theirs.hidden_states[layer + 1].flatten(1, 2),
                    f"{SAM}.blocks.{layer}.attn.hook_q": q.flatten(1, 2)}
        for name, by_hand in expected.items():
            features = gather_image_tokens(site_for(model, name), cache[name], inputs.layout)
            assert features.shape == (3, 64, d_model)
            torch.testing.assert_close(features, by_hand, atol=1e-5, rtol=0, msg=name)


def high_res_width(model) -> int:
    return model.hf_model.config.high_res_vision_config.hidden_size


def test_sam_patches_are_labelled_on_the_high_res_canvas_in_probing_batches(eager):
    """The probing batches label SAM's grid from each mask carried onto the high-res canvas (not its
    downsampled copy on SigLIP's): the labels of `token_labels` on `geometry.high_res` by hand."""
    model = eager.model
    scenes = load_segmentation("scenes", split="validation", n=4, seed=0, image_size=32)
    (batch,) = labelled_batches(model, scenes, range(4), batch_size=4)
    masks = np.stack([model.geometry.high_res.transform_mask(np.asarray(scenes[i]["mask"])) for i in range(4)])
    by_hand = token_labels(masks, model.architecture.high_res_grid.patches,
                           n_classes=len(segmentation_info(scenes).class_names))
    ours = batch.labels[SAM]
    assert ours.labels.shape == (4, 64) and torch.equal(ours.labels, by_hand.labels)
    assert torch.equal(ours.valid, by_hand.valid) and ours.valid.any()
    assert len(torch.unique(ours.labels[ours.valid])) > 1  # objects and background: the comparison has teeth


def test_a_sweep_over_both_towers_runs_end_to_end(eager):
    """`sites="all"` probes SAM's blocks beside SigLIP's, the adapter and the LLM, on one image split:
    a curve per grid in pipeline order, SAM's rows scored on its own 8x8 grid (and ceiling), and its
    held-out predictions the fitted probe's on SAM's features read by hand."""
    model = eager.model
    scenes = load_segmentation("scenes", split="validation", n=12, seed=0, image_size=32)
    sweep = probe_sweep(model, scenes, sites="all", probe="ridge", progress=False, alpha=1e-2)
    rows = sweep.table[sweep.table.condition == "model"].sort_values("depth")
    sam_hooks = [f"{SAM}.hook_embed"] + [f"{SAM}.blocks.{i}.hook_resid_post" for i in range(3)]
    curves = {grid: list(part.hook) for grid, part in rows.groupby("grid", sort=False)}
    assert list(curves) == ["vision", SAM, "llm"] and curves[SAM] == sam_hooks
    assert list(rows.stage) == sorted(rows.stage, key=["vision", "adapter", "llm"].index)
    assert list(rows[rows.grid == SAM].site) == ["high_res.V-emb", "high_res.V0", "high_res.V1", "high_res.V2"]
    assert np.isfinite(rows.miou).all() and set(sweep.grids) == {"vision", "llm", SAM}
    assert rows[rows.grid == SAM].ceiling.nunique() == 1 and sweep.ceilings[SAM].miou != sweep.ceilings["vision"].miou
    test_images = [scenes[int(i)]["image"] for i in sweep.test_indices]
    inputs = model.prepare(test_images, "")
    hook = sam_hooks[2]
    _, cache = model.run_with_cache(inputs, names_filter=[hook])
    features = gather_image_tokens(site_for(model, hook), cache[hook], inputs.layout)
    by_hand = sweep.probe(hook).predict(features.flatten(0, 1).float()).view(len(test_images), 64)
    assert torch.equal(sweep.predictions[("model", hook)].long(), by_hand.long())


def test_a_sam_site_that_does_not_exist_or_is_not_on_its_grid_is_refused(eager):
    """A SAM block past the tower's 3 is refused with the closest names; a windowed block's pattern (per
    query and key, not per patch) is refused naming what SAM's grid reads; a SAM activation read as
    SigLIP's vision stage is refused pointing at SAM's own grid."""
    name = f"{SAM}.blocks.0.hook_resid_post"
    _, cache = eager.model.run_with_cache(eager.inputs, names_filter=[name])
    with pytest.raises(LayoutMismatchError, match=r"SAM's high-res tower .*layout\.on_grid\('vision\.high_res'\)"):
        eager.inputs.layout.gather("vision", cache[name])
    with pytest.raises(LayoutMismatchError, match=r"no grid 'vision\.high_rez'.*Closest: \['vision\.high_res'"):
        eager.inputs.layout.on_grid("vision.high_rez")
    scenes = load_segmentation("scenes", split="validation", n=8, seed=0, image_size=32)
    settings = dict(probe="ridge", progress=False, alpha=1e-2)
    with pytest.raises(HookNameError, match=rf"Closest: \['{SAM}\.blocks\.2\.hook_resid_post'"):
        probe_sweep(eager.model, scenes, sites=[f"{SAM}.blocks.7.hook_resid_post"], **settings)
    with pytest.raises(LayoutMismatchError, match=r"not on SAM's 8x8 patch grid.*per window \[\d+, 9, \.\.\.\]"):
        probe_sweep(eager.model, scenes, sites=[f"{SAM}.blocks.0.attn.hook_pattern"], **settings)


def test_sam_patches_are_labelled_from_the_high_res_canvas(eager):
    """The probing labeller takes SAM's patch grid as its pixel map: a mask carried onto the high-res
    canvas labels each SAM patch, and a patch's label is that of the LLM token it lies in (a mask
    whose class edges fall on token edges); a wide image's padding leaves the patches over it invalid."""
    model = eager.model
    geometry, grid = model.geometry, model.architecture.high_res_grid
    square = np.zeros((48, 48), dtype=np.uint8)
    square[:24, 24:] = 1  # the top-right quarter
    sam = token_labels(geometry.high_res.transform_mask(square)[None], grid.patches, n_classes=2)
    llm = token_labels(geometry.transform_mask(square)[None], model.prepare(random_images(1), "").layout, n_classes=2)
    assert sam.valid.all() and int(sam.labels.sum()) == 16 and int(llm.labels.sum()) == 4
    assert torch.equal(sam.labels[0], llm.labels[0][grid.patch_to_token])
    wide = token_labels(geometry.high_res.transform_mask(np.ones((30, 60), dtype=np.uint8))[None], grid.patches,
                        n_classes=2)
    rows = wide.valid[0].view(8, 8).all(dim=1)
    assert rows.tolist() == [False] * 2 + [True] * 4 + [False] * 2  # 32 of the 64 rows are image, centred


def test_a_sam_block_spec_that_drops_relative_positions_is_refused(monkeypatch):
    """Spec verification covers SAM's blocks: attention maths without the relative positions is
    refused at load, naming the block."""
    real = sam_tower._attention

    def without_relative_positions(attn, hooks, use_result):
        plain = copy.copy(attn)
        plain.use_rel_pos = False
        return real(plain, hooks, use_result)

    monkeypatch.setattr(sam_tower, "_attention", without_relative_positions)
    hf_model, processor = tiny_deepseek_vl_hybrid()
    with pytest.raises(UnsupportedModelError, match=r"vision\.high_res\.blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


def test_a_high_res_tower_outside_the_family_is_refused_by_name():
    """A config whose high-res tower is not SAM is refused at load, naming the config field."""
    hf_model, processor = tiny_deepseek_vl_hybrid()
    hf_model.config.high_res_vision_config.model_type = "siglip_vision_model"
    with pytest.raises(UnsupportedModelError, match="high_res_vision_config.model_type = 'siglip_vision_model'"):
        HookedMLLM.from_hf(hf_model, processor)


def test_missing_or_misshapen_high_res_pixels_are_refused(eager):
    model, inputs = eager.model, eager.inputs
    keywords = inputs.hf_kwargs()
    with pytest.raises(InputError, match="high_res_pixel_values: .* 64 x 64"):
        model({k: v for k, v in keywords.items() if k != "high_res_pixel_values"})
    with pytest.raises(InputError, match=r"got shape \(3, 3, 32, 32\)"):
        model({**keywords, "high_res_pixel_values": keywords["pixel_values"]})


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    # the sweep's table must hold SAM's site, probed on its own grid, beside the others
    tier.every_analysis_runs(eager.model, scenes, extra_sites=(f"{SAM}.blocks.1.hook_resid_post",))
