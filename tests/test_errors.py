"""Bad input gets a clear error that says what was wrong and what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from mmlens import HookedMLLM, HookNameError

from conftest import random_images


def test_unknown_hook_name_lists_closest(tiny_clip):
    with pytest.raises(HookNameError, match=r"blocks\.0\.attn\.hook_pattern"):
        tiny_clip.model.run_with_hooks(tiny_clip.inputs, fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, hook: x)])
    with pytest.raises(HookNameError, match="vision.blocks.1.hook_resid_post"):
        tiny_clip.model.run_with_cache(tiny_clip.inputs, names_filter=["vision.block.1.hook_resid_post"])


def test_unsupported_architecture_lists_supported():
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(NotImplementedError, match="LlavaForConditionalGeneration"):
        HookedMLLM.from_hf(llm)


def test_placeholder_count_mismatch(tiny_clip):
    model = tiny_clip.model
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        model.prepare(random_images(1), "<image> <image> how many")
    inputs = tiny_clip.inputs
    with pytest.raises(ValueError, match="image tokens in input_ids"):
        model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values[:2], attention_mask=inputs.attention_mask)


def test_wrong_image_type(tiny_clip):
    with pytest.raises(TypeError, match="expected a PIL image"):
        tiny_clip.model.prepare(["a path is not an image"], "how many")
    with pytest.raises(TypeError, match="shape"):
        tiny_clip.model.prepare([np.zeros((8, 8))], "how many")
    with pytest.raises(TypeError, match="images must be"):
        tiny_clip.model.prepare("picture.png", "how many")


def test_empty_batch(tiny_clip):
    with pytest.raises(ValueError, match="empty batch"):
        tiny_clip.model.prepare([], "how many")
    with pytest.raises(ValueError, match="non-empty"):
        tiny_clip.model(input_ids=torch.zeros(0, 5, dtype=torch.long))


def test_wrong_pixel_size(tiny_clip):
    inputs = tiny_clip.inputs
    with pytest.raises(ValueError, match=r"model\.prepare"):
        tiny_clip.model(input_ids=inputs.input_ids, pixel_values=torch.zeros(3, 3, 64, 64), attention_mask=inputs.attention_mask)


def test_prompt_count_mismatch(tiny_clip):
    with pytest.raises(ValueError, match="2 image groups but 3 prompts"):
        tiny_clip.model.prepare(random_images(2), ["a", "b", "c"])


def test_hook_result_needs_opt_in(tiny_clip):
    with pytest.raises(ValueError, match="set_use_attn_result"):
        tiny_clip.model.run_with_hooks(tiny_clip.inputs, fwd_hooks=[("blocks.0.attn.hook_result", lambda x, hook: x)])


# ------------------------------------------------------------------ bad input found by the fault battery
def test_bad_images_and_prompts_are_named(tiny_clip):
    from mmlens.errors import InputError

    model = tiny_clip.model
    with pytest.raises(InputError, match=r"image 0.0 is empty \(size \(0, 0\)\)"):
        model.prepare([Image.new("RGB", (0, 0))], "how many")
    with pytest.raises(InputError, match="image 0.0 holds NaN"):
        model.prepare([np.full((8, 8, 3), np.nan, dtype=np.float32)], "how many")
    with pytest.raises(InputError, match="prompts must be a string or a list of strings"):
        model.prepare(random_images(1), None)
    inputs = tiny_clip.inputs
    pixels = inputs.pixel_values.clone()
    pixels[1, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match=r"pixel_values of image\(s\) \[1\] hold NaN"):
        model(input_ids=inputs.input_ids, pixel_values=pixels, attention_mask=inputs.attention_mask)


def test_knockouts_that_cannot_work_are_refused_at_construction(tiny_clip):
    from mmlens.errors import InputError
    from mmlens.interventions import TokenGroup, knockout

    model, inputs = tiny_clip.model, tiny_clip.inputs
    n_heads = model.cfg.n_heads
    with pytest.raises(InputError, match=rf"heads \[{n_heads + 3}\] out of range: the llm stage has heads 0..{n_heads - 1}"):
        knockout(model, inputs, queries=TokenGroup.image(), keys=TokenGroup.image(), layers=[0], heads=[n_heads + 3])
    nothing = TokenGroup.box(0, 0, 0, 0)
    with pytest.raises(InputError, match="blocks no edge"):
        knockout(model, inputs, queries=TokenGroup.image(), keys=nothing, layers=[0])
    assert knockout(model, inputs, queries=TokenGroup.image(), keys=nothing, layers=[0], allow_empty=True).n_blocked_edges == 0


def test_patching_needs_conditions(tiny_clip):
    from mmlens.errors import InputError
    from mmlens.interventions import patch_conditions

    with pytest.raises(InputError, match="conditions must be a non-empty list of Patches"):
        patch_conditions(tiny_clip.model, tiny_clip.inputs, tiny_clip.inputs, lambda cache, inputs: cache, [])


@torch.no_grad()
def test_a_misspelled_cache_key_is_a_key_error_listing_close_matches(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    _, cache = model.run_with_cache(inputs, names_filter=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    with pytest.raises(KeyError) as error:
        cache["blocks.0.hook_resid_pots"]
    assert isinstance(error.value, HookNameError)
    assert "no hook point has that name" in str(error.value) and "'blocks.0.hook_resid_post'" in str(error.value)
    with pytest.raises(HookNameError, match="is a hook point but this cache does not hold it"):
        cache["blocks.0.hook_resid_pre"]
    with pytest.raises(HookNameError, match=r"Closest cached: \['blocks.1.hook_resid_post'"):
        cache["resid_pots", 1]


def test_non_finite_weights_are_named_not_blamed_on_the_block_spec():
    from mmlens.errors import ModelLoadError
    from mmlens.testing import tiny_llava

    hf_model, processor = tiny_llava(vision="clip")
    name, weight = next((n, p) for n, p in hf_model.named_parameters() if "layers.1.mlp.down_proj" in n)
    with torch.no_grad():
        weight[0, :3] = float("nan")
    with pytest.raises(ModelLoadError, match=rf"{name} \(3 of {weight.numel()} values\).*damaged") as error:
        HookedMLLM.from_hf(hf_model, processor)
    assert "BlockSpec" not in str(error.value)
