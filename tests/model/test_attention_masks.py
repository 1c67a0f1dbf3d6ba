"""Explicit 4D masks: the causal one equals Hugging Face's own; images can see both ways."""

from __future__ import annotations

import torch

from mmlens.interventions import allowed_edges, image_attention_mask

from conftest import build_tiny


@torch.no_grad()
def test_causal_mask_reproduces_hf(tiny_clip):
    inputs, cfg = tiny_clip.inputs, tiny_clip.model.cfg
    mask = image_attention_mask(
        inputs.input_ids, inputs.attention_mask, cfg.image_token_id, cfg.n_image_tokens,
        bidirectional_images=False,
    )
    ours = tiny_clip.reference(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=mask).logits
    theirs = tiny_clip.reference(**inputs.hf_kwargs()).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_bidirectional_only_within_each_image():
    tiny = build_tiny("clip")
    from conftest import random_images

    images = random_images(3)
    inputs = tiny.model.prepare([[images[0], images[1]], [images[2]]], ["compare", "how many"])
    allowed = allowed_edges(inputs.layout.image_of_position(), inputs.attention_mask, True)
    first, second = inputs.layout.images[0][0].positions, inputs.layout.images[0][1].positions
    assert allowed[0][first[0], first[-1]] and allowed[0][second[0], second[-1]]  # reads ahead
    assert not allowed[0][first[-1], second[0]]  # never into the next image
    assert allowed[0][second[0], first[-1]]  # causal reading of an earlier image remains
    text_after = second[-1] + 1
    assert not allowed[0][second[-1], text_after]
    causal = allowed_edges(inputs.layout.image_of_position(), inputs.attention_mask, False)
    extra = allowed & ~causal
    image = inputs.layout.image_token_mask()
    assert (extra.any(-1) <= image).all() and (extra.any(-2) <= image).all()
