"""GLM-4V and GLM-4.6V (its dense LLM): Qwen2-VL's packed native-resolution layout and M-RoPE, a tower
with learned position embeddings, a downsampling convolution and SwiGLU merger as the adapter, and a
GLM-4 LLM with sandwich norms and a fused gate/up MLP. Qwen2-VL's own checks run here too, on these
fixtures; those that read Qwen's token names, resize rule or bare patch embeddings have GLM versions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import SizeDict

from mmlens import HookedMLLM
from mmlens.errors import UnsupportedModelError
from mmlens.model.architectures.glm4v import GLM4V_BLOCK, Glm4v
from mmlens.testing.families.glm4v import tiny_glm4v

import family_tier as tier
import test_qwen2_vl as qwen2
from conftest import random_images
from family_tier import assert_bridge_aliases
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

# Qwen2-VL's checks that read its token names, its resize rule, its tower's hidden states or bare patch
# embeddings have GLM versions below
_OWN = {"test_cache_equals_hf_hidden_states", "test_each_image_has_its_own_grid_and_mrope_cells",
        "test_masks_follow_the_resize_onto_each_canvas", "test_vision_gather_reads_raster_patches"}
globals().update({test.__name__: test for test in qwen2.QWEN_TESTS if test.__name__ not in _OWN})
family, eager, builder = tier.fixtures(
    {"glm4v": lambda attn: tiny_glm4v("4v", attn_implementation=attn),
     "glm46v": lambda attn: tiny_glm4v("4.6v", attn_implementation=attn)},
    eager_variants=["glm4v"],  # GLM-4.6V is GLM-4V's model under another class: parity, spec and refusals run on both
)


@torch.no_grad()
def test_cache_equals_hf_hidden_states(eager):
    """LLM residuals = HF hidden states, vision residuals = the outputs of HF's tower blocks (packed;
    HF's own `hidden_states` end with the downsampled tokens instead of the last block's), the
    adapter's output = HF's image features."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    _, cache = model.run_with_cache(inputs)
    ref = reference(**inputs.hf_kwargs(), output_hidden_states=True)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer], atol=1e-5, rtol=0)
    visual, grid = reference.model.visual, inputs.extra["image_grid_thw"]
    outputs = []
    handles = [block.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for block in visual.blocks]
    try:
        features = torch.cat(reference.model.get_image_features(inputs.pixel_values, grid).pooler_output)
    finally:
        for handle in handles:
            handle.remove()
    for block, theirs in enumerate(outputs):
        torch.testing.assert_close(cache[f"vision.blocks.{block}.hook_resid_post"][0], theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["adapter.hook_out"][0], features, atol=1e-5, rtol=0)


def test_each_image_has_its_own_grid_and_mrope_cells(eager):
    """Grids follow image_grid_thw (several sizes in the batch), `<|begin_of_image|>` /
    `<|end_of_image|>` sit outside them, and the M-RoPE rows and columns of an image's tokens are
    its grid cells."""
    model, inputs = eager.model, eager.inputs
    layout, config = inputs.layout, model.hf_model.config
    grid = inputs.extra["image_grid_thw"].cpu()
    assert len({tuple(span.segments[0].tokens.shape) for span in layout.spans}) > 1, "images of different sizes"
    positions = model.architecture.position_ids(inputs.hf_kwargs()).cpu()
    ids = inputs.input_ids.cpu()
    for span in layout.spans:
        (segment,) = span.segments
        _, h, w = grid[span.image_index].tolist()
        assert segment.tokens.shape == (h // 2, w // 2) and span.canvas == (h * 4, w * 4)
        assert int(ids[span.row, span.special["start"]]) == config.image_start_token_id
        assert int(ids[span.row, span.special["end"]]) == config.image_end_token_id
        t, row, col = positions[:, span.row, segment.positions]
        assert (t == t[0]).all()
        assert torch.equal(torch.stack([row - row[0], col - col[0]], dim=1), segment.tokens.cells)


@torch.no_grad()
def test_vision_embed_is_what_block_0_reads_in_raster_order(eager):
    """`vision.hook_embed` is the normalised patch embeddings plus the interpolated position
    embeddings, as Hugging Face's block 0 receives them; `gather("vision")` puts each image's patches
    in raster order (the processor packs them 2x2 group by 2x2 group)."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    _, cache = model.run_with_cache(inputs, names_filter="vision.hook_embed")
    visual = reference.model.visual
    received = []
    handle = visual.blocks[0].register_forward_pre_hook(lambda _m, args: received.append(args[0]))
    try:
        visual(inputs.pixel_values, grid_thw=inputs.extra["image_grid_thw"])
    finally:
        handle.remove()
    assert torch.equal(cache["vision.hook_embed"][0], received[0])
    assert (visual.patch_embed(inputs.pixel_values) - received[0]).abs().max() > 1e-3, "norm and positions added"
    gathered = inputs.layout.gather("vision", cache["vision.hook_embed"])
    offset = 0
    for k, span in enumerate(inputs.layout.spans):
        _, h, w = inputs.extra["image_grid_thw"][span.image_index].tolist()
        r, c = span.segments[0].patches.cells.T
        slot = ((r // 2) * (w // 2) + c // 2) * 4 + (r % 2) * 2 + c % 2
        assert torch.equal(gathered[k, : h * w], received[0][offset + slot])
        offset += h * w


@torch.no_grad()
def test_adapter_points_are_the_convolution_and_the_merger(eager):
    """`adapter.hook_in` is each token's 2x2 normalised patches (what the convolution folds),
    `hook_hidden` the convolution's output (Hugging Face's `last_hidden_state`), `hook_out` the
    merger's; an edit at `hook_in` reaches the LLM as the same edit of the tower's output does in
    Hugging Face."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    names = ["vision.ln_post.hook_normalized", "adapter.hook_in", "adapter.hook_hidden", "adapter.hook_out"]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    visual = reference.model.visual
    tower = visual(inputs.pixel_values, grid_thw=inputs.extra["image_grid_thw"])
    d = model.cfg.vision.d_model
    assert cache["adapter.hook_in"].shape == (1, cache["adapter.hook_out"].shape[1], 4 * d)
    torch.testing.assert_close(cache["adapter.hook_in"].reshape(1, -1, d), cache["vision.ln_post.hook_normalized"],
                               atol=0, rtol=0)
    torch.testing.assert_close(cache["adapter.hook_hidden"][0], tower.last_hidden_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["adapter.hook_out"][0], tower.pooler_output, atol=1e-6, rtol=0)

    def zero_first_token(x, hook):
        x = x.clone()
        x[:, 0] = 0
        return x

    ours = model.run_with_hooks(inputs, fwd_hooks=[("adapter.hook_in", zero_first_token)])
    # the first token's 2x2 patches are the packed sequence's first four rows
    zero_its_patches = lambda _m, _a, out: torch.cat([torch.zeros_like(out[:4]), out[4:]])  # noqa: E731
    handle = visual.post_layernorm.register_forward_hook(zero_its_patches)
    try:
        theirs = reference(**inputs.hf_kwargs()).logits
    finally:
        handle.remove()
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4


def test_masks_follow_the_resize_onto_each_canvas(eager):
    """`transform_mask` resizes a mask as the processor resizes its image (GLM's smart_resize over
    two frames, nearest): it lands on the canvas; the geometry's image is the processor's resize, and
    `image_pixels` reads that picture back out of the packed patches."""
    model, inputs = eager.model, eager.inputs
    processor = model.processor.image_processor
    for span, image in zip(inputs.layout.spans, random_images(3)):
        mask = np.zeros((image.height, image.width), dtype=np.uint8)
        assert model.transform_mask(mask).shape == span.canvas
        ours = np.asarray(model.geometry.transform_image(image), dtype=np.float32) / 255
        size = SizeDict(shortest_edge=processor.size["shortest_edge"], longest_edge=processor.size["longest_edge"])
        theirs = processor.resize(np.asarray(image).transpose(2, 0, 1), size=size, resample=processor.resample,
                                  factor=processor.patch_size * processor.merge_size,
                                  temporal_factor=processor.temporal_patch_size)
        np.testing.assert_allclose(ours.transpose(2, 0, 1), np.asarray(theirs, dtype=np.float32) / 255, atol=1 / 255)
        picture = model.architecture.image_pixels(inputs.pixel_values, span.image_index, **inputs.extra).cpu()
        mean, std = (torch.tensor(v)[:, None, None] for v in (processor.image_mean, processor.image_std))
        expected = (torch.from_numpy(ours.transpose(2, 0, 1).copy()) - mean) / std
        torch.testing.assert_close(picture, expected, atol=1.01 / 255 / min(processor.image_std), rtol=0)
    # GLM's rule, not Qwen2-VL's: a side shorter than 8 pixels is scaled up first (5x60 -> 8x96, Qwen: 8x64)
    thin = Image.new("RGB", (60, 5))
    assert model.transform_mask(np.zeros((5, 60), dtype=np.uint8)).shape == (8, 96)
    assert processor(thin, return_tensors="pt")["image_grid_thw"].tolist() == [[1, 2, 24]]


@torch.no_grad()
def test_the_fused_gate_up_mlp_is_split_into_its_halves(eager):
    """`W_gate` and `W_in` are views of the gate (first) and up (second) halves of `gate_up_proj`:
    they give the cached `hook_pre` / `hook_pre_linear` from the block's normalised input; zeroing
    one up neuron at `hook_pre_linear` equals Hugging Face with that row of `gate_up_proj` zeroed."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    names = ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_pre_linear"]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    mlp, fused = model.blocks[1].mlp, model.hf_model.model.language_model.layers[1].mlp.gate_up_proj
    d_mlp = model.cfg.d_mlp
    assert mlp.W_gate.shape == mlp.W_in.shape == (model.cfg.d_model, d_mlp)
    assert mlp.W_gate.data_ptr() == fused.weight.data_ptr() and mlp.W_in.data_ptr() == fused.weight[d_mlp].data_ptr()
    normed = cache[names[0]]
    torch.testing.assert_close(normed @ mlp.W_gate, cache[names[1]], atol=1e-5, rtol=0)
    torch.testing.assert_close(normed @ mlp.W_in, cache[names[2]], atol=1e-5, rtol=0)

    def zero_neuron(x, hook):
        x = x.clone()
        x[..., 3] = 0
        return x

    ours = model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.mlp.hook_pre_linear", zero_neuron)])
    reference.model.language_model.layers[1].mlp.gate_up_proj.weight[d_mlp + 3] = 0
    theirs = reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4


def test_a_spec_without_the_sandwich_norms_is_refused(builder, monkeypatch):
    """Forgetting the norms after the attention and MLP branches leaves plain logits exact; loading refuses it."""
    hf_model, processor = builder()
    monkeypatch.setattr(Glm4v, "llm_block", replace(GLM4V_BLOCK, post_norms=None))
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 \(Glm4vTextDecoderLayer\) does not match"):
        HookedMLLM.from_hf(hf_model, processor)


BRIDGE_NAMES = {
    "vision_projector.hook_in": "adapter.hook_hidden",
    "vision_projector.hook_out": "adapter.hook_out",
    "embed.hook_out": "hook_embed",
    "blocks.1.hook_in": "blocks.1.hook_resid_pre",
    "blocks.1.hook_out": "blocks.1.hook_resid_post",
    "blocks.0.ln1.hook_out": "blocks.0.ln1.hook_normalized",
    "blocks.0.ln1_post.hook_out": "blocks.0.ln1_post.hook_normalized",
    "blocks.0.ln2_post.hook_out": "blocks.0.ln2_post.hook_normalized",
    "blocks.0.mlp.gate.hook_out": "blocks.0.mlp.hook_pre",
    "blocks.0.mlp.in.hook_out": "blocks.0.mlp.hook_pre_linear",
    "blocks.0.mlp.out.hook_in": "blocks.0.mlp.hook_post",
}


def test_bridge_hook_names_are_aliases(eager):
    """TransformerLens 4.3's GLM-4V bridge names resolve to ours; its attention and MLP `hook_out`
    (the branches before the sandwich norms) have no counterpart and are refused, not mapped."""
    model, inputs = eager.model, eager.inputs
    assert_bridge_aliases(model, inputs, BRIDGE_NAMES)
    for name in ("blocks.0.attn.hook_out", "blocks.0.mlp.hook_out"):
        with pytest.raises(Exception, match="unknown hook name"):
            model.resolve_hook_name(name)
