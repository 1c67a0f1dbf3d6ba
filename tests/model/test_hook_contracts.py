"""Hooks cannot broadcast silently: a hook's return must match what it received, and an edit
that selects nothing (no layer, no head, no open edge) is an error, not a no-op."""

from __future__ import annotations

import pytest
import torch

from mmlens.errors import HookReturnError, InputError
from mmlens.interventions import TokenGroup, knockout

from conftest import random_images

IMAGE = TokenGroup.image()

WRONG_RETURNS = {
    "llm scores, one head": ("blocks.0.attn.hook_attn_scores", lambda s, hook: s[:, :1]),
    "llm scores, one row": ("blocks.0.attn.hook_attn_scores", lambda s, hook: s[:1]),
    "llm pattern, one head": ("blocks.1.attn.hook_pattern", lambda p, hook: p[:, :1]),
    "llm residual, one row": ("blocks.0.hook_resid_post", lambda r, hook: r[:1]),
    "llm input, one row": ("hook_multimodal_embed", lambda r, hook: r[:1]),
    "vision scores, one head": ("vision.blocks.0.attn.hook_attn_scores", lambda s, hook: s[:, :1]),
    "vision residual, one image": ("vision.blocks.1.hook_resid_pre", lambda r, hook: r[:1]),
    "adapter output, one image": ("adapter.hook_out", lambda a, hook: a[:1]),
    "norm scale, one row": ("blocks.0.ln1.hook_scale", lambda s, hook: s[:1]),
    "wider dtype": ("blocks.0.hook_resid_post", lambda r, hook: r.double()),
}


def _named_hook(function):
    def wrong_return(activation, hook):
        return function(activation, hook)
    return wrong_return


@pytest.mark.parametrize("case", list(WRONG_RETURNS))
@torch.no_grad()
def test_a_hook_returning_another_shape_or_dtype_is_refused(tiny_clip, case):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    name, function = WRONG_RETURNS[case]
    _, cache = model.run_with_cache(inputs, names_filter=name)
    received = ", ".join(map(str, cache[name].shape))
    with pytest.raises(HookReturnError, match=rf"wrong_return at {name} received shape \({received}\)") as error:
        model.run_with_hooks(inputs, fwd_hooks=[(name, _named_hook(function))])
    assert "returned shape" in str(error.value)


@torch.no_grad()
def test_a_hook_returning_another_device_or_a_non_tensor_is_refused(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    with pytest.raises(HookReturnError, match="on meta"):
        model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_mid", lambda r, hook: r.to("meta"))])
    with pytest.raises(HookReturnError, match="returned a list"):
        model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_mid", lambda r, hook: r.tolist())])


@torch.no_grad()
def test_hooks_returning_a_like_tensor_or_none_still_edit(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    clean = model(inputs)
    assert torch.equal(model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_post", lambda r, hook: None)]), clean)

    def zero_first_head(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] = 0
        return pattern
    edited = model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.attn.hook_pattern", zero_first_head)])
    assert (edited - clean).abs().max() > 1e-5


@torch.no_grad()
def test_knockout_in_no_layer_is_refused(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    with pytest.raises(InputError, match="no layer"):
        knockout(model, inputs, queries=IMAGE, keys=IMAGE, layers=[])
    with pytest.raises(InputError, match="no layer"):
        knockout(model, inputs, queries=IMAGE, keys=IMAGE, layers=[], stage="vision")


@torch.no_grad()
def test_n_blocked_edges_counts_only_edges_the_model_leaves_open(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    everything = TokenGroup.positions(range(inputs.input_ids.shape[1]))
    ko = knockout(model, inputs, queries=IMAGE, keys=everything, layers=[0])
    own = model.attention_edges(inputs).to(ko.blocked.device)
    assert ko.n_blocked_edges == int((ko.blocked & own).sum()) < int(ko.blocked.sum())  # keys after the image are causal-masked anyway


@torch.no_grad()
def test_a_knockout_of_edges_the_model_already_masks_is_refused(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    with pytest.raises(InputError, match="blocks no edge"):  # BOS comes before the image: it never reads it
        knockout(model, inputs, queries=TokenGroup.bos(), keys=IMAGE, layers=[0])


@torch.no_grad()
def test_head_patching_and_bidirectional_attention_in_nothing_are_refused(tiny_clip):
    from mmlens.interventions import Patch, bidirectional_image_attention
    from mmlens.interventions.patching import head_conditions

    model, inputs = tiny_clip.model, tiny_clip.inputs
    with pytest.raises(InputError, match="no head"):
        Patch("blocks.0.attn.hook_z", heads=[])
    with pytest.raises(InputError, match="no layer"):
        head_conditions(model, "z", layers=[])
    with pytest.raises(InputError, match="no layer"):
        bidirectional_image_attention(model, inputs, layers=[])


@torch.no_grad()
def test_inputs_longer_than_the_llm_context_are_refused_before_the_forward(tiny_clip):
    model = tiny_clip.model
    limit = model.hf_model.config.get_text_config().max_position_embeddings
    too_long = model.prepare(random_images(1), "word " * limit)
    assert too_long.input_ids.shape[1] > limit
    ran = []
    with pytest.raises(InputError, match=rf"{too_long.input_ids.shape[1]} tokens long .* at most {limit}"):
        model.run_with_hooks(too_long, fwd_hooks=[("vision.hook_embed", lambda x, hook: ran.append(1))])
    assert not ran, "refused before any stage ran"
    near = model.prepare(random_images(1), "")
    with pytest.raises(InputError, match=r"\+ \d+ new tokens"):
        model.generate(near, max_new_tokens=limit)
