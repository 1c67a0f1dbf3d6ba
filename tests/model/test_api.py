"""The classic TransformerLens API on a multimodal model: caches, hooks, gradients, aliases."""

from __future__ import annotations

import torch
from transformer_lens.ActivationCache import ActivationCache


def test_cache_is_an_activation_cache_over_all_stages(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    _, cache = model.run_with_cache(inputs)
    assert isinstance(cache, ActivationCache)
    stages = {name.split(".")[0] for name in cache.keys()}
    assert {"vision", "adapter", "blocks"} <= stages
    assert cache.layout.grid == (4, 4)
    resid = cache.accumulated_resid(layer=model.cfg.n_layers)
    assert resid.shape[0] == model.cfg.n_layers + 1


def test_hook_names_partition_by_stage(tiny_clip):
    model = tiny_clip.model
    parts = [set(model.hook_names(stage)) for stage in ("vision", "adapter", "llm")]
    assert set.union(*parts) == set(model.hook_names())
    assert sum(map(len, parts)) == len(model.hook_names())
    assert parts[1] == {"adapter.hook_in", "adapter.hook_hidden", "adapter.hook_out"}


def test_bridge_names_are_aliases(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    seen = []
    model.run_with_hooks(
        inputs,
        fwd_hooks=[
            ("vision_encoder.encoder_layers.0.hook_out", lambda x, hook: seen.append(hook.name)),
            ("vision_projector.hook_out", lambda x, hook: seen.append(hook.name)),
            ("blocks.1.mlp.hook_out", lambda x, hook: seen.append(hook.name)),
        ],
    )
    assert seen == ["vision.blocks.0.hook_resid_post", "adapter.hook_out", "blocks.1.hook_mlp_out"]
    _, cache = model.run_with_cache(inputs, names_filter=["vision_projector.hook_in"])
    torch.testing.assert_close(cache["vision_projector.hook_in"], cache["adapter.hook_in"])


def test_hooks_context_manager_cleans_up(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    plain = model(inputs)

    def zero_adapter(x, hook):
        return torch.zeros_like(x)

    with model.hooks(fwd_hooks=[("adapter.hook_out", zero_adapter)]):
        edited = model(inputs)
    assert (edited - plain).abs().max() > 1e-4
    torch.testing.assert_close(model(inputs), plain)
    assert not any(hp.has_hooks() for hp in model.hook_points())


def test_gradients_flow_to_every_stage(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    names = ["vision.blocks.0.hook_resid_post", "adapter.hook_out", "blocks.1.hook_resid_pre"]
    loss, cache = model.run_with_cache(inputs, names_filter=names, incl_bwd=True, return_type="loss")
    assert loss.ndim == 0 and torch.isfinite(loss)
    for name in names:
        grad = cache[name + "_grad"]
        assert grad.shape == cache[name].shape and grad.abs().sum() > 0


def test_text_loss_ignores_image_and_padding_targets(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    logits, loss = model(inputs, return_type="both")
    targets = inputs.input_ids[:, 1:]
    mask = inputs.attention_mask.bool()  # TL's rule: the prediction and its target both real
    keep = (targets != model.cfg.image_token_id) & mask[:, 1:] & mask[:, :-1]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep])
    torch.testing.assert_close(loss, manual)


def test_generate_returns_text(tiny_clip):
    answers = tiny_clip.model.generate(tiny_clip.inputs, max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_hf_keywords_and_processor_output_are_accepted(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    expected = model(inputs)
    torch.testing.assert_close(model(**inputs.hf_kwargs()), expected)
    batch = inputs.hf_kwargs()  # the mapping a Hugging Face processor returns
    torch.testing.assert_close(model(dict(batch)), expected)
    _, mapped = model.run_with_cache(dict(batch), names_filter="adapter.hook_in")
    assert mapped.layout.grid == (4, 4)
    _, cache = model.run_with_cache(**inputs.hf_kwargs(), names_filter="adapter.hook_out")
    assert list(cache.keys()) == ["adapter.hook_out"] and cache.layout.grid == (4, 4)
