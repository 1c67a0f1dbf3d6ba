"""Attention edits through hooks really take effect, in the LLM and in the vision tower."""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask


def _blocked_edges(layout, row: int):
    """Second half of the row's image tokens may not read the first half."""
    positions = layout.positions(row)
    half = len(positions) // 2
    return positions[half:], positions[:half]


def _hf_4d_mask(reference, inputs):
    """The additive causal + padding mask HF eager builds, as a [batch, 1, q, k] tensor."""
    embeds = reference.get_input_embeddings()(inputs.input_ids)
    mask = create_causal_mask(
        config=reference.config.text_config,
        inputs_embeds=embeds,
        attention_mask=inputs.attention_mask,
        past_key_values=None,
        position_ids=torch.arange(inputs.input_ids.shape[1])[None],
    )
    return mask.clone()


@torch.no_grad()
def test_llm_knockout_equals_hf_custom_4d_mask(tiny):
    inputs = tiny.inputs
    layout = inputs.layout

    def knockout(scores, hook):
        for row in range(layout.batch_size):
            queries, keys = _blocked_edges(layout, row)
            scores[row, :, queries[:, None], keys[None, :]] = float("-inf")
        return scores

    patterns = {}

    def keep_pattern(pattern, hook):
        patterns[hook.name] = pattern

    n_layers = tiny.model.cfg.n_layers
    hooks = [(f"blocks.{l}.attn.hook_attn_scores", knockout) for l in range(n_layers)]
    hooks += [(f"blocks.{l}.attn.hook_pattern", keep_pattern) for l in range(n_layers)]
    ours = tiny.model.run_with_hooks(inputs, fwd_hooks=hooks)

    mask = _hf_4d_mask(tiny.reference, inputs)
    assert mask.dtype == torch.float32 and mask.ndim == 4
    for row in range(layout.batch_size):
        queries, keys = _blocked_edges(layout, row)
        mask[row, :, queries[:, None], keys[None, :]] = torch.finfo(mask.dtype).min
    theirs = tiny.reference(
        input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=mask
    ).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    plain = tiny.reference(**inputs.hf_kwargs()).logits
    assert (ours - plain).abs().max() > 1e-3, "the knockout must change the output"
    for pattern in patterns.values():
        for row in range(layout.batch_size):
            queries, keys = _blocked_edges(layout, row)
            assert pattern[row][:, queries[:, None], keys[None, :]].abs().max() == 0


def _manual_vision_forward(reference, pixel_values, edited_layer: int, additive_mask):
    """HF's own vision layers called one by one, with a 4D mask given to one of them."""
    tower = reference.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    hidden = tower.embeddings(pixel_values)
    if hasattr(tower, "pre_layrnorm"):
        hidden = tower.pre_layrnorm(hidden)
    states = [hidden]
    for i, layer in enumerate(tower.encoder.layers):
        hidden = layer(hidden, additive_mask if i == edited_layer else None)
        states.append(hidden)
    return states


@torch.no_grad()
def test_vision_attention_edit_equals_same_edit_by_hand_in_hf(tiny):
    model, inputs = tiny.model, tiny.inputs
    cfg = model.cfg
    n_tokens = cfg.vision.n_patches + int(cfg.vision.has_cls)
    blocked_keys = torch.arange(n_tokens)[-4:]  # nobody may read the last 4 patches in layer 0...
    blocked_keys_for = torch.arange(n_tokens)[:-4]  # ...except those patches themselves

    def edit(scores, hook):
        scores[:, :, blocked_keys_for[:, None], blocked_keys[None, :]] = float("-inf")
        return scores

    with model.hooks(fwd_hooks=[("vision.blocks.0.attn.hook_attn_scores", edit)]):
        ours, cache = model.run_with_cache(
            inputs, names_filter=["vision.blocks.0.attn.hook_pattern", "adapter.hook_out"]
        )
    pattern = cache["vision.blocks.0.attn.hook_pattern"]
    assert pattern[:, :, blocked_keys_for[:, None], blocked_keys[None, :]].abs().max() == 0

    ref = tiny.reference
    mask = torch.zeros(1, 1, n_tokens, n_tokens)
    mask[..., blocked_keys_for[:, None], blocked_keys[None, :]] = torch.finfo(torch.float32).min
    states = _manual_vision_forward(ref, inputs.pixel_values, 0, mask)
    (layer,) = cfg.adapter.feature_layers
    selected = states[layer]
    if cfg.vision.has_cls and cfg.adapter.select_strategy == "default":
        selected = selected[:, 1:]
    features = ref.model.multi_modal_projector(selected)
    torch.testing.assert_close(cache["adapter.hook_out"], features, atol=1e-5, rtol=0)
    embeds = ref.get_input_embeddings()(inputs.input_ids)
    embeds[inputs.input_ids == cfg.image_token_id] = features.flatten(0, 1)
    theirs = ref(inputs_embeds=embeds, attention_mask=inputs.attention_mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - ref(**inputs.hf_kwargs()).logits).abs().max() > 1e-4, "the edit must matter"


@torch.no_grad()
def test_vision_pattern_edit_changes_output(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    plain = model(inputs)

    def zero_head(pattern, hook):
        pattern[:, 1] = 0.0
        return pattern

    with model.hooks(fwd_hooks=[("vision.blocks.0.attn.hook_pattern", zero_head)]):
        edited, cache = model.run_with_cache(inputs, names_filter="vision.blocks.0.attn.hook_z")
    assert cache["vision.blocks.0.attn.hook_z"][:, :, 1].abs().max() == 0
    assert (edited - plain).abs().max() > 1e-4
