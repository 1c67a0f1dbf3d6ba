"""The shortcuts that keep hooked forwards cheap change no result and no refusal: an input check
remembered by the values it passed on still refuses a batch edited since (in place included), and
the plain caching hooks store what TransformerLens's caching hooks store."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from transformer_lens.HookedRootModule import HookedRootModule

from mmlens import HookedMLLM
from mmlens.errors import InputError, LayoutMismatchError
from mmlens.testing import tiny_llava
from mmlens.testing.families.aya_vision import tiny_cohere2_vision
from mmlens.testing.families.mllama import tiny_mllama

PROMPTS = ["what is in the image ?", "how many"]


def _images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _counting(owner: object, method: str) -> list[int]:
    """Count the calls of `owner`'s real `method` (it still runs) by wrapping it on the instance."""
    calls = []
    real = getattr(owner, method)

    @functools.wraps(real)
    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    setattr(owner, method, counted)
    return calls


@torch.no_grad()
def test_mllama_walks_a_batch_once_and_refuses_it_after_an_in_place_edit():
    """Mllama's input check builds the layout to match placeholders and images row by row: a second
    forward on the same batch skips that walk, a batch of other values is walked, and editing the
    passed batch's aspect_ratio_ids in place (the same tensor) is refused as a fresh batch would be."""
    model = HookedMLLM.from_hf(*tiny_mllama())
    inputs = model.prepare([[image] for image in _images([(40, 60), (60, 30)])], PROMPTS)
    walks = _counting(model.architecture, "layout")
    first = model(inputs)
    assert torch.equal(model(inputs), first) and len(walks) == 1
    other = model.prepare([[image] for image in _images([(30, 30), (60, 30)])], PROMPTS)  # builds its layout
    before = len(walks)
    model(other)
    assert len(walks) == before + 1
    inputs.extra["aspect_ratio_ids"][0, 0] = 0  # row 0 keeps its placeholder but loses its image
    with pytest.raises(LayoutMismatchError, match="placeholder"):
        model(inputs)


@torch.no_grad()
def test_tiled_families_walk_a_batch_once_and_refuse_other_image_sizes():
    """The InternVL-style check (Aya Vision, Cohere2-Vision) replays each image's tiling and walks the
    placeholders: once per batch's values; the same ids with an image size that makes another number
    of frames are still refused, after the batch with the true sizes passed."""
    model = HookedMLLM.from_hf(*tiny_cohere2_vision())
    inputs = model.prepare(_images([(32, 16), (16, 16)]), PROMPTS)
    walks = _counting(model.architecture, "_images")
    first = model(inputs)
    assert torch.equal(model(inputs), first) and len(walks) == 1
    sizes = inputs.layout_inputs["image_sizes"]
    sizes[0] = torch.tensor([16, 16])  # in place: a 1-tile image where the processor tiled 2 and a thumbnail
    with pytest.raises(InputError, match="frames"):
        model(inputs)


@torch.no_grad()
def test_plain_caching_hooks_store_what_transformer_lens_stores():
    """`run_with_cache` with nothing but a names filter stores, point for point, the values
    TransformerLens's own caching hooks store; a position slice still goes through TransformerLens's."""
    model = HookedMLLM.from_hf(*tiny_llava())
    inputs = model.prepare(_images([(32, 32), (32, 32)]), PROMPTS)
    logits, ours = model.run_with_cache(inputs, return_cache_object=False)
    model.get_caching_hooks = functools.partial(HookedRootModule.get_caching_hooks, model)
    try:
        tl_logits, theirs = model.run_with_cache(inputs, return_cache_object=False)
    finally:
        del model.get_caching_hooks
    assert torch.equal(logits, tl_logits)
    assert list(ours) == list(theirs) and len(ours) > 50
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert not any(model.hook_dict[name].fwd_hooks for name in ours), "the hooks are removed after the run"
    name = "blocks.0.hook_resid_post"
    _, last = model.run_with_cache(inputs, names_filter=name, pos_slice=-1, return_cache_object=False)
    assert torch.equal(last[name], ours[name][:, -1:])  # TransformerLens keeps the position dimension
