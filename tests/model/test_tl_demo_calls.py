"""The TransformerLens demos' calls that used to fail raw, on LLaVA, Gemma 3, Qwen2.5-VL and
InternVL: `cfg`'s TL fields, `get_token_position`, `loss_fn`, `tl_named_parameters`,
`enable_compatibility_mode`, `generate` with TL's arguments, `hook.layer()` on every stage's
names, and TL's `patching.get_act_patch_*` given a `MultimodalInputs` (or refusing ids alone)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from transformer_lens import patching

from mmlens import HookedMLLM, MultimodalInputs
from mmlens.errors import InputError
from mmlens.testing import tiny_llava
from mmlens.testing_families import tiny_gemma3, tiny_internvl, tiny_qwen2_vl

from conftest import random_images

try:  # TL 4 moved its utilities
    from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss
except ImportError:  # pragma: no cover - TL 3
    from transformer_lens.utils import lm_cross_entropy_loss

FAMILIES = {
    "llava": lambda: tiny_llava(vision="clip"),
    "gemma3": lambda: tiny_gemma3(),
    "qwen2.5-vl": lambda: tiny_qwen2_vl("2.5"),
    "internvl": lambda: tiny_internvl(),
}
PROMPTS = ["what is in the image ?", "how many"]
SQUARE = ((32, 32),)  # one size for every image: clean and corrupted runs then have the same positions


@dataclass
class Demo:
    model: HookedMLLM
    inputs: MultimodalInputs  # two rows, left-padded
    one: MultimodalInputs  # one row, one image


@pytest.fixture(scope="module", params=list(FAMILIES))
def demo(request) -> Demo:
    hf_model, processor = FAMILIES[request.param]()
    processor.tokenizer.padding_side = "left"
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(2, sizes=SQUARE), PROMPTS)
    assert inputs.attention_mask.min() == 0, "the batch must contain padding"
    return Demo(model, inputs, model.prepare(random_images(1, seed=3, sizes=SQUARE), PROMPTS[0]))


def test_cfg_has_tls_context_activation_and_bos_fields(demo):
    model = demo.model
    text_config = model.hf_model.config.get_text_config()
    assert model.cfg.n_ctx == text_config.max_position_embeddings == model.context_length
    assert model.cfg.act_fn == getattr(text_config, "hidden_act", None) or getattr(text_config, "hidden_activation")
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id
    assert model.cfg.default_prepend_bos == (bos is not None)
    if bos is not None:
        assert model.cfg.default_prepend_bos == (model.to_tokens("a red circle")[0, 0].item() == bos)
    assert model.cfg.tokenizer_prepends_bos == (bos is not None and tokenizer("a")["input_ids"][0] == bos)


def test_get_token_position_in_text_and_at_image_tokens(demo):
    model, one = demo.model, demo.one
    names = model.to_str_tokens("what is in the image")
    word = names[-2]  # "the" as this tokenizer spells it
    assert model.get_token_position(word, "what is in the image") == len(names) - 2
    shift = int(model.cfg.default_prepend_bos)
    assert model.get_token_position(word, "what is in the image", prepend_bos=False) == len(names) - 2 - shift
    row = model.to_str_tokens(one)[0]
    image_names = [(i, name) for i, name in enumerate(row) if name.startswith("<img")]
    assert len(image_names) >= 4
    for position, name in image_names:  # every image token by its name: image, grid cell (or kind)
        assert model.get_token_position(name, one) == position
    placeholders = (one.input_ids[0] == model.cfg.image_token_id).nonzero().flatten()
    assert model.get_token_position(model.cfg.image_token_id, one) == placeholders[0]
    assert model.get_token_position(model.cfg.image_token_id, one.input_ids, mode="last") == placeholders[-1]
    with pytest.raises(InputError, match="does not occur"):
        model.get_token_position("<img7 r0c0>", one)
    with pytest.raises(InputError, match="one sequence"):
        model.get_token_position(model.cfg.image_token_id, demo.inputs)


@torch.no_grad()
def test_loss_fn_is_tls_loss_over_text_targets(demo):
    model, inputs = demo.model, demo.inputs
    logits = model(inputs)
    # TL's own formula on ids without images and without padding
    text = model.to_tokens("a red circle and a blue square")
    text_logits = model(text)
    torch.testing.assert_close(model.loss_fn(text_logits, text), lm_cross_entropy_loss(text_logits, text))
    # with images: TL's padding rule (prediction and target both real), and no image token is a target
    per_token = model.loss_fn(logits, inputs, per_token=True)
    mask = inputs.attention_mask.bool()
    counted = mask[:, :-1] & mask[:, 1:] & (inputs.input_ids[:, 1:] != model.cfg.image_token_id)
    tl_per_token = lm_cross_entropy_loss(logits, inputs.input_ids, inputs.attention_mask, per_token=True)
    torch.testing.assert_close(per_token[counted], tl_per_token[counted])
    assert (per_token[~counted] == 0).all() and (~counted & mask[:, 1:]).any()
    torch.testing.assert_close(model.loss_fn(logits, inputs), tl_per_token[counted].mean())
    torch.testing.assert_close(model(inputs, return_type="loss"), model.loss_fn(logits, inputs))
    with pytest.raises(InputError, match="same batch"):
        model.loss_fn(logits, inputs.input_ids[:, 1:])


def test_tl_named_parameters_are_the_models_weights(demo):
    model = demo.model
    named = dict(model.tl_named_parameters())
    last = model.cfg.n_layers - 1
    for name, value in (("embed.W_E", model.W_E), ("unembed.W_U", model.W_U), ("unembed.b_U", model.b_U),
                        (f"blocks.{last}.attn.W_Q", model.blocks[last].attn.W_Q),
                        (f"blocks.{last}.attn.W_O", model.blocks[last].attn.W_O),
                        (f"blocks.{last}.mlp.W_out", model.blocks[last].mlp.W_out),
                        (f"blocks.{last}.ln1.w", model.blocks[last].ln1.w),
                        ("vision.blocks.0.attn.W_V", model.vision.blocks[0].attn.W_V)):
        assert torch.equal(named[name], value), name
    # as after TL's fold_ln, the final norm's weight lives in W_U only
    assert not any(name.startswith("ln_final.") for name in named)
    head = model.hf_model.get_output_embeddings().weight
    assert torch.equal(named["unembed.W_U"], head.T * model.ln_final.w[:, None])
    grouped = model.cfg.n_key_value_heads < model.cfg.n_heads
    key = f"blocks.0.attn.{'_W_K' if grouped else 'W_K'}"
    assert named[key].shape[0] == model.cfg.n_key_value_heads
    assert sum(n.startswith(f"blocks.{last}.") for n in named) == sum(n.startswith("blocks.0.") for n in named)
    named["blocks.0.attn.W_Q"].sum().backward()  # a view: the gradient reaches the Hugging Face parameter
    source = model.blocks[0].attn._weight_source[0].weight
    try:
        assert source.grad is not None and source.grad.abs().sum() > 0
    finally:
        model.hf_model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_enable_compatibility_mode_says_what_it_does_not_do(demo):
    model, inputs = demo.model, demo.one
    before = model(inputs)
    with pytest.warns(UserWarning, match="fold_ln.*not applied"):
        model.enable_compatibility_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.enable_compatibility_mode(no_processing=True)
        model.enable_compatibility_mode(disable_warnings=True)
    assert torch.equal(model(inputs), before), "nothing about the model changed"


def greedy_by_hand(model: HookedMLLM, inputs: MultimodalInputs | torch.Tensor, n: int) -> torch.Tensor:
    """`n` argmax steps, each a full forward of the grown sequence (one row, no EOS reached)."""
    if isinstance(inputs, MultimodalInputs):
        keywords = inputs.keywords()
    else:
        keywords = {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)}
    for _ in range(n):
        next_token = model(keywords)[:, -1].argmax(-1, keepdim=True)
        keywords["input_ids"] = torch.cat([keywords["input_ids"], next_token], dim=1)
        keywords["attention_mask"] = torch.cat([keywords["attention_mask"], torch.ones_like(next_token)], dim=1)
        keywords.update(model.architecture.extend_by_one_token({k: v for k, v in keywords.items() if k in model.architecture.extra_input_names}))
    return keywords["input_ids"]


@torch.no_grad()
def test_generate_on_text_with_tls_arguments(demo):
    model = demo.model
    prompt = "what is in the"
    tokens = model.to_tokens(prompt)
    expected = greedy_by_hand(model, tokens, 3)
    generated = model.generate(prompt, max_new_tokens=3, do_sample=False, stop_at_eos=False, return_type="tokens")
    assert torch.equal(generated, expected)
    text = model.generate(prompt, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    assert text == model.tokenizer.decode(expected[0], skip_special_tokens=True)
    assert torch.equal(model.generate(tokens, max_new_tokens=3, do_sample=False, stop_at_eos=False), expected)
    # TL samples by default: top_k=1 leaves only the argmax to draw
    assert model.generate(prompt, max_new_tokens=3, top_k=1, stop_at_eos=False) == text
    torch.manual_seed(1)
    first = model.generate([prompt, "a"], max_new_tokens=4, temperature=0.7, top_p=0.9)
    torch.manual_seed(1)
    assert isinstance(first, list) and len(first) == 2 and model.generate([prompt, "a"], max_new_tokens=4, temperature=0.7, top_p=0.9) == first
    with pytest.raises(InputError, match="do_sample=True"):
        model.generate(prompt, max_new_tokens=2, do_sample=False, temperature=0.5)


@torch.no_grad()
def test_generate_on_images_with_tls_arguments(demo):
    model, one = demo.model, demo.one
    expected = greedy_by_hand(model, one, 3)
    for cached in (True, False):
        tokens = model.generate(one, max_new_tokens=3, stop_at_eos=False, use_past_kv_cache=cached, return_type="tokens")
        assert torch.equal(tokens, expected), f"use_past_kv_cache={cached}"
    answer = model.tokenizer.batch_decode(expected[:, one.input_ids.shape[1]:], skip_special_tokens=True)
    assert model.generate(one, max_new_tokens=3, stop_at_eos=False) == answer  # image inputs: greedy answers
    assert model.generate(one, max_new_tokens=3, do_sample=True, top_k=1, stop_at_eos=False) == answer
    whole = model.generate(one, max_new_tokens=3, stop_at_eos=False, return_type="str")
    assert whole == model.tokenizer.batch_decode(expected, skip_special_tokens=True)
    stopped = model.generate(demo.inputs, max_new_tokens=4, eos_token_id=int(expected[0, -3]), return_type="tokens")
    new = stopped[:, demo.inputs.input_ids.shape[1]:]
    after_stop = (new == int(expected[0, -3])).cumsum(1) > 0
    assert (new[after_stop] == int(expected[0, -3])).all(), "a finished row continues with the stop token, as TL"


@torch.no_grad()
def test_the_main_demos_pattern_filter_runs_on_every_stage(demo):
    model, inputs = demo.model, demo.inputs
    layers = {}
    model.run_with_hooks(inputs, return_type=None, fwd_hooks=[
        (lambda name: name.endswith("pattern"), lambda pattern, hook: layers.__setitem__(hook.name, hook.layer()))])
    names = [n for n in model.hook_names() if n.endswith("pattern")]
    assert sorted(layers) == sorted(names) and any(n.startswith("vision.") for n in names)
    assert all(layers[n] == int(n.split("blocks.")[1].split(".")[0]) for n in names)
    with pytest.raises(ValueError, match="no block"):
        model.hook_dict["adapter.hook_out"].layer()
    # the demo itself: induction scores of repeated random text, one row per LLM layer
    torch.manual_seed(0)
    ordinary = [t for t in range(4, model.cfg.d_vocab) if t != model.cfg.image_token_id]
    half = torch.tensor(ordinary)[torch.randperm(len(ordinary))[:6]][None]
    tokens = torch.cat([half, half], dim=1)
    store = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)

    def induction_score_hook(pattern, hook):
        stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - half.shape[1])
        store[hook.layer()] = stripe.mean(dim=(0, 2))

    model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(lambda name: name.endswith("pattern"), induction_score_hook)])
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("pattern"))
    for layer in range(model.cfg.n_layers):
        expected = cache["pattern", layer].diagonal(dim1=-2, dim2=-1, offset=1 - half.shape[1]).mean(dim=(0, 2))
        torch.testing.assert_close(store[layer], expected)


@torch.no_grad()
def test_tls_patching_helpers_take_multimodal_inputs(demo):
    model, inputs = demo.model, demo.inputs
    corrupted = model.prepare(random_images(2, seed=5, sizes=SQUARE), PROMPTS)
    assert corrupted.input_ids.shape == inputs.input_ids.shape
    _, clean_cache = model.run_with_cache(inputs)
    answer = int(model(inputs)[0, -1].argmax())

    def metric(logits):
        return logits[:, -1, answer].mean()

    direct = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    via_view = patching.get_act_patch_attn_head_out_all_pos(model.with_images(corrupted), corrupted.input_ids, clean_cache, metric)
    assert direct.shape == (model.cfg.n_layers, model.cfg.n_heads)
    torch.testing.assert_close(direct, via_view)
    assert (direct - metric(model(corrupted))).abs().max() > 1e-6, "the patches changed something"
    with pytest.raises(InputError, match="with_images"):
        patching.get_act_patch_attn_head_out_all_pos(model, corrupted.input_ids, clean_cache, metric)
