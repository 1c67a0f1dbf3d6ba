"""Cohere2-Vision: Aya Vision's tower and Cohere2 LLM of parallel blocks, a projector without Aya's
LayerNorm reading the tower after its post-LayerNorm, its own canvas rule for the tiles, and each
frame's run of image tokens followed by `<|IMG_LINE_BREAK|>`. The parallel-block, decomposition,
rotary, pixel-shuffle, knockout, alias and analysis tests are Aya Vision's, run on this family."""

from __future__ import annotations

import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from mmlens.model.architectures.aya_vision.cohere2_tiling import Cohere2Tiling
from mmlens.testing.families.aya_vision import tiny_cohere2_vision

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures
from test_aya_vision import (  # noqa: F401 - Aya Vision's tests that hold for this family too, on its fixtures
    test_a_sequential_block_spec_is_refused, test_bridge_hook_names_are_aliases,
    test_decompositions_sum_to_the_residual_of_parallel_blocks,
    test_every_analysis_runs, test_inputs_that_do_not_match_are_refused, test_parallel_blocks_have_no_middle_residual,
    test_pixel_shuffle_addressing, test_rotary_only_on_sliding_layers_and_their_window,
    test_vision_knockout_equals_hf_with_its_mask,
)

family, eager, builder = tier.fixtures({"cohere2_vision": lambda attn: tiny_cohere2_vision(attn_implementation=attn)})

# what the projector reads: the tower's last_hidden_state, after its post-LayerNorm
PROJECTOR_READS = "vision.ln_post.hook_normalized"


def test_tiles_thumbnail_and_line_breaks_follow_the_processor(eager):
    """Each image is the processor's own tile grid then a thumbnail, every run followed by a line
    break, all between the start and end markers."""
    model, inputs = eager.model, eager.inputs
    processor, k = model.processor, model.cfg.adapter.token_grid[0]
    images = tier.random_images(3)
    frames = processor.image_processor(images)["num_patches"]
    tokenizer = processor.tokenizer
    for span, image, n_frames in zip(inputs.layout.spans, images, frames):
        tiles, thumbnail = span.segments
        assert (tiles.kind, thumbnail.kind) == ("tiles", "global")
        assert (tiles.tokens.rows // k) * (tiles.tokens.cols // k) + 1 == n_frames
        ids = inputs.input_ids[span.row].cpu()
        breaks = span.special["tile_break"]
        assert set(tokenizer.convert_ids_to_tokens(ids[breaks].tolist())) == {"<|IMG_LINE_BREAK|>"}
        assert len(breaks) == n_frames and int(breaks[-1]) + 1 == int(span.special["end"])
        assert int(span.special["end"]) - int(span.special["start"]) - 1 == n_frames * (k * k + 1)


def test_the_canvas_is_cohere2_visions_own():
    """An 8 x 32 image on 16 px tiles, at most 6: GotOcr2's rule takes the closest aspect ratio (4
    tiles across), Cohere2-Vision's the smallest canvas covering the image (2 across); the layout
    and the processor agree on Cohere2-Vision's."""
    _, processor = tiny_cohere2_vision()
    tiling = Cohere2Tiling.from_processor(processor)
    assert get_optimal_tiled_canvas((8, 32), (16, 16), 1, 6) == (4, 1)
    assert tiling.grid((8, 32)) == (1, 2)
    out = processor.image_processor([Image.new("RGB", (32, 8))])
    assert out["num_patches"] == [tiling.n_frames((8, 32))] == [3]
    assert tuple(torch.as_tensor(out["pixel_values"]).shape) == (3, 3, 16, 16)
