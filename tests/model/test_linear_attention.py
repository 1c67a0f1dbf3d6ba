"""Qwen3.5's linear-attention layers (a gated delta rule): every `linear_attn` point holds what
Hugging Face's module computes (read off its submodules, or recomputed by hand with its own
functions), edits there equal the same edit made by hand inside Hugging Face's model, rows of a
patching batch join such a block whole, cached decoding runs hooked, and attention edits of a
linear layer are refused by name."""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from PIL import ImageOps

from mmlens import HookedMLLM
from mmlens.errors import HookNameError, InputError, UnsupportedModelError
from mmlens.interventions import CacheMetric, Patch, Run, TokenGroup, bidirectional_image_attention, head_sweep, knockout
from mmlens.interventions import patch_conditions, recovery_blocked
from mmlens.testing.families.qwen3_5 import tiny_qwen3_5

from conftest import random_images

PROMPTS = ["what is in the image ?", "how many", "the colour of the left shape is ?"]
LINEAR = (1, 2)  # tiny_qwen3_5's linear-attention layers; 0 and 3 attend
POINTS = ("hook_q_pre_conv", "hook_k_pre_conv", "hook_v_pre_conv", "hook_q", "hook_k", "hook_v", "hook_beta_logit",
          "hook_beta", "hook_log_decay", "hook_recurrence_out", "hook_gate_input")


@pytest.fixture(scope="module")
def qwen():
    hf_model, processor = tiny_qwen3_5()
    processor.tokenizer.padding_side = "left"
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(3), PROMPTS)
    assert inputs.attention_mask.min() == 0, "a padded batch"
    return model, reference, inputs


def _mixer(reference, layer):
    return reference.model.language_model.layers[layer].linear_attn


@contextmanager
def _hooked(module, hook, pre: bool = False):
    handle = (module.register_forward_pre_hook if pre else module.register_forward_hook)(hook)
    try:
        yield
    finally:
        handle.remove()


def _assert_valid_close(ours, theirs, inputs):
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", LINEAR)
@torch.no_grad()
def test_each_point_is_what_hf_computes(qwen, layer):
    """Projections, the write gate and the norm's inputs read off Hugging Face's submodules; the
    convolution and the decay recomputed from its own function and parameters."""
    model, reference, inputs = qwen
    prefix = f"blocks.{layer}.linear_attn."
    _, cache = model.run_with_cache(inputs, names_filter=[prefix + p for p in POINTS] + [f"blocks.{layer}.hook_attn_out"])
    mixer = _mixer(reference, layer)
    seen = {}
    hooks = [(mixer.in_proj_qkv, "qkv", False), (mixer.in_proj_b, "b", False), (mixer.in_proj_a, "a", False),
             (mixer.out_proj, "out", False), (mixer.norm, "norm", True)]
    handles = [m.register_forward_pre_hook(lambda _m, args, key=key: seen.__setitem__(key, args)) if pre else
               m.register_forward_hook(lambda _m, _a, out, key=key: seen.__setitem__(key, out)) for m, key, pre in hooks]
    try:
        reference(**inputs.hf_kwargs())
    finally:
        for handle in handles:
            handle.remove()
    batch, seq = inputs.input_ids.shape
    split = [mixer.key_dim, mixer.key_dim, mixer.value_dim]
    dims = (mixer.head_k_dim, mixer.head_k_dim, mixer.head_v_dim)

    def heads(tensors):
        return [x.reshape(batch, seq, -1, d) for x, d in zip(tensors, dims)]

    close = lambda name, theirs: torch.testing.assert_close(cache[prefix + name], theirs, atol=1e-5, rtol=0)  # noqa: E731
    for name, theirs in zip(("hook_q_pre_conv", "hook_k_pre_conv", "hook_v_pre_conv"), heads(seen["qkv"].split(split, -1))):
        close(name, theirs)
    conv_fn = sys.modules[type(mixer).__module__].causal_conv1d_fn
    convolved = conv_fn(seen["qkv"].transpose(1, 2), mixer.conv1d.weight.squeeze(1), None, activation="silu").transpose(1, 2)
    for name, theirs in zip(("hook_q", "hook_k", "hook_v"), heads(convolved.split(split, -1))):
        close(name, theirs)
    close("hook_beta_logit", seen["b"])
    close("hook_beta", seen["b"].sigmoid())
    close("hook_log_decay", -mixer.A_log.exp() * F.softplus(seen["a"] + mixer.dt_bias))
    recurrence, gate = seen["norm"]
    close("hook_recurrence_out", recurrence.reshape(batch, seq, -1, mixer.head_v_dim))
    close("hook_gate_input", gate.reshape(batch, seq, -1, mixer.head_v_dim))
    torch.testing.assert_close(cache[f"blocks.{layer}.hook_attn_out"], seen["out"], atol=1e-5, rtol=0)
    assert cache[prefix + "hook_q"].shape == (batch, seq, mixer.num_k_heads, mixer.head_k_dim)
    assert cache[prefix + "hook_beta"].shape == (batch, seq, mixer.num_v_heads)


@torch.no_grad()
def test_a_write_strength_edit_equals_hf_with_that_gate(qwen):
    """beta = 0.5 everywhere in layer 1 = Hugging Face with `in_proj_b` giving 0 (sigmoid 0.5)."""
    model, reference, inputs = qwen
    ours = model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.linear_attn.hook_beta", lambda x, hook: torch.full_like(x, 0.5))])
    with _hooked(_mixer(reference, 1).in_proj_b, lambda _m, _a, out: torch.zeros_like(out)):
        theirs = reference(**inputs.hf_kwargs()).logits
    _assert_valid_close(ours, theirs, inputs)
    assert (ours - model(inputs))[inputs.attention_mask.bool()].abs().max() > 1e-4, "the edit changed something"


@torch.no_grad()
def test_removing_the_image_tokens_recurrence_output_equals_hf_edited_by_hand(qwen):
    """Zeroing `hook_recurrence_out` of layer 2 at the image tokens = Hugging Face with the rows of
    those tokens zeroed in what its gated norm reads."""
    model, reference, inputs = qwen
    image = inputs.input_ids == model.cfg.image_token_id

    def zero_images(x, hook):
        return x.masked_fill(image.to(x.device)[..., None, None], 0.0)

    ours = model.run_with_hooks(inputs, fwd_hooks=[("blocks.2.linear_attn.hook_recurrence_out", zero_images)])
    mixer = _mixer(reference, 2)
    rows = image[..., None].expand(*image.shape, mixer.num_v_heads).reshape(-1)  # the norm's rows: (batch, pos, head)

    def zero_rows(_module, args):
        recurrence, gate = args
        return recurrence.masked_fill(rows[:, None], 0.0), gate

    with _hooked(mixer.norm, zero_rows, pre=True):
        theirs = reference(**inputs.hf_kwargs()).logits
    _assert_valid_close(ours, theirs, inputs)
    assert (ours - model(inputs))[inputs.attention_mask.bool()].abs().max() > 1e-4, "the edit changed something"


@torch.no_grad()
def test_patching_a_linear_block_joins_it_whole(qwen):
    """Patching a linear block's output, and one value head's recurrence output at the image tokens,
    from a run on the mirrored images (batched copies join the linear block at its input: it has no
    hook_z to join at) = the same patch by hand."""
    model, _, inputs = qwen
    source = model.prepare([ImageOps.mirror(image) for image in random_images(3)], PROMPTS)
    last = "blocks.3.hook_resid_post"
    metric = CacheMetric(lambda acts, inp: acts[last][:, -1].norm(dim=-1), [last])
    conditions = [Patch("blocks.1.hook_attn_out"), Patch("blocks.2.linear_attn.hook_recurrence_out", TokenGroup.image(), heads=(1,))]
    values = patch_conditions(model, Run(source), Run(inputs), metric, conditions)
    names = [c.hook for c in conditions]
    _, mirrored = model.run_with_cache(source, names_filter=names)
    image = (inputs.input_ids == model.cfg.image_token_id).to(mirrored[names[1]].device)

    def one_head(x, hook):
        x = x.clone()
        x[:, :, 1][image] = mirrored[hook.name][:, :, 1][image]
        return x

    for value, patch in zip(values, ((names[0], lambda x, hook: mirrored[hook.name]), (names[1], one_head))):
        read = {}
        model.run_with_hooks(inputs, fwd_hooks=[patch, (last, lambda x, hook: read.__setitem__(last, x))])
        torch.testing.assert_close(value, metric(read, inputs), atol=1e-5, rtol=1e-5)
    _, clean = model.run_with_cache(inputs, names_filter=last)
    assert (values[0] - metric(clean, inputs)).abs().max() > 1e-3, "the patch changed something"


@torch.no_grad()
def test_cached_decoding_runs_hooked(qwen):
    """Generation with a hook on every linear-attention point (the convolution and recurrent states
    then update in the cache step by step here) decodes what Hugging Face decodes."""
    model, reference, inputs = qwen
    fired = set()

    def identity(x, hook):
        fired.add(hook.name)
        return x

    with model.hooks(fwd_hooks=[(lambda name: ".linear_attn." in name, identity)]):
        ours = model.generate(inputs, max_new_tokens=3)
    theirs = reference.generate(**inputs.hf_kwargs(), max_new_tokens=3, do_sample=False)
    assert ours == model.processor.batch_decode(theirs[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert len(fired) == len(LINEAR) * len(POINTS)


def test_attention_edits_of_a_linear_layer_are_refused_by_name(qwen):
    """Knockout, head patching and the bidirectional edit act on attention patterns and heads,
    which a linear layer has not: naming one, or covering one by default, is refused naming the
    linear layers and the full-attention ones to pass; the layer has no `attn` points at all."""
    model, _, inputs = qwen
    refusal = r"LLM layers \[1, 2\].* are linear-attention layers.*layers=\[0, 3\]"
    image = TokenGroup.image()
    with pytest.raises(InputError, match=r"a knockout .*LLM layers \[1\] are linear-attention"):
        knockout(model, inputs, queries=image, keys=image, layers=[1])
    with pytest.raises(InputError, match=refusal):
        knockout(model, inputs, queries=image, keys=image, layers=range(model.cfg.n_layers))
    with pytest.raises(InputError, match=r"bidirectional .*\(layers=None means every layer\)"):
        bidirectional_image_attention(model, inputs)
    with pytest.raises(InputError, match=refusal):
        recovery_blocked(model, inputs)
    metric = CacheMetric(lambda acts, inp: acts["logits"][:, -1].norm(dim=-1))
    with pytest.raises(InputError, match=r"head patching .*" + refusal):
        head_sweep(model, Run(inputs), Run(inputs), metric)
    with pytest.raises(InputError, match=r"head patching .*LLM layers \[2\] are linear"):
        head_sweep(model, Run(inputs), Run(inputs), metric, layers=[0, 2])
    with pytest.raises(HookNameError, match="unknown hook name"):
        patch_conditions(model, Run(inputs), Run(inputs), metric, [Patch("blocks.1.attn.hook_z", heads=(0,))])
    with pytest.raises(UnsupportedModelError, match="layer 1 is a linear-attention layer"):
        model.architecture.llm_attention_scale(model.hf_model, 1)
