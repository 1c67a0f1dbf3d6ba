"""Forward arguments and token helpers as TransformerLens defines them, on image inputs."""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.errors import InputError


@torch.no_grad()
def test_stop_and_start_at_layer_split_the_llm_exactly(tiny):
    model, inputs = tiny.model, tiny.inputs
    logits, cache = model.run_with_cache(inputs)
    n = model.cfg.n_layers
    for layer in range(n + 1):
        residual = model(inputs, stop_at_layer=layer)
        expected = cache["resid_pre", layer] if layer < n else cache["resid_post", -1]
        assert torch.equal(residual, expected)
        assert torch.equal(model(residual, start_at_layer=layer, tokens=inputs), logits)
    assert torch.equal(model(inputs, stop_at_layer=-1), cache["resid_pre", n - 1])
    middle = model(cache["resid_pre", 0], start_at_layer=0, stop_at_layer=1, tokens=inputs)
    assert torch.equal(middle, cache["resid_pre", 1])


@torch.no_grad()
def test_start_at_layer_fires_only_the_hooks_it_runs(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    residual = model(inputs, stop_at_layer=1)
    fired = []
    model.run_with_hooks(residual, start_at_layer=1, tokens=inputs, return_type=None,
                         fwd_hooks=[(lambda name: name.endswith("hook_resid_pre") or "embed" in name, lambda x, hook: fired.append(hook.name))])
    assert fired == [f"blocks.{l}.hook_resid_pre" for l in range(1, model.cfg.n_layers)]


@torch.no_grad()
def test_loss_per_token_and_its_mean(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    per_token = model(inputs, return_type="loss", loss_per_token=True)
    assert per_token.shape == (len(inputs), inputs.input_ids.shape[1] - 1)
    mask = inputs.attention_mask.bool()  # TL's rule: the prediction and its target both real
    text = (inputs.input_ids[:, 1:] != model.cfg.image_token_id) & mask[:, 1:] & mask[:, :-1]
    assert (per_token[~text] == 0).all() and (per_token[text] > 0).all()
    torch.testing.assert_close(per_token.sum() / text.sum(), model(inputs, return_type="loss"))
    residual = model(inputs, stop_at_layer=1)
    torch.testing.assert_close(model(residual, start_at_layer=1, tokens=inputs, return_type="loss"), model(inputs, return_type="loss"))


def test_unknown_and_misplaced_keywords_are_errors(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    with pytest.raises(TypeError, match="stop_at_layr"):
        model(inputs, stop_at_layr=1)
    with pytest.raises(InputError, match="prepend_bos"):
        model(inputs, prepend_bos=False)
    with pytest.raises(InputError, match="residual"):
        model(inputs, start_at_layer=1)
    with pytest.raises(InputError, match="outside"):
        model(inputs, stop_at_layer=model.cfg.n_layers + 1)
    with pytest.raises(InputError, match="tokens="):
        model(inputs, tokens=inputs)


@torch.no_grad()
def test_text_input_and_token_helpers(tiny_clip):
    model = tiny_clip.model
    tokenizer = model.tokenizer
    tokens = model.to_tokens("how many")
    assert tokens[0, 0] == tokenizer.bos_token_id
    assert model.to_tokens("how many", prepend_bos=False)[0].tolist() == tokens[0, 1:].tolist()
    assert torch.equal(model("how many"), model(tokens))
    assert not torch.equal(model("how many", prepend_bos=False)[:, -1], model("how many")[:, -1])
    batch = model.to_tokens(["how many", "what"], padding_side="right")
    assert batch[1, 2:].eq(tokenizer.pad_token_id).all()
    # padded text runs with its mask: the short row's logits equal its own unpadded run
    torch.testing.assert_close(model(["how many", "what"], padding_side="right")[1, :2], model("what")[0], atol=1e-5, rtol=0)
    assert model.to_single_token("how") == tokens[0, 1]
    with pytest.raises(InputError, match="2 tokens"):
        model.to_single_token("how many")
    assert model.to_string(tokens[0, 1:]) == "how many"
    assert model.to_string(batch[:, 1:2]) == ["how", "what"]
    assert model.to_str_tokens("how many") == ["<s>", "how", "many"]
    assert model.to_str_tokens(["how", "what"]) == [["<s>", "how"], ["<s>", "what"]]


def test_to_str_tokens_names_image_tokens_by_image_and_cell(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    rows = model.to_str_tokens(inputs)
    assert len(rows) == len(inputs)
    layout = inputs.layout
    rows_, cols_ = layout.grid
    for span in layout.spans:
        names = [rows[span.row][p] for p in span.positions.tolist()]
        assert names[0] == f"<img{span.image_index} r0c0>"
        assert names[-1] == f"<img{span.image_index} r{rows_ - 1}c{cols_ - 1}>"
    assert model.to_str_tokens(inputs.input_ids[0]) == rows[0]


def test_loaded_model_is_in_eval_mode():
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    assert not model.training and not model.hf_model.training


@torch.no_grad()
def test_the_vision_tower_stops_and_starts_at_a_layer(tiny):
    model, inputs = tiny.model, tiny.inputs
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith("vision.blocks") and "resid" in n)
    pixels, n = inputs.pixel_values, model.cfg.vision.n_layers
    final = model.run_vision(pixels)
    assert torch.equal(final, cache["resid_post", -1, "vision"])
    for layer in range(n + 1):
        residual = model.run_vision(pixels, stop_at_layer=layer)
        assert torch.equal(residual, cache["resid_pre", layer, "vision"] if layer < n else final)
        fired = []
        with model.hooks(fwd_hooks=[(lambda name: name.startswith("vision."), lambda x, hook: fired.append(hook.name))]):
            assert torch.equal(model.run_vision(residual, start_at_layer=layer), final)
        assert not [f for f in fired if f == "vision.hook_embed" or (f.startswith("vision.blocks.") and int(f.split(".")[2]) < layer)]
