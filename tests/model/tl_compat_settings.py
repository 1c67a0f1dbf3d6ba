"""The per-family settings of docs/tl_compat.md and what each row's result must be.

The page shows the LLaVA setting and, per family, the line that builds its model instead; a
family's setting is the page's with that line swapped in. `CHECKS[row](run)` asserts that a row's
call returned the documented kind of thing, and its number where the row states one (sums equal
totals, DLA equals the logit difference, a backward hook's gradient equals autograd's); the rows'
"checked by" notes name the tests that check the rest per family.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

PAGE = Path(__file__).resolve().parents[2] / "docs" / "tl_compat.md"
FAMILIES = ("LLaVA", "Gemma 3", "Qwen2.5-VL", "InternVL")
# how tests/model/test_backward_hooks.py names these families (its list of points off the loss's path)
BACKWARD_HOOKS_NAME = {"LLaVA": "llava", "Gemma 3": "gemma3", "Qwen2.5-VL": "qwen2.5-vl", "InternVL": "internvl3"}
STATUSES = ("works", "differs", "refused")
LLAVA_MODEL_LINE = 'model = HookedMLLM.from_pretrained("tiny-shapes-llava")'
GRAD_ROWS = {19, 20, 21}  # the page: these run with gradients on, every other row under torch.no_grad()
SLOW_ROWS = {59}  # the page: about 6000 forwards on LLaVA, marked slow
ROW = re.compile(r"^\| (\d+) \| `(.+)` \| " + r" \| ".join(["(works|differs|refused)"] * len(FAMILIES)) + r" \|(.*)\|$")
MODEL_LINE = re.compile(r"^- \*\*(" + "|".join(map(re.escape, FAMILIES)) + r")\*\*: `(.+)`$")
REFUSAL = re.compile(r'raises `(\w+)` saying "([^"]+)"')
CHECKED_BY = re.compile(r"(?i:checked by) `(tests/\w+\.py)::(\w+)`")
ATOL = 1e-4  # float32 sums over tens of components, relative to logits of size ~10


@dataclass
class Row:
    number: int
    code: str
    statuses: dict[str, str]
    notes: str


@dataclass
class RowRun:
    family: str
    scope: dict[str, Any]  # the setting's names after the row ran
    result: Any  # the value of the row's last expression (None when it ends with a statement)
    caught: list[warnings.WarningMessage] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        return self.scope[name]


def page() -> str:
    return PAGE.read_text()


def rows() -> list[Row]:
    found = [ROW.match(line) for line in page().splitlines()]
    return [Row(int(m[1]), m[2], dict(zip(FAMILIES, m.groups()[2:-1])), m.groups()[-1]) for m in found if m]


def setting(family: str) -> str:
    """The page's setting, with `family`'s model line in place of LLaVA's."""
    code = page().split("```python\n", 1)[1].split("```", 1)[0]
    assert LLAVA_MODEL_LINE in code, "the setting builds the LLaVA model"
    lines = dict(m.groups() for m in map(MODEL_LINE.match, page().splitlines()) if m)
    assert set(lines) == set(FAMILIES), f"the page gives a model line for each family, not only {sorted(lines)}"
    return code.replace(LLAVA_MODEL_LINE, lines[family])


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5)


def logit_difference(run: RowRun) -> torch.Tensor:
    """The logit difference at the last position, less the unembedding bias's share (no component's)."""
    logits, right, wrong, b_U = run.logits, run.right, run.wrong, run.model.b_U
    return logits[:, -1, right] - logits[:, -1, wrong] - (b_U[right] - b_U[wrong])


def residual_at_end(run: RowRun) -> torch.Tensor:
    return run.cache["resid_post", run.model.cfg.n_layers - 1][:, -1]


# ------------------------------------------------------------------ per-row checks
def tokens(run: RowRun) -> None:
    with_bos, without = run.result
    assert with_bos.shape[0] == 1 and without.shape == (1, 1)
    assert (with_bos[0, 0] == run.model.tokenizer.bos_token_id) == run.model.cfg.default_prepend_bos


def str_tokens(run: RowRun) -> None:
    text, from_ids, rows_ = run.result
    assert text == from_ids and isinstance(text[0], str)  # a [1, pos] tensor squeezed to one list, as TL
    assert len(rows_) == 2 and all(len(row) == run.inputs.input_ids.shape[1] for row in rows_)
    placeholders = (run.inputs.input_ids[0] == run.model.cfg.image_token_id).nonzero().flatten().tolist()
    assert all(rows_[0][p].startswith("<img0 ") for p in placeholders), "image tokens named by image and cell"


def token_position(run: RowRun) -> None:
    word, image = run.result
    assert run.model.to_str_tokens("what colour is the circle ?")[word] == "circle"
    assert image == (run.one.input_ids[0] == run.model.cfg.image_token_id).nonzero()[0, 0]


def text_forward(run: RowRun) -> None:
    loss, logits = run.result
    assert loss.ndim == 0 and logits.shape[:2] == run.model.to_tokens("what colour is the circle ?", prepend_bos=False).shape


def image_forward(run: RowRun) -> None:
    logits, loss = run.result
    close(logits, run.logits)
    assert loss.ndim == 0


def loss_per_token(run: RowRun) -> None:
    ids = run.inputs.input_ids
    assert run.result.shape == (2, ids.shape[1] - 1)
    assert (run.result[ids[:, 1:] == run.model.cfg.image_token_id] == 0).all(), "image tokens are no targets"


def generate_images(run: RowRun) -> None:
    assert isinstance(run.result, list) and len(run.result) == 1 and isinstance(run.result[0], str)


def generate_text(run: RowRun) -> None:
    assert isinstance(run.result, str) and run.result.startswith("what colour is the")


def run_with_cache(run: RowRun) -> None:
    logits, cache = run.result
    assert torch.equal(logits, run.logits)
    assert any(k.startswith("vision.") for k in cache.keys()) and "adapter.hook_out" in cache.keys()


def cache_options(run: RowRun) -> None:
    residual, cache = run.result
    assert list(cache.keys()) == ["blocks.0.hook_resid_post"]
    close(cache["blocks.0.hook_resid_post"], residual[0])
    assert residual.shape == (1, run.one.input_ids.shape[1], run.model.cfg.d_model), "stopped before the unembedding"


def pattern_filter(run: RowRun) -> None:
    _, cache = run.result
    assert all(name.endswith("hook_pattern") for name in cache.keys())
    assert any(name.startswith("vision.") for name in cache.keys())


def run_with_hooks(run: RowRun) -> None:
    loss, nothing = run.result
    close(loss, run.model(run.inputs, return_type="loss"))
    assert nothing is None


def hook_layer(run: RowRun) -> None:
    cfg = run.model.cfg
    assert sorted(run.layers) == sorted([*range(cfg.n_layers), *range(cfg.vision.n_layers)])


def hooks_context(run: RowRun) -> None:
    assert not (run.edited == run.logits).all(), "the hook edited the forward"
    close(run.model(run.inputs), run.logits)  # and is gone after the block


def hook_point_add_hook(run: RowRun) -> None:
    _, cache = run.result
    assert (cache["z", 0] == 0).all()


def reset_hooks(run: RowRun) -> None:
    close(run.result, run.logits)


def backward_points(run: RowRun) -> None:
    model = run.model
    expected = {f"blocks.{l}.hook_{kind}" for l in range(model.cfg.n_layers) for kind in ("resid_pre", "attn_out", "mlp_out")}
    assert expected <= set(run.grads)
    assert all(run.grads[name].shape == run.cache[name].shape for name in expected)


def backward_scale(run: RowRun) -> None:
    """Every `hook_scale` of the LLM fires backward, and the final norm's and block 0's equal
    autograd's gradient of the loss with respect to that scale."""
    model = run.model
    on_path = {n for n in model.hook_names() if n.endswith("hook_scale") and not n.startswith("vision.")}
    assert on_path <= set(run.grads), f"never fired: {sorted(on_path - set(run.grads))[:4]}"
    seen: dict[str, torch.Tensor] = {}

    def keep(scale: torch.Tensor, hook) -> None:
        scale.retain_grad()
        seen[hook.name] = scale

    names = ["ln_final.hook_scale", "blocks.0.ln1.hook_scale"]
    with torch.enable_grad():
        model.run_with_hooks(run.inputs, return_type="loss", fwd_hooks=[(n, keep) for n in names]).backward()
    for name in names:
        close(run.grads[name], seen[name].grad)


def backward_run_with_hooks(run: RowRun) -> None:
    name = "blocks.1.hook_resid_pre"
    assert set(run.grads) == {name} and run.grads[name].shape == run.cache[name].shape


def context(run: RowRun) -> None:
    close(run.result, run.cache["resid_pre", 0].norm())


def hook_names(run: RowRun) -> None:
    name, attention = run.result
    assert name == "blocks.0.ln1.hook_scale" and attention is run.model.mod_dict["blocks.0.attn"]


def cfg_sizes(run: RowRun) -> None:
    *sizes, device, kv_heads = run.result
    assert all(isinstance(size, int) and size > 0 for size in sizes)
    assert torch.device(device) == run.logits.device and run.model.cfg.n_heads % kv_heads == 0


def cfg_tl_fields(run: RowRun) -> None:
    n_ctx, act_fn, prepend, tokenizer_prepends = run.result
    assert n_ctx == run.model.context_length and isinstance(act_fn, str)
    assert isinstance(prepend, bool) and isinstance(tokenizer_prepends, bool)


def query_weights(run: RowRun) -> None:
    *_, W_Q, b_Q, block_W_Q, normalized = run.result
    assert torch.equal(block_W_Q, W_Q[0])
    close(torch.einsum("bpd,hde->bphe", normalized, W_Q[0]) + b_Q[0], run.cache["q", 0])


def output_weights(run: RowRun) -> None:
    W_O, b_O = run.result
    cfg = run.model.cfg
    assert W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model) and b_O.shape == (cfg.n_layers, cfg.d_model)


def embedding_weights(run: RowRun) -> None:
    W_U, b_U, unembed_W_U, embed_W_E, W_E = run.result
    assert torch.equal(W_U, unembed_W_U) and torch.equal(W_E, embed_W_E)
    ids = run.inputs.input_ids
    text = ids != run.model.cfg.image_token_id
    close(run.model.embed(ids)[text], run.cache["hook_embed"][text])  # what enters the residual at text tokens
    close(run.model.unembed(run.model.ln_final(residual_at_end(run))), run.logits[:, -1])
    head = run.model.hf_model.get_output_embeddings().weight  # TL's fold_ln: the final norm's weight in W_U
    close(W_U, head.T * run.model.ln_final.w[:, None])
    assert W_U.shape == (run.model.cfg.d_model, run.model.cfg.d_vocab) and b_U.shape == (run.model.cfg.d_vocab,)


def factored(run: RowRun) -> None:
    OV, eigenvalues, full = run.result
    d_vocab = run.model.cfg.d_vocab
    assert full.shape == (d_vocab, d_vocab) and eigenvalues.shape == (run.model.cfg.d_head,)
    close(full.AB, run.model.W_E @ OV.AB @ run.model.W_U)


def directions(run: RowRun) -> None:
    model = run.model
    close(run.result, model.W_U[:, [run.right, run.wrong]].T)  # columns of the folded W_U, as in TL


def named_parameters(run: RowRun) -> None:
    assert torch.equal(run.result["embed.W_E"], run.model.W_E)
    assert any(name.startswith("vision.") for name in run.result)


def attn_result(run: RowRun) -> None:
    result = run.result
    cfg = run.model.cfg
    assert result.shape == (*run.inputs.input_ids.shape, cfg.n_heads, cfg.d_model)
    if run.family != "Gemma 3":  # Gemma 3's heads sum to its post-attention norm's input
        close(result.sum(-2) + run.model.b_O[0], run.cache["attn_out", 0])


def compatibility_mode(run: RowRun) -> None:
    assert any("fold_ln" in str(w.message) for w in run.caught), "it says what it does not do"
    close(run.model(run.inputs), run.logits)


def frozen(run: RowRun) -> None:
    assert not any(p.requires_grad for p in run.model.hf_model.parameters())


def cache_access(run: RowRun) -> None:
    by_name, by_key, keys, cache_dict, iterated = run.result
    assert torch.equal(by_name, by_key) and keys == iterated == list(cache_dict)


def accumulated(run: RowRun) -> None:
    stack, labels = run.result
    assert len(labels) == stack.shape[0] == 2 * run.model.cfg.n_layers + 1
    close(stack[-1], residual_at_end(run))


def logit_lens(run: RowRun) -> None:
    close(run.result[-1], run.logits[:, -1])


def decompose(run: RowRun) -> None:
    stack, labels = run.result
    assert len(labels) == stack.shape[0]
    close(stack.sum(0)[:, -1], residual_at_end(run))


def head_stack(run: RowRun) -> None:
    stack, labels = run.result
    cfg = run.model.cfg
    assert len(labels) == stack.shape[0] == cfg.n_layers * cfg.n_heads and stack.shape[1:] == (2, cfg.d_model)


def dla(run: RowRun) -> None:
    close(run.result.sum(0), logit_difference(run))


def logit_attrs(run: RowRun) -> None:
    close(run.result.sum(0), logit_difference(run))


def full_decomposition(run: RowRun) -> None:
    (stack, labels), projected = run.result
    assert len(labels) == stack.shape[0]
    close(stack.sum(0), residual_at_end(run))
    close(projected.sum(0)[:, 0] + run.model.b_U[run.right], run.logits[:, -1, run.right])


def head_results(run: RowRun) -> None:
    fresh = run.scope["fresh"]
    cfg = run.model.cfg
    assert fresh["blocks.0.attn.hook_result"].shape == (*run.inputs.input_ids.shape, cfg.n_heads, cfg.d_model)


def one_row(run: RowRun) -> None:
    assert run.result["blocks.0.hook_resid_pre"].shape == (run.one.input_ids.shape[1], run.model.cfg.d_model)


def moved(run: RowRun) -> None:
    assert run.result is run.cache and run.cache["resid_pre", 0].device == torch.device("cpu")


def stacked(run: RowRun) -> None:
    assert run.result.shape[0] == run.model.cfg.n_layers
    assert torch.equal(run.result[1], run.cache["pattern", 1])


def neuron_stack(run: RowRun) -> None:
    cfg = run.model.cfg
    assert run.result.shape == (cfg.n_layers * cfg.d_mlp, 2, cfg.d_model)
    if run.family != "Gemma 3":  # Gemma 3's neurons sum through its post-MLP norm (tests/model/test_decompositions.py)
        last = cfg.n_layers - 1
        close(run.result[-cfg.d_mlp:].sum(0) + run.model.blocks[last].mlp.b_out, run.cache["mlp_out", last][:, -1])


def tl_cache_decompose(run: RowRun) -> None:
    close(run.result, run.cache.decompose_resid(layer=-1, pos_slice=-1))


def tl_cache_dla(run: RowRun) -> None:
    close(run.result.sum(0), logit_difference(run))


def act_names(run: RowRun) -> None:
    assert all(name in run.model.hook_dict for name in run.result)


def single_token(run: RowRun) -> None:
    assert run.result == int(run.right)


def to_string(run: RowRun) -> None:
    assert run.result == run.model.tokenizer.decode(run.inputs.input_ids[0, -3:])


def prints_a_table(run: RowRun) -> None:
    assert run.result is None  # it prints its table, as TL


def refused(run: RowRun) -> None:
    raise AssertionError("a refused row raises before it returns")


def patch_layer_head(run: RowRun) -> None:
    cfg = run.model.cfg
    assert run.result.shape == (cfg.n_layers, cfg.n_heads)
    assert (run.result - run.metric(run.model(run.corrupted))).abs().max() > 1e-6, "the patches moved the metric"


def patch_layer_pos(run: RowRun) -> None:
    cfg = run.model.cfg
    assert run.result.shape == (cfg.n_layers, run.inputs.input_ids.shape[1])
    # the clean residual put in at the last position of block 0 is the clean run from there on
    close(run.result[0, -1], run.metric(run.logits))


def patch_by_pos(run: RowRun) -> None:
    assert run.result.shape == (len(run.scope["cells"]),)
    assert (run.result - run.metric(run.model(run.corrupted))).abs().max() > 1e-6


def patch_block_every(run: RowRun) -> None:
    cfg = run.model.cfg
    assert run.result.shape == (3, cfg.n_layers, run.inputs.input_ids.shape[1])
    close(run.result[0, 0, -1], run.metric(run.logits))


def patch_head_every(run: RowRun) -> None:
    cfg = run.model.cfg
    assert run.result.shape == (5, cfg.n_layers, cfg.n_heads)


def patch_head_by_pos_every(run: RowRun) -> None:
    cfg = run.model.cfg
    assert run.result.shape == (5, cfg.n_layers, run.inputs.input_ids.shape[1], cfg.n_heads)


def attention_patterns(run: RowRun) -> None:
    tokens, attention = run.result["tokens"], run.result["attention"]
    assert all(isinstance(t, str) for t in tokens) and attention.shape[1:] == (len(tokens), len(tokens))
    close(attention.sum(-1), torch.ones_like(attention.sum(-1)))


def generate_in_hooks(run: RowRun) -> None:
    model = run.model
    forced = int((model.W_U.T @ model.W_U[:, run.right] + model.b_U).argmax())  # what the edited norm output reads as
    assert run.answer[0, -3:].tolist() == [forced] * 3


def persistent_hook(run: RowRun) -> None:
    assert torch.equal(run.first, run.second) and not torch.equal(run.first, run.logits)


def every_point_edits(run: RowRun) -> None:
    from test_backward_hooks import off_the_loss_path

    model = run.model
    base = model(run.one)
    off = off_the_loss_path(BACKWARD_HOOKS_NAME[run.family], model)
    unmoved = [name for name, logits in run.edited.items() if name not in off and torch.equal(logits, base)]
    assert set(run.edited) == set(model.hook_dict) and not unmoved, f"edits that never reach the logits: {unmoved[:5]}"


CHECKS: dict[int, Callable[[RowRun], None]] = {
    1: tokens, 2: str_tokens, 3: single_token, 4: to_string,
    5: token_position, 6: text_forward, 7: image_forward, 8: loss_per_token, 9: generate_images, 10: generate_text,
    11: run_with_cache, 12: cache_options, 13: pattern_filter, 14: run_with_hooks, 15: hook_layer, 16: hooks_context,
    17: hook_point_add_hook, 18: reset_hooks, 19: backward_points, 20: backward_scale, 21: backward_run_with_hooks,
    22: context, 23: hook_names, 24: cfg_sizes, 25: cfg_tl_fields, 26: query_weights, 27: output_weights,
    28: embedding_weights, 29: factored, 30: directions, 31: named_parameters, 32: attn_result,
    33: compatibility_mode, 34: frozen, 35: cache_access, 36: accumulated, 37: logit_lens, 38: decompose,
    39: head_stack, 40: dla, 41: logit_attrs, 42: full_decomposition, 43: head_results, 44: one_row, 45: moved,
    46: stacked, 47: neuron_stack, 48: tl_cache_decompose, 49: tl_cache_dla, 50: act_names, 51: prints_a_table,
    52: refused, 53: patch_layer_head, 54: patch_layer_pos, 55: patch_layer_head, 56: patch_by_pos,
    57: patch_block_every, 58: patch_head_every, 59: patch_head_by_pos_every, 60: attention_patterns,
    61: generate_in_hooks, 62: persistent_hook, 63: every_point_edits,
}
