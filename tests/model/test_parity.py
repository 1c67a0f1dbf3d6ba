"""HookedMLLM reproduces Hugging Face exactly: logits, vision hidden states, adapter features."""

from __future__ import annotations

import torch

from conftest import build_tiny


@torch.no_grad()
def test_logits_equal_hf_with_padding(tiny):
    ours = tiny.model(tiny.inputs)
    theirs = tiny.reference(**tiny.inputs.hf_kwargs()).logits
    assert tiny.inputs.attention_mask.min() == 0, "the batch must contain padding"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@torch.no_grad()
def test_right_padding_matches_hf():
    tiny = build_tiny("clip", padding_side="right")
    assert tiny.inputs.attention_mask[:, -1].min() == 0
    torch.testing.assert_close(
        tiny.model(tiny.inputs), tiny.reference(**tiny.inputs.hf_kwargs()).logits, atol=1e-5, rtol=0
    )


@torch.no_grad()
def test_cached_run_equals_hf_everywhere(tiny):
    """Caching every hook takes the explicit (hooked) path in every module; it stays exact."""
    logits, cache = tiny.model.run_with_cache(tiny.inputs)
    ref = tiny.reference(**tiny.inputs.hf_kwargs(), output_hidden_states=True)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)
    vision = tiny.reference.model.vision_tower(tiny.inputs.pixel_values, output_hidden_states=True)
    n_vision = tiny.model.cfg.vision.n_layers
    for i in range(n_vision - 1):  # HF ties its last hidden state to the post-norm output
        torch.testing.assert_close(
            cache[f"vision.blocks.{i}.hook_resid_post"], vision.hidden_states[i + 1], atol=1e-5, rtol=0
        )
    torch.testing.assert_close(cache["vision.blocks.0.hook_resid_pre"], vision.hidden_states[0], atol=1e-5, rtol=0)
    features = cache["adapter.hook_out"].flatten(0, 1)
    torch.testing.assert_close(features, ref.image_hidden_states, atol=1e-5, rtol=0)
    (layer,) = tiny.model.cfg.adapter.feature_layers
    selected = vision.hidden_states[layer]
    if not tiny.model.architecture.llm_sees_cls(tiny.model.cfg) and tiny.model.cfg.vision.has_cls:
        selected = selected[:, 1:]
    torch.testing.assert_close(cache["adapter.hook_in"], selected, atol=1e-5, rtol=0)
    for l in range(tiny.model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_pre"], ref.hidden_states[l], atol=1e-5, rtol=0)
    # the final norm's hook is before its weight (TL's fold_ln); Hugging Face's last hidden state is after it
    torch.testing.assert_close(cache["ln_final.hook_normalized"] * tiny.model.ln_final.w, ref.hidden_states[-1],
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_merged_embedding_is_llm_input(tiny_clip):
    _, cache = tiny_clip.model.run_with_cache(tiny_clip.inputs)
    merged = cache["hook_multimodal_embed"]
    torch.testing.assert_close(merged, cache["blocks.0.hook_resid_pre"])
    image = tiny_clip.inputs.layout.image_token_mask()
    torch.testing.assert_close(merged[image], cache["adapter.hook_out"].flatten(0, 1))
    # hook_embed is TransformerLens's "what the embedding adds to the residual": the merged input
    assert torch.equal(cache["hook_embed"], merged)


@torch.no_grad()
def test_identity_hook_everywhere_changes_nothing(tiny):
    tiny.model.set_use_attn_result(True)
    try:
        calls = []

        def identity(x, hook):
            calls.append(hook.name)
            return x.clone()

        out = tiny.model.run_with_hooks(tiny.inputs, fwd_hooks=[(lambda n: True, identity)])
    finally:
        tiny.model.set_use_attn_result(False)
    torch.testing.assert_close(out, tiny.reference(**tiny.inputs.hf_kwargs()).logits, atol=1e-5, rtol=0)
    assert set(calls) == set(tiny.model.hook_names()), "every hook point fired"


@torch.no_grad()
def test_attention_result_sums_to_attn_out(tiny_clip):
    model = tiny_clip.model
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(tiny_clip.inputs)
    finally:
        model.set_use_attn_result(False)
    for prefix, layers in (("", model.cfg.n_layers), ("vision.", model.cfg.vision.n_layers)):
        for l in range(layers):
            result = cache[f"{prefix}blocks.{l}.attn.hook_result"]
            attn = model.hf_model.model.language_model.layers[l].self_attn if not prefix else None
            bias = 0 if attn is None or attn.o_proj.bias is None else attn.o_proj.bias
            if prefix:
                bias = model.architecture.vision_tower(model.hf_model).encoder.layers[l].self_attn.out_proj.bias
            torch.testing.assert_close(
                result.sum(-2) + bias, cache[f"{prefix}blocks.{l}.hook_attn_out"], atol=1e-5, rtol=0
            )


@torch.no_grad()
def test_sdpa_model_matches_hf_with_and_without_hooks():
    import copy

    from mmlens import HookedMLLM
    from mmlens.testing import tiny_llava

    from conftest import random_images

    hf_model, processor = tiny_llava(attn_implementation="sdpa")
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(2), ["how many", "what is in the image ?"])
    theirs = reference(**inputs.hf_kwargs()).logits
    torch.testing.assert_close(model(inputs), theirs, atol=1e-5, rtol=0)
    logits, _ = model.run_with_cache(inputs)
    valid = inputs.attention_mask.bool()  # sdpa's fully padded rows are undefined in HF itself
    torch.testing.assert_close(logits[valid], theirs[valid], atol=1e-5, rtol=0)
