"""Emu3: the VQ tokenizer's encoder hooked as the vision stage, its codes written into a Llama-style
LLM as token ids (a lookup adapter), on the code-grid layout: an image of h x w codes (8 px each)
fills h x (w + 1) placeholders, the last of every w + 1 the end-of-row token. The family tier runs
on it; the cache test is this family's own (its output has no image_hidden_states), and what the
argmin rules out (gradients before the codes) is refused by name."""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError, UnsupportedModelError
from mmlens.interventions import TokenGroup, knockout
from mmlens.model.images.layout import END_OF_ROW_KIND, CodeGridLayout
from mmlens.testing.families.emu3 import END_OF_ROW, tiny_emu3, visual_token

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

family, eager, builder = tier.fixtures({"emu3": lambda attn: tiny_emu3(attn_implementation=attn)})


def _hf_image_embeddings(eager) -> torch.Tensor:
    inputs = eager.inputs
    features = eager.reference.model.get_image_features(inputs.pixel_values, inputs.extra["image_sizes"])
    return torch.cat(features.pooler_output)


@torch.no_grad()
def test_cache_equals_hf_hidden_states(eager):
    """Every LLM block's input is Hugging Face's hidden state; `adapter.hook_out` is what Hugging Face
    embeds for the images (codes, end-of-row tokens included), and the layout's adapter rows land on
    its LLM positions."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs)
    ref = eager.reference(**inputs.hf_kwargs(), output_hidden_states=True)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer], atol=1e-5, rtol=0)
    adapter = cache["adapter.hook_out"]
    torch.testing.assert_close(adapter, _hf_image_embeddings(eager), atol=0, rtol=0)
    layout = inputs.layout
    present = layout.table("llm").present
    assert torch.equal(layout.gather("adapter", adapter)[present], layout.gather("llm", cache["hook_multimodal_embed"])[present])


@torch.no_grad()
def test_vq_encoder_points_equal_hf_modules(eager):
    """Each vision point holds what Hugging Face's module computes for the image (its first temporal
    copy): the levels' resnet blocks, the attention blocks' outputs and patterns, each code-resolution
    block's output, the latent and the chosen codes."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    encoder = reference.model.vqmodel.encoder
    temporal = reference.config.vq_config.temporal_downsample_factor
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        return lambda _module, _args, out: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    modules = {f"down{level}.{j}": block for level, stage in enumerate(encoder.down_block.down)
               for j, block in enumerate(stage.block)}
    modules.update(attn0=encoder.down_block.down[-1].attn[0], block0=encoder.middle_block.block_1,
                   attn1=encoder.middle_block.attn_1, block1=encoder.middle_block.block_2,
                   latent=reference.model.vqmodel.quant_conv, codes=reference.model.vqmodel.quantize)
    handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
    try:
        reference(**inputs.hf_kwargs())
    finally:
        for handle in handles:
            handle.remove()
    _, cache = model.run_with_cache(inputs, names_filter=lambda name: name.startswith("vision."))

    def tokens(x):  # HF's [image * temporal, channels, h, w], first copies, as [image, h * w, channels]
        return x[::temporal].flatten(2).transpose(1, 2)

    levels = len(encoder.down_block.down)
    for level in range(levels):
        torch.testing.assert_close(cache[f"vision.down.{level}.block.0.hook_out"], tokens(seen[f"down{level}.0"]),
                                   atol=1e-5, rtol=0)
    for block in range(2):
        torch.testing.assert_close(cache[f"vision.blocks.{block}.hook_attn_out"], seen[f"attn{block}"][::temporal],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"vision.blocks.{block}.hook_resid_post"], tokens(seen[f"block{block}"]),
                                   atol=1e-5, rtol=0)
    pattern = cache["vision.blocks.1.attn.hook_pattern"]
    assert pattern.shape[-1] == pattern.shape[-2] == inputs.layout.vision_shape[1]
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)), atol=1e-5, rtol=0)
    latent = seen["latent"].permute(0, 2, 1, 3, 4)[:, 0]  # quant_conv's output as the quantizer reads it
    torch.testing.assert_close(cache["vision.hook_latent"], latent.flatten(2).transpose(1, 2), atol=1e-5, rtol=0)
    assert torch.equal(cache["vision.hook_codes"], seen["codes"].flatten(1))
    assert torch.equal(cache["vision.hook_code_distances"].argmin(-1), cache["vision.hook_codes"])


@torch.no_grad()
def test_vision_knockout_equals_hf_attention_with_its_mask(eager):
    """A knockout in the VQ encoder's attention (every image cell cut off from the top-left code's
    cell) equals Hugging Face's attention blocks given the effective mask by hand (each temporal copy
    the same), at the latent the quantizer reads and at the logits; the latent changed."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    temporal = reference.config.vq_config.temporal_downsample_factor
    ko = knockout(model, inputs, queries=TokenGroup.image(), keys=TokenGroup.box(0, 0, 1, 1),
                       layers=range(model.cfg.vision.n_layers), stage="vision", verify=True)
    with ko:
        ours, cache = model.run_with_cache(inputs, names_filter="vision.hook_latent")
    assert ko.n_blocked_edges > 0 and all(mass == 0.0 for mass in ko.blocked_mass.values())
    allowed = ko.effective_mask().cpu().repeat_interleave(temporal, dim=0)[:, None]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    encoder = reference.model.vqmodel.encoder
    latents = []
    handles = [attn.register_forward_pre_hook(lambda _m, args, kwargs: (args, {**kwargs, "attention_mask": mask}),
                                              with_kwargs=True)
               for attn in (encoder.down_block.down[-1].attn[0], encoder.middle_block.attn_1)]
    handles.append(reference.model.vqmodel.quant_conv.register_forward_hook(lambda _m, _a, out: latents.append(out)))
    try:
        theirs = reference(**inputs.hf_kwargs()).logits
    finally:
        for handle in handles:
            handle.remove()
    latent = latents[0].permute(0, 2, 1, 3, 4)[:, 0].flatten(2).transpose(1, 2)
    torch.testing.assert_close(cache["vision.hook_latent"], latent, atol=1e-5, rtol=0)
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    _, plain = model.run_with_cache(inputs, names_filter="vision.hook_latent")
    assert (plain["vision.hook_latent"] - latent).abs().max() > 1e-4, "the knockout changed the latent"


@torch.no_grad()
def test_the_adapter_maps_codes_to_token_ids_on_the_code_grid(eager):
    """`adapter.hook_in` is the ids Hugging Face writes for the images; at each grid token of the layout
    sits the id of the code its cell chose (`vision.hook_codes`, read through the layout's vision
    index), at each end-of-row special the end-of-row id, and the markers are around each image."""
    model, inputs = eager.model, eager.inputs
    tokenizer = model.processor.tokenizer
    _, cache = model.run_with_cache(inputs, names_filter=["adapter.hook_in", "vision.hook_codes"])
    ids = cache["adapter.hook_in"]
    assert torch.equal(ids, eager.reference.model.get_image_tokens(inputs.pixel_values, inputs.extra["image_sizes"]))
    layout = inputs.layout
    assert isinstance(layout, CodeGridLayout) and layout.code_size == 8
    codes = layout.gather("vision", cache["vision.hook_codes"])
    present = layout.table("vision").present
    code_ids = torch.tensor([tokenizer.convert_tokens_to_ids(visual_token(c)) for c in codes[present].tolist()])
    assert torch.equal(layout.gather("adapter", ids)[present], code_ids)
    end_of_row = tokenizer.convert_tokens_to_ids(END_OF_ROW)
    sizes = inputs.extra["image_sizes"] // 8
    for span, (rows, cols) in zip(layout.spans, sizes.tolist()):
        assert span.segments[0].tokens.shape == (rows, cols) and span.canvas == (rows * 8, cols * 8)
        assert len(span.special[END_OF_ROW_KIND]) == rows
        row_ids = inputs.input_ids[span.row].cpu()
        assert int(row_ids[span.special["start"]]) == tokenizer.convert_tokens_to_ids("<|image token|>")
        assert int(row_ids[span.special["end"]]) == tokenizer.convert_tokens_to_ids("<|extra_201|>")
    offsets = torch.tensor([0, *((sizes[:, 0] * (sizes[:, 1] + 1)).cumsum(0).tolist())])
    for (rows, cols), start in zip(sizes.tolist(), offsets[:-1].tolist()):
        grid = ids[start : start + rows * (cols + 1)].view(rows, cols + 1)
        assert (grid[:, -1] == end_of_row).all() and (grid[:, :-1] != end_of_row).all()


@torch.no_grad()
def test_swapping_a_code_at_the_adapter_equals_hf_with_that_code_embedded(eager):
    """Patching past the argmin patches code embeddings: replacing image 0's top-left code id at
    `adapter.hook_in` equals Hugging Face run on the merged embeddings with that token's embedding."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    replacement = model.processor.tokenizer.convert_tokens_to_ids(visual_token(5))
    first = int(inputs.layout.spans[0].segments[0].adapter_index[0][0])

    def swap(ids, hook):
        ids = ids.clone()
        ids[first] = replacement
        return ids

    ours = model.run_with_hooks(inputs, fwd_hooks=[("adapter.hook_in", swap)])
    _, cache = model.run_with_cache(inputs, names_filter="hook_multimodal_embed")
    embeds = cache["hook_multimodal_embed"].clone()
    span = inputs.layout.spans[0]
    embeds[span.row, span.positions[0]] = reference.get_input_embeddings().weight[replacement]
    theirs = reference(inputs_embeds=embeds, attention_mask=inputs.attention_mask).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4


def test_backward_hooks_before_the_argmin_are_refused(eager):
    """No gradient crosses the quantizer's argmin: a backward hook on a vision point (or on the integer
    ids at `adapter.hook_in`) is refused, naming why; at `adapter.hook_out` one fires."""
    model, inputs = eager.model, eager.inputs
    for name in ("vision.blocks.0.hook_resid_post", "vision.hook_latent", "adapter.hook_in"):
        with pytest.raises(InputError, match="argmin"):
            model.add_hook(name, lambda grad, hook: None, dir="bwd")
    model.reset_hooks()
    grads = []
    with model.hooks(bwd_hooks=[("adapter.hook_out", lambda grad, hook: grads.append(grad))]):
        model(inputs).sum().backward()
    assert len(grads) == 1 and grads[0].abs().sum() > 0


def test_vq_options_outside_the_hooks_are_refused_by_name():
    """Attention at a finer level than the code grid is refused at load, naming the config field."""
    hf_model, processor = tiny_emu3()
    hf_model.config.vq_config.attn_resolutions = [2]
    with pytest.raises(UnsupportedModelError, match="attn_resolutions"):
        HookedMLLM.from_hf(hf_model, processor)


def test_every_analysis_runs():
    """On images of 64 px (8 x 8 codes): with 4 x 4 codes from a random codebook the probe at the codes'
    embeddings confuses no pair of object classes, which the anchor study needs to start from."""
    hf_model, processor = tiny_emu3(max_side=64)
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=64)
    tier.every_analysis_runs(HookedMLLM.from_hf(hf_model, processor), scenes)


def test_placeholders_that_do_not_match_the_code_grids_are_refused(eager):
    """image_sizes one row of codes taller than the prompt's placeholders are refused, saying what to match."""
    model, inputs = eager.model, eager.inputs
    sizes = inputs.extra["image_sizes"].clone()
    sizes[0, 0] += 8  # 24 -> 32 px, inside the padded 40
    with pytest.raises(InputError, match="image placeholders"):
        model.architecture.check_inputs(model.cfg, inputs.input_ids, inputs.pixel_values, image_sizes=sizes)
