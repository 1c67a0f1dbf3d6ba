"""Mistral 3: a Pixtral tower (native resolution, one packed sequence with a block-diagonal mask, 2-D
rotary with `unsqueeze_dim=0`), the 2x2 patch merger, and image rows closed by `[IMG_BREAK]` /
`[IMG_END]`, so image tokens are not one contiguous run."""

from __future__ import annotations

import copy
import importlib.util
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers.models.pixtral import modeling_pixtral
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError, LayoutMismatchError, UnsupportedModelError
from mmlens.model.architectures import architecture_for
from mmlens.model.architectures.mistral3.layout import mistral3_layout
from mmlens.model.runtime.instrument import AttentionSpec
from mmlens.testing_families import tiny_mistral3

import family_tier as tier
from conftest import random_images
from family_tier import assert_bridge_aliases, verified_vision_knockout
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"mistral3": lambda attn: tiny_mistral3(attn_implementation=attn)})


def per_image_blocks(inputs) -> torch.Tensor:
    """[n_patches, n_patches]: True where two packed patches belong to the same image."""
    image = inputs.layout.image_of_patch()[0]
    return image[:, None] == image[None, :]


@torch.no_grad()
def test_cache_equals_hf_hidden_states(eager):
    """LLM residuals = HF hidden states, vision residuals = the tower's (packed, raster per image),
    the adapter's output = HF's image features, and what the merger made is what the LLM got."""
    tier.test_cache_equals_hf_hidden_states(eager)
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    _, cache = model.run_with_cache(inputs)
    with pytest.raises(InputError, match="own resolution"):
        model.run_vision(inputs.pixel_values)
    sizes = inputs.extra["image_sizes"]
    tower = reference.model.vision_tower(inputs.pixel_values, image_sizes=sizes, output_hidden_states=True)
    for block in range(model.cfg.vision.n_layers):
        torch.testing.assert_close(cache[f"vision.blocks.{block}.hook_resid_post"], tower.hidden_states[block + 1],
                                   atol=1e-5, rtol=0)
    features = torch.cat(reference.model.get_image_features(inputs.pixel_values, sizes).pooler_output)
    torch.testing.assert_close(cache["adapter.hook_out"][0], features, atol=1e-5, rtol=0)


def test_layout_contract(eager):
    """The tier's contract, and Mistral 3's own: each image's token rows are closed by
    `[IMG_BREAK]`, the last by `[IMG_END]` (specials outside the grid and outside the image's
    attention block), each token is fed by its 2x2 patches, and the images have different grids."""
    tier.test_layout_contract(eager)
    model, inputs = eager.model, eager.inputs
    layout, ids = inputs.layout, inputs.input_ids.cpu()
    processor = model.processor
    assert len({tuple(span.segments[0].tokens.shape) for span in layout.spans}) == 3, "three grids in the batch"
    for span in layout.spans:
        (segment,) = span.segments
        rows, cols = segment.tokens.shape
        h, w = inputs.extra["image_sizes"][span.image_index].tolist()
        assert span.canvas == (h, w) and (rows, cols) == (h // 8, w // 8)
        assert set(span.special) == {"row_break", "end"} and len(span.special["row_break"]) == rows - 1
        assert (ids[span.row, span.special["row_break"]] == processor.image_break_token_id).all()
        assert int(ids[span.row, span.special["end"]]) == processor.image_end_token_id
        # row r's tokens, then its break: the grid's raster order is the sequence order, one gap per row
        grid = segment.positions.view(rows, cols)
        assert torch.equal(grid[:, -1] + 1, torch.cat([span.special["row_break"], span.special["end"]]))
        assert torch.equal(span.block_positions, segment.positions), "breaks and end are not the image's block"
        assert torch.equal(torch.bincount(segment.patch_to_token), torch.full((len(segment.tokens),), 4))
        token_box = segment.tokens.boxes[segment.patch_to_token]
        patch_box = segment.patches.boxes
        assert ((patch_box[:, :2] >= token_box[:, :2]) & (patch_box[:, 2:] <= token_box[:, 2:])).all()


def test_layout_refuses_rows_without_their_breaks():
    """A run of image tokens that is not rows closed by one token each is refused, as are break
    or end tokens that are not the processor's, and counts that do not match `image_sizes`."""
    image, brk, end, text = 9, 7, 8, 1
    sizes = torch.tensor([[16, 24]])  # 2 x 3 tokens with 4-pixel patches and 2x2 merges
    good = [text] + [image] * 3 + [brk] + [image] * 3 + [end] + [text]
    layout = mistral3_layout(torch.tensor([good]), sizes, image_token_id=image, patch_size=4, merge=2,
                             break_token_id=brk, end_token_id=end)
    assert layout.spans[0].positions.tolist() == [1, 2, 3, 5, 6, 7] and layout.vision_shape == (1, 24)
    kwargs = dict(image_token_id=image, patch_size=4, merge=2, break_token_id=brk, end_token_id=end)
    with pytest.raises(LayoutMismatchError, match="not 2 rows of 3"):
        mistral3_layout(torch.tensor([[text] + [image] * 6 + [end, text, text]]), sizes, **kwargs)
    with pytest.raises(LayoutMismatchError, match="row_break"):
        mistral3_layout(torch.tensor([[text] + [image] * 3 + [text] + [image] * 3 + [end, text]]), sizes, **kwargs)
    with pytest.raises(LayoutMismatchError, match="image_sizes make 4"):
        mistral3_layout(torch.tensor([good]), torch.tensor([[16, 16]]), **kwargs)


@contextmanager
def tower_mask(allowed: torch.Tensor):
    """Hugging Face's Pixtral tower with `allowed` ([n_patches, n_patches]) as its attention mask
    in place of the block-diagonal one it builds."""
    original = modeling_pixtral.generate_block_attention_mask

    def masked(patch_counts, tensor):
        mask = torch.zeros(allowed.shape, dtype=tensor.dtype).masked_fill(~allowed, torch.finfo(tensor.dtype).min)
        return mask[None, None].to(tensor.device)

    modeling_pixtral.generate_block_attention_mask = masked
    try:
        yield
    finally:
        modeling_pixtral.generate_block_attention_mask = original


@torch.no_grad()
def test_vision_knockout_equals_hf_with_its_mask(eager):
    """A knockout in the packed tower = Hugging Face's tower with the blocked edges taken out of its
    own block-diagonal mask; the mask it reports is that one."""
    model, inputs = eager.model, eager.inputs
    ko, ours = verified_vision_knockout(model, inputs)
    allowed = per_image_blocks(inputs) & ~ko.blocked[0].cpu()
    with tower_mask(allowed):
        theirs = eager.reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4, "the knockout changed something"
    assert torch.equal(ko.effective_mask()[0].cpu(), allowed)


@torch.no_grad()
def test_vision_attention_stays_in_its_image(family):
    """The packed pattern (eager and sdpa) is exactly zero between images and positive inside each."""
    model, inputs = family.model, family.inputs
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith("vision.") and n.endswith("hook_pattern"))
    rule = per_image_blocks(inputs)
    n = rule.shape[0]
    for block in range(model.cfg.vision.n_layers):
        pattern = cache[f"vision.blocks.{block}.attn.hook_pattern"][0].cpu()
        assert pattern.shape == (model.cfg.vision.n_heads, n, n)
        assert (pattern[:, ~rule] == 0).all() and (pattern[:, rule] > 0).all()


@torch.no_grad()
def test_vision_gather_reads_raster_patches(eager):
    """`gather("vision")` puts each image's patches in raster order: the patch embeddings it returns
    are the convolution of the image's own pixels at those cells (the batch padding left out)."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs, names_filter="vision.hook_embed")
    gathered = inputs.layout.gather("vision", cache["vision.hook_embed"])
    conv = model.hf_model.model.vision_tower.patch_conv
    for k, span in enumerate(inputs.layout.spans):
        picture = model.architecture.image_pixels(inputs.pixel_values, span.image_index, **inputs.extra)
        own = conv(picture[None])[0]  # [d, h, w]
        r, c = span.segments[0].patches.cells.T
        torch.testing.assert_close(gathered[k, : len(r)], own[:, r, c].T, atol=1e-6, rtol=0)
        assert (gathered[k, len(r):] == 0).all()


def test_the_processor_is_pixtrals_without_torchvision(eager):
    """Prompts: per image, rows of `[IMG]` each closed by `[IMG_BREAK]`, the last by `[IMG_END]`,
    as many as `image_sizes` give; pixels: the PIL image processor's, padded to the batch; masks:
    the same resize onto each canvas."""
    model, inputs = eager.model, eager.inputs
    processor = model.processor
    tokens = processor.tokenizer.convert_ids_to_tokens
    images = random_images(3)
    alone = PixtralImageProcessorPil(size=processor.image_processor.size, patch_size=8)(images, return_tensors="pt")
    assert torch.equal(alone["image_sizes"], inputs.extra["image_sizes"].cpu())
    torch.testing.assert_close(alone["pixel_values"], inputs.pixel_values.cpu(), atol=0, rtol=0)
    for span in inputs.layout.spans:
        h, w = inputs.extra["image_sizes"][span.image_index].tolist()
        row = ["[IMG]"] * (w // 8)
        expected = [t for r in range(h // 8) for t in row + ["[IMG_BREAK]" if r < h // 8 - 1 else "[IMG_END]"]]
        start = int(span.positions[0])
        assert tokens(inputs.input_ids[span.row, start : start + len(expected)].tolist()) == expected
        image = images[span.image_index]
        assert model.transform_mask(np.zeros((image.height, image.width), dtype=np.uint8)).shape == span.canvas
        picture = model.architecture.image_pixels(inputs.pixel_values, span.image_index, **inputs.extra).cpu()
        torch.testing.assert_close(picture, model.geometry.to_pixel_values(image)[0],
                                   atol=1e-5, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="PixtralProcessor needs torchvision")
def test_the_processor_equals_hugging_faces_pixtral_processor(eager):  # pragma: no cover - needs torchvision
    from transformers import PixtralProcessor

    ours = eager.model.processor
    theirs = PixtralProcessor(image_processor=ours.image_processor, tokenizer=ours.tokenizer, patch_size=4,
                              spatial_merge_size=2)
    texts = ["[IMG] what is in the image ?", "[IMG] how many", "a [IMG] b"]
    a = ours(images=random_images(3), text=texts, padding=True, return_tensors="pt")
    b = theirs(images=random_images(3), text=texts, padding=True, return_tensors="pt")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tower_spec_without_its_packed_rotary_is_refused(builder, monkeypatch):
    """The tower's rotary tables are per packed position ([n, d_head]); a spec that unsqueezes them
    like the LLM's, or forgets them, is refused at load."""
    for attention, why in ((AttentionSpec(rotary=True), "forward fails"),
                           (AttentionSpec(rotary=False), r"vision\.blocks\.0 .*does not match its block spec")):
        hf_model, processor = builder()
        cls = type(architecture_for(hf_model))
        monkeypatch.setattr(cls, "vision_block", replace(cls.vision_block, attention=attention))
        with pytest.raises(UnsupportedModelError, match=why):
            HookedMLLM.from_hf(hf_model, processor)
    monkeypatch.undo()
    hf_model, processor = builder()
    hf_model.config.vision_feature_layer = [-1, -2]
    with pytest.raises(UnsupportedModelError, match="vision_feature_layer"):
        HookedMLLM.from_hf(hf_model, processor)


@torch.no_grad()
def test_two_images_in_one_row_and_bad_inputs(builder):
    """A prompt with two images of different sizes: two spans in its row, the first's end before the
    second's first token, and every hook active still gives Hugging Face's logits. Image sizes
    past the padded pixels, or whose token count differs from the placeholders', are refused."""
    hf_model, processor = builder()
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    a, b, c = random_images(3)
    inputs = model.prepare([[a, b], [c]], ["compare them", "what"])
    assert [[span.image_index for span in row] for row in inputs.layout.images] == [[0, 1], [2]]
    first, second = inputs.layout.images[0]
    assert first.segments[0].tokens.shape != second.segments[0].tokens.shape
    assert int(first.special["end"]) < int(second.positions[0])
    ours = model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, lambda x, hook: x.clone())])
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], reference(**inputs.hf_kwargs()).logits[valid], atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="own resolution"):
        model.run_vision(inputs.pixel_values)
    sizes = inputs.extra["image_sizes"]
    with pytest.raises(InputError, match="exceed the padded pixel_values"):
        model(replace(inputs, extra={"image_sizes": sizes * 2}))
    with pytest.raises(InputError, match="image_sizes make 39 image tokens but input_ids hold 51"):
        model(replace(inputs, extra={"image_sizes": sizes - torch.tensor([8, 0])}))


BRIDGE_NAMES = {
    "vision_encoder.hook_out": "vision.blocks.1.hook_resid_post",
    "vision_projector.hook_in": "vision.blocks.1.hook_resid_post",
    "vision_projector.hook_out": "adapter.hook_out",
    "embed.hook_out": "hook_embed",
    "blocks.1.hook_out": "blocks.1.hook_resid_post",
    "blocks.0.attn.hook_out": "blocks.0.hook_attn_out",
    "blocks.0.mlp.gate.hook_out": "blocks.0.mlp.hook_pre",
}


def test_bridge_hook_names_are_aliases(eager):
    """TransformerBridge wraps Mistral 3 as LLaVA with an opaque tower: its names resolve to ours."""
    model, inputs = eager.model, eager.inputs
    assert_bridge_aliases(model, inputs, BRIDGE_NAMES)


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    heads = tier.every_analysis_runs(eager.model, scenes)
    shown = heads.maps[0]  # a 32x32 scene is not resized: the recovery map shows it as it is
    original = np.asarray(scenes[shown.dataset_index]["image"], dtype=np.int64)
    assert shown.image.shape == original.shape and np.abs(shown.image - original).max() <= 1
