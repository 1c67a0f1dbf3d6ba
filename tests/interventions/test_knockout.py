"""Token groups and attention knockout: every intervention proves it took effect."""

from __future__ import annotations

import pytest
import torch

from mmlens.interventions import GroupContext, TokenGroup, allowed_edges, knockout

from conftest import build_tiny, random_images

IMAGE = TokenGroup.image()


@torch.no_grad()
def test_llm_knockout_blocks_exactly_and_equals_hf_4d_mask(tiny):
    model, inputs = tiny.model, tiny.inputs
    layers = range(model.cfg.n_layers)
    ko = knockout(model, inputs, queries=IMAGE, keys=IMAGE, layers=layers, verify=True)
    with ko:
        ours = model(inputs)
    assert set(ko.blocked_mass) == set(layers) and all(m == 0.0 for m in ko.blocked_mass.values())
    assert ko.n_blocked_edges > 0
    allowed = allowed_edges(inputs.layout.image_of_position(), inputs.attention_mask, False)
    allowed &= ~ko.blocked.cpu()
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    theirs = tiny.reference(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - model(inputs)).abs().max() > 1e-4


@torch.no_grad()
def test_a_row_is_never_emptied(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    everything = TokenGroup.positions(range(inputs.input_ids.shape[1]))
    ko = knockout(model, inputs, queries=IMAGE, keys=everything, layers=[0], verify=True)
    with ko:
        logits = model(inputs)
    assert torch.isfinite(logits).all() and ko.blocked_mass[0] == 0.0
    assert not ko.blocked.diagonal(dim1=1, dim2=2).any(), "each query keeps itself"


@torch.no_grad()
def test_vision_knockout_blocks_every_head_and_layer(tiny):
    model, inputs = tiny.model, tiny.inputs
    layers = range(model.cfg.vision.n_layers)
    corner = TokenGroup.box(0, 0, 2, 2)
    ko = knockout(model, inputs, queries=IMAGE, keys=corner, layers=layers, stage="vision", verify=True)
    with ko:
        edited = model(inputs)
    assert all(m == 0.0 for m in ko.blocked_mass.values()) and len(ko.blocked_mass) == len(layers)
    assert ko.blocked.shape[0] == inputs.pixel_values.shape[0]
    assert (edited - model(inputs)).abs().max() > 1e-5


@torch.no_grad()
def test_head_subset_only_touches_those_heads(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    ko = knockout(model, inputs, queries=IMAGE, keys=IMAGE, layers=[1], heads=[2], verify=True)
    with ko:
        _, cache = model.run_with_cache(inputs, names_filter="blocks.1.attn.hook_pattern")
    _, plain = model.run_with_cache(inputs, names_filter="blocks.1.attn.hook_pattern")
    changed = (cache["blocks.1.attn.hook_pattern"] - plain["blocks.1.attn.hook_pattern"]).abs().amax(dim=(0, 2, 3))
    assert changed[2] > 0 and (changed[[0, 1, 3]] == 0).all()


def test_groups_resolve_with_padding_and_several_images():
    tiny = build_tiny("clip")
    images = random_images(3)
    inputs = tiny.model.prepare([[images[0], images[1]], [images[2]]], ["compare", "how many"])
    image = IMAGE.resolve(inputs)
    assert image.sum(1).tolist() == [32, 16]
    assert not (image & ~inputs.attention_mask.bool()).any()
    bos, last = TokenGroup.bos().resolve(inputs), TokenGroup.last().resolve(inputs)
    assert (inputs.input_ids[bos] == tiny.model.processor.tokenizer.bos_token_id).all()
    assert last[:, -1].all()  # left padding: the last token is the final position
    corner = TokenGroup.box(0, 0, 1, 1).resolve(inputs)
    starts = [s.positions[0].item() for s in inputs.layout.spans]
    assert corner.sum().item() == 3 and all(corner[s.row, p] for s, p in zip(inputs.layout.spans, starts))
    ring = TokenGroup.neighbours(TokenGroup.box(1, 1, 2, 2), radius=1).resolve(inputs)
    assert ring.sum().item() == 3 * 8
    text = TokenGroup.text().resolve(inputs)
    assert not (text & image).any() and ((text | image) == inputs.attention_mask.bool()).all()


def test_random_groups_are_reproducible_and_matched_in_size():
    tiny = build_tiny("clip")
    corner = TokenGroup.box(0, 0, 2, 2)
    a = TokenGroup.random_like(corner, seed=3).resolve(tiny.inputs)
    b = TokenGroup.random_like(corner, seed=3).resolve(tiny.inputs)
    c = TokenGroup.random_like(corner, seed=4).resolve(tiny.inputs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(1) == corner.resolve(tiny.inputs).sum(1)).all()
    assert not (a & corner.resolve(tiny.inputs)).any()


def test_class_groups_use_token_labels(tiny_clip):
    inputs = tiny_clip.inputs
    labels = torch.zeros(3, 16, dtype=torch.long)
    labels[1, :5] = 4
    group = TokenGroup.of_class(4).resolve(inputs, GroupContext(token_labels=labels))
    assert group.sum().item() == 5 and group[1, inputs.layout.positions(1)[:5]].all()


@torch.no_grad()
def test_effective_mask_is_where_attention_can_go(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    corner = TokenGroup.box(0, 0, 2, 2)
    ko = knockout(model, inputs, queries=IMAGE - corner, keys=corner, layers=[0], verify=True)
    with ko:
        _, cache = model.run_with_cache(inputs, names_filter="blocks.0.attn.hook_pattern")
    allowed = ko.effective_mask()
    own = allowed_edges(inputs.layout.image_of_position(), inputs.attention_mask, False)
    assert torch.equal(allowed, own & ~ko.blocked) and ko.blocked.any()
    reaches = cache["blocks.0.attn.hook_pattern"].sum(1) > 0
    real = inputs.attention_mask.bool()
    assert torch.equal(reaches[real], allowed[real]), "attention goes exactly where the mask allows"


def test_from_mask_and_multi_class_groups(tiny_clip):
    inputs = tiny_clip.inputs
    chosen = torch.zeros(inputs.input_ids.shape, dtype=torch.bool)
    chosen[1, inputs.layout.positions(1)[:3]] = True
    assert torch.equal(TokenGroup.from_mask(chosen).resolve(inputs), chosen)
    labels = torch.zeros(3, 16, dtype=torch.long)
    labels[0, :2], labels[2, 5] = 1, 2
    both = TokenGroup.of_class(1, 2).resolve(inputs, GroupContext(token_labels=labels))
    assert both.sum() == 3 and both[0].sum() == 2 and both[2].sum() == 1


@torch.no_grad()
def test_probe_groups_with_padding_and_several_images_per_row():
    from mmlens.probing import LinearProbe

    tiny = build_tiny("clip")
    model = tiny.model
    images = random_images(3)
    inputs = model.prepare([[images[0], images[1]], [images[2]]], ["compare the two", "how many"])
    d, n_classes = model.cfg.d_model, 3
    generator = torch.Generator().manual_seed(0)
    probe = LinearProbe(torch.zeros(d), torch.ones(d), torch.randn(d, n_classes, generator=generator), torch.zeros(n_classes))
    labels = torch.randint(0, n_classes, (3, 16), generator=generator)
    labels[1, :4] = 255  # unlabelled tokens belong to neither group
    context = GroupContext(token_labels=labels, model=model)
    hook = "blocks.1.hook_resid_post"
    right = TokenGroup.probe_correct(probe, hook).resolve(inputs, context)
    wrong = TokenGroup.probe_wrong(probe, hook).resolve(inputs, context)
    _, cache = model.run_with_cache(inputs, names_filter=hook)
    for k, span in enumerate(inputs.layout.spans):  # images in pixel_values order: (row 0, 0), (row 0, 1), (row 1, 0)
        predicted = probe.predict(cache[hook][span.row, span.positions])
        labelled = labels[k] != 255
        assert torch.equal(right[span.row, span.positions], (predicted == labels[k]) & labelled)
        assert torch.equal(wrong[span.row, span.positions], (predicted != labels[k]) & labelled)
    assert not ((right | wrong) & ~IMAGE.resolve(inputs)).any(), "only image tokens, never padding or text"
    assert (right | wrong).sum() == 3 * 16 - 4


@torch.no_grad()
def test_knockout_holds_during_cached_generation(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    ko = knockout(model, inputs, queries=TokenGroup.last(), keys=IMAGE, layers=range(model.cfg.n_layers), verify=True)
    plain = model.generate(inputs, max_new_tokens=3)
    with ko:
        edited = model.generate(inputs, max_new_tokens=3)
    assert all(m == 0.0 for m in ko.blocked_mass.values()) and len(edited) == len(plain)
    with ko:  # the prompt's last token never reads the image: its next-token logits match a run blocked by hand
        first = model(inputs)[:, -1]
    assert (first - model(inputs)[:, -1]).abs().max() > 1e-5
    other = model.prepare(random_images(3), ["a longer prompt than any of the three above", "b", "c"])
    with ko, pytest.raises(ValueError, match="build the knockout from the inputs you run"):
        model(other)
