"""The LLM's final norm follows one convention, TransformerLens's `fold_ln`: its weight lives in
`W_U` / `b_U`, and `ln_final.hook_normalized`, `apply_ln_to_stack(stack, -1)`,
`accumulated_resid(apply_ln=True)` and calling `model.ln_final` all give the residual normalised
without it. So TL's idioms (the logit lens, DLA through `tokens_to_residual_directions`) apply the
weight once, with our cache and with TL's own `ActivationCache`, at image tokens too. Each family's
final-norm weight is randomised, so a weight applied twice (or not at all) shows."""

from __future__ import annotations

import pytest
import torch
from conftest import random_images
from transformer_lens import ActivationCache

from mmlens import HookedMLLM
from mmlens.errors import HookNameError
from mmlens.testing import tiny_llava
from mmlens.testing_families import tiny_gemma3, tiny_qwen2_vl

FAMILIES = {
    "llava": lambda: tiny_llava(vision="clip"),
    "gemma3": tiny_gemma3,
    "qwen2.5-vl": lambda: tiny_qwen2_vl("2.5"),
}
PROMPTS = ["what is in the image ?", "how many", "the colour of the left shape is ?"]
RIGHT, WRONG = 5, 7


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request):
    hf_model, processor = FAMILIES[request.param]()
    processor.tokenizer.padding_side = "left"
    norm = hf_model.model.language_model.norm
    with torch.no_grad():  # a weight far from ones, so applying it twice cannot pass for once
        norm.weight.add_(0.5 * torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(1)))
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(3), PROMPTS)
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs)
    assert model.layout(inputs).image_token_mask().any(), "the batch has image tokens"
    return model, inputs, logits, cache


def head_weight(model: HookedMLLM) -> torch.Tensor:
    return model.hf_model.get_output_embeddings().weight  # [d_vocab, d_model], the unfolded lm_head


def logit_difference(model: HookedMLLM, logits: torch.Tensor) -> torch.Tensor:
    """logits[right] - logits[wrong] at every position, less the unembedding bias's share."""
    return logits[..., RIGHT] - logits[..., WRONG] - (model.b_U[RIGHT] - model.b_U[WRONG])


@torch.no_grad()
def test_tl_idiom_gives_the_logit_difference_without_a_double_weight(run):
    model, _, logits, cache = run
    directions = model.tokens_to_residual_directions(torch.tensor([RIGHT, WRONG]))
    close(directions, model.W_U[:, [RIGHT, WRONG]].T)
    close(model.W_U, head_weight(model).T * model.ln_final.w[:, None])
    final = cache.accumulated_resid(layer=-1, apply_ln=True)[-1]
    close(final @ (directions[0] - directions[1]), logit_difference(model, logits))
    dla = cache.apply_ln_to_stack(cache.decompose_resid(layer=-1), layer=-1) @ (directions[0] - directions[1])
    close(dla.sum(0), logit_difference(model, logits))


@torch.no_grad()
def test_final_norm_output_through_the_folded_unembedding_is_the_logits(run):
    model, _, logits, cache = run
    normalized, residual = cache["ln_final.hook_normalized"], cache["resid_post", -1]
    close(normalized @ model.W_U + model.b_U, logits)
    close(model.unembed(normalized), logits)
    # one convention: the hook, the cache's norm of a stack and the callable norm hold the same
    close(cache.apply_ln_to_stack(residual[None], layer=-1)[0], normalized)
    close(cache.accumulated_resid(layer=-1, apply_ln=True)[-1], normalized)
    assert torch.equal(model.ln_final(residual), normalized)
    # Hugging Face's own final norm output is that times the weight
    hidden = model.hf_model(**run[1].hf_kwargs(), output_hidden_states=True).hidden_states[-1]
    close(normalized * model.ln_final.w, hidden)


@torch.no_grad()
def test_logit_lens_and_tl_cache_end_at_the_logits(run):
    model, _, logits, cache = run
    stack = cache.accumulated_resid(layer=-1, incl_mid=True, apply_ln=True)
    close(stack[-1] @ model.W_U + model.b_U, logits)
    lens, _ = cache.logit_lens(incl_mid=True)
    close(lens, model.unembed(stack))
    close(lens[-1], logits)
    # TransformerLens's own class over our cache: the same numbers at every token, image tokens included
    tl_cache = ActivationCache(dict(cache.cache_dict), model)
    close(tl_cache.accumulated_resid(layer=-1, incl_mid=True, apply_ln=True), stack)
    parts = cache.decompose_resid(layer=-1)
    close(tl_cache.apply_ln_to_stack(parts, layer=-1), cache.apply_ln_to_stack(parts, layer=-1))
    tl_final = tl_cache.accumulated_resid(layer=-1, apply_ln=True)[-1]
    close(model.unembed(tl_final), logits)
    difference = model.tokens_to_residual_directions(RIGHT) - model.tokens_to_residual_directions(WRONG)
    close(tl_final @ difference, logit_difference(model, logits))


@torch.no_grad()
def test_an_edit_at_the_final_norm_moves_the_logits_as_the_weight_says(run):
    model, inputs, logits, _ = run
    row, position = 1, -2
    direction = model.tokens_to_residual_directions(RIGHT)

    def to_direction(normalized, hook):
        normalized[row, position] = direction
        return normalized

    edited = model.run_with_hooks(inputs, fwd_hooks=[("ln_final.hook_normalized", to_direction)])
    # by hand from the Hugging Face parameters: the head reads the edit times the norm's weight
    head = model.hf_model.get_output_embeddings()
    close(edited[row, position], head(direction * model.ln_final.w))
    bare = model(inputs)
    untouched = model.run_with_hooks(inputs, fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: x)])
    assert torch.equal(untouched, bare), "a hook that edits nothing leaves Hugging Face's logits bit-identical"
    others = torch.ones(logits.shape[:2], dtype=torch.bool)
    others[row, position] = False
    assert torch.equal(edited[others], bare[others]), "the other positions keep Hugging Face's logits exactly"


def test_the_gradient_at_the_final_norm_carries_the_weight(run):
    model, inputs, _, _ = run
    received = []
    model.add_hook("ln_final.hook_normalized", lambda grad, hook: received.append(grad.detach()), "bwd")
    try:
        model(inputs)[:, -1, RIGHT].sum().backward()
    finally:
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
    (grad,) = received
    expected = torch.zeros_like(grad)
    expected[:, -1] = model.tokens_to_residual_directions(RIGHT).detach()  # d logit / d normalized: a folded W_U column
    close(grad, expected)


def test_the_bridge_final_norm_output_is_refused_not_mapped_to_another_quantity(run):
    """The bridge's `ln_final.hook_out` is after the weight, ours before it: refused with the remedy."""
    model = run[0]
    with pytest.raises(HookNameError, match=r"ln_final\.hook_normalized \(times model\.ln_final\.w"):
        model.resolve_hook_name("ln_final.hook_out")
    assert model.resolve_hook_name("blocks.0.ln1.hook_out") == "blocks.0.ln1.hook_normalized"  # weighted, as the bridge's


def test_a_layernorm_final_norm_folds_its_bias_into_b_u():
    """No family of the tier ends its LLM with a LayerNorm, so the bias's share of the fold
    (`b_U + b @ lm_head.weight.T`) runs here on a real `nn.LayerNorm` and head, hooked as the model's."""
    from mmlens.model.runtime.norms import FinalNormHooks, instrument_norm
    from mmlens.model.weights import Unembed

    torch.manual_seed(0)
    norm, head = torch.nn.LayerNorm(16), torch.nn.Linear(16, 11)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    hooks = FinalNormHooks()
    instrument_norm(norm, hooks, "LN")
    unembed, x = Unembed(head, hooks), torch.randn(3, 5, 16)
    with torch.no_grad():
        reference = head(norm(x))
        seen = []
        hooks.hook_normalized.add_hook(lambda value, hook: seen.append(value))
        close(head(norm(x)), reference)  # an unedited hook changes nothing
        normalized = seen[0]
        close(normalized @ unembed.W_U + unembed.b_U, reference)
        close(unembed(normalized), reference)
        close(unembed.b_U, head.bias + norm.bias @ head.weight.T)
        hooks.hook_normalized.remove_hooks()
        delta = torch.zeros_like(x)
        delta[1, 2] = torch.randn(16)
        hooks.hook_normalized.add_hook(lambda value, hook: value + delta)
        edited = head(norm(x))
        hooks.hook_normalized.remove_hooks()
    close(edited, reference + (delta * norm.weight) @ head.weight.T)
