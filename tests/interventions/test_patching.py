"""Activation patching with images: batched conditions equal one-at-a-time patching, patches land
exactly where asked, a run patched into itself is unchanged, and bad inputs fail clearly."""

from __future__ import annotations

import pytest
import torch

from mmlens.errors import InputError
from mmlens.interventions import TokenGroup
from mmlens.interventions.corruptions import anchors_removed, counterfactual_images, derangement, recovery_blocked
from mmlens.interventions.patching import (
    Patch,
    Run,
    baseline,
    check_same_layout,
    head_sweep,
    layer_position_sweep,
    patch_conditions,
    repeat_inputs,
    run_and_collect,
)
from mmlens.interventions.patching_metrics import CacheMetric, logit_difference
from mmlens.interventions.shared_forward import rows_joining

from conftest import random_images


def _metric(model):
    """Logit difference of two vocabulary entries at the last token (differentiable, per row)."""
    return logit_difference(answer=5, wrong=7)


def _counterfactual(tiny, seed=1):
    inputs = tiny.inputs
    return counterfactual_images(tiny.model, inputs, random_images(inputs.layout.n_images, seed=seed))


@torch.no_grad()
def test_repeated_inputs_give_repeated_outputs(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    repeated = repeat_inputs(inputs, 3)
    assert repeated.layout.batch_size == 3 * len(inputs) and repeated.layout.n_images == 3 * inputs.layout.n_images
    spans = repeated.layout.spans
    assert [s.image_index for s in spans] == list(range(3 * inputs.layout.n_images))
    assert spans[-1].row == 3 * len(inputs) - 1
    logits = model(repeated)
    torch.testing.assert_close(logits, model(inputs).repeat(3, 1, 1), atol=1e-5, rtol=0)


@torch.no_grad()
def test_batched_head_sweep_equals_one_head_at_a_time(tiny_clip):
    """16 heads x 4 layers in chunks of 8 (one forward each) vs one forward per head; and one head
    against a hand-written hook, so the shared machinery is not compared with itself only."""
    model = tiny_clip.model
    clean = Run(tiny_clip.inputs)
    corrupted = recovery_blocked(model, tiny_clip.inputs)
    metric = _metric(model)
    batched = head_sweep(model, clean, corrupted, metric, chunk_size=8)
    sequential = head_sweep(model, clean, corrupted, metric, chunk_size=1)
    assert batched.shape == (model.cfg.n_layers, model.cfg.llm.n_heads, len(tiny_clip.inputs))
    # one replica per forward vs 8 replicas in one batch: the same maths, only BLAS blocking can
    # reorder float sums (measured: exactly equal on CPU here; 1e-5 bounds float32 reordering)
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=0)
    assert (batched - baseline(model, corrupted, metric)).abs().max() > 1e-3, "some head must matter"

    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    source = run_and_collect(model, clean, names)
    ko = corrupted.edit(tiny_clip.inputs)
    for layer in range(model.cfg.n_layers):  # copies skip the attention of the layer they patch
        for head in range(model.cfg.llm.n_heads):
            def put_head(z, hook, head=head):
                z = z.clone()
                z[:, :, head] = source[hook.name][:, :, head]
                return z

            by_hand = model.run_with_hooks(tiny_clip.inputs, fwd_hooks=[*ko.hooks, (names[layer], put_head)])
            expected = metric({"logits": by_hand}, tiny_clip.inputs)
            torch.testing.assert_close(batched[layer, head], expected, atol=1e-5, rtol=0)


class _GateByPattern:
    """An edit that carries state inside a block: layer 1's z scaled by its own pattern's mean row
    maximum, read at hook_pattern and used at hook_z."""

    def __init__(self, inputs):
        self.stash = {}
        self.hooks = [("blocks.1.attn.hook_pattern", self.keep), ("blocks.1.attn.hook_z", self.use)]

    def keep(self, pattern, hook):
        self.stash["pattern"] = pattern

    def use(self, z, hook):
        return z * (1 + self.stash.pop("pattern").amax(-1).mean((1, 2)))[:, None, None, None]


@torch.no_grad()
@pytest.mark.parametrize("edit", ["halve head 3's z", "shift resid_pre", "gate by pattern"])
def test_a_target_edit_at_the_join_point_applies_once(tiny_clip, edit):
    """Copies resume from the target's residual and z as they reach their hooks, before its edit
    acts there (the edit applies again in the copies' forward), and an edit that keeps state
    from a block's pattern to its z is made for one number of copies there: every head equals a
    full forward patched by hand, one head per forward and in the default chunks."""
    model, inputs = tiny_clip.model, tiny_clip.inputs
    hooks = {"halve head 3's z": [("blocks.1.attn.hook_z", lambda z, hook: z * torch.tensor([1, 1, 1, 0.5]).view(1, 1, -1, 1))],
             "shift resid_pre": [("blocks.1.hook_resid_pre", lambda x, hook: x + 1.0)]}.get(edit)
    target = Run(inputs, (lambda batch: list(hooks)) if hooks else _GateByPattern)
    metric = _metric(model)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    source = run_and_collect(model, Run(inputs), names)
    for chunk_size in (1, None):
        swept = head_sweep(model, Run(inputs), target, metric, chunk_size=chunk_size)
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.llm.n_heads):
                def put_head(z, hook, head=head):
                    z = z.clone()
                    z[:, :, head] = source[hook.name][:, :, head]
                    return z

                made = target.edit(inputs)
                own = made if isinstance(made, list) else made.hooks
                logits = model.run_with_hooks(inputs, fwd_hooks=[*own, (names[layer], put_head)])
                torch.testing.assert_close(swept[layer, head], metric({"logits": logits}, inputs), atol=1e-5, rtol=0)
    assert (swept - baseline(model, target, metric)).abs().max() > 1e-3, "some head must matter"


@torch.no_grad()
def test_copies_joining_before_and_after_an_attention_in_one_chunk(tiny_clip):
    """One chunk whose copies join at a block's input (resid_pre, an attention input), after its
    attention (a head's z, the MLP), in a higher block and at the final norm: each equals a full
    forward patched by hand, and the knockout holds in every forward."""
    model, inputs = tiny_clip.model, tiny_clip.inputs
    clean, corrupted = Run(inputs), recovery_blocked(model, inputs)
    metric = _metric(model)
    conditions = [Patch("blocks.1.attn.hook_z", heads=(0,)), Patch("blocks.1.hook_resid_pre"),
                  Patch("blocks.0.mlp.hook_post"), Patch("blocks.1.hook_resid_mid"), Patch("blocks.1.attn.hook_v"),
                  [Patch("blocks.0.attn.hook_z", heads=(1,)), Patch("blocks.1.hook_resid_pre")],
                  Patch("blocks.0.attn.hook_pattern"), Patch("ln_final.hook_normalized")]
    values = patch_conditions(model, clean, corrupted, metric, conditions, chunk_size=len(conditions))
    names = sorted({p.hook for c in conditions for p in (c if isinstance(c, list) else [c])})
    source = run_and_collect(model, clean, names)
    ko = corrupted.edit(inputs)
    for value, condition in zip(values, conditions):
        hooks = []
        for patch in condition if isinstance(condition, list) else [condition]:
            def put(x, hook, heads=patch.heads):
                if heads is None:
                    return source[hook.name]
                x = x.clone()
                x[:, :, list(heads)] = source[hook.name][:, :, list(heads)]
                return x
            hooks.append((patch.hook, put))
        logits = model.run_with_hooks(inputs, fwd_hooks=[*ko.hooks, *hooks])
        torch.testing.assert_close(value, metric({"logits": logits}, inputs), atol=1e-5, rtol=0)
    assert (values - baseline(model, corrupted, metric)).abs().amax(1).min() > 0, "every condition must change something"


@torch.no_grad()
def test_patching_a_full_run_into_itself_changes_nothing(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    metric = _metric(model)
    every_z = [Patch(f"blocks.{l}.attn.hook_z") for l in range(model.cfg.n_layers)]
    every_resid = [Patch(f"blocks.{l}.hook_resid_pre") for l in range(model.cfg.n_layers)]
    values = patch_conditions(model, inputs, inputs, metric, [every_z, every_resid, Patch("adapter.hook_out")])
    torch.testing.assert_close(values, baseline(model, inputs, metric).expand_as(values), atol=1e-5, rtol=0)


@torch.no_grad()
def test_patching_everything_downstream_restores_the_source(tiny_clip):
    """Clean -> corrupted at the last residual stream (all positions) gives the clean metric;
    patching nothing gives the corrupted one."""
    model = tiny_clip.model
    clean, corrupted = Run(tiny_clip.inputs), _counterfactual(tiny_clip)
    metric = _metric(model)
    last = model.cfg.n_layers - 1
    values = patch_conditions(model, clean, corrupted, metric, [Patch(f"blocks.{last}.hook_resid_post")])
    torch.testing.assert_close(values[0], baseline(model, clean, metric), atol=1e-5, rtol=0)
    assert (baseline(model, clean, metric) - baseline(model, corrupted, metric)).abs().max() > 1e-3


@torch.no_grad()
def test_head_patch_touches_only_that_head_and_those_positions(tiny_clip):
    model = tiny_clip.model
    clean, corrupted = Run(tiny_clip.inputs), _counterfactual(tiny_clip)
    name = "blocks.1.attn.hook_z"
    seen = {}
    metric = CacheMetric(lambda acts, inputs: (seen.update(z=acts[name]), acts["logits"][:, -1, 0])[1], hooks=[name])
    group = TokenGroup.box(0, 0, 2, 2)
    patch_conditions(model, clean, corrupted, metric, [Patch(name, group, heads=3)])
    src = run_and_collect(model, clean, [name])[name]
    tgt = run_and_collect(model, corrupted, [name])[name]
    where = group.resolve(tiny_clip.inputs)
    z = seen["z"]
    assert torch.equal(z[:, :, 3][where], src[:, :, 3][where])
    assert torch.equal(z[:, :, 3][~where], tgt[:, :, 3][~where])
    assert torch.equal(z[:, :, :3], tgt[:, :, :3])
    assert not torch.equal(src[:, :, 3][where], tgt[:, :, 3][where])


@torch.no_grad()
def test_layer_position_sweep_restores_with_every_position(tiny_clip):
    model = tiny_clip.model
    clean, corrupted = Run(tiny_clip.inputs), _counterfactual(tiny_clip)
    metric = _metric(model)
    everything = TokenGroup.positions(range(tiny_clip.inputs.input_ids.shape[1]))
    groups = {"image": TokenGroup.image(), "text": TokenGroup.text(), "all": everything}
    values = layer_position_sweep(model, clean, corrupted, metric, groups, layers=[0, 1])
    assert values.shape == (2, 3, len(tiny_clip.inputs))
    torch.testing.assert_close(values[:, 2], baseline(model, clean, metric).expand(2, -1), atol=1e-5, rtol=0)
    # text tokens are identical in both runs before the first layer reads the images
    torch.testing.assert_close(values[0, 1], baseline(model, corrupted, metric), atol=1e-5, rtol=0)


@torch.no_grad()
def test_adapter_patch_by_token_group(tiny_clip):
    model = tiny_clip.model
    clean, corrupted = Run(tiny_clip.inputs), _counterfactual(tiny_clip)
    seen = {}
    name = "blocks.0.hook_resid_pre"
    metric = CacheMetric(lambda acts, inputs: (seen.update(x=acts[name]), acts["logits"][:, -1, 0])[1], hooks=[name])
    group = TokenGroup.box(1, 1, 3, 4)
    patch_conditions(model, clean, corrupted, metric, [Patch("adapter.hook_out", group)])
    src = run_and_collect(model, clean, [name])[name]
    tgt = run_and_collect(model, corrupted, [name])[name]
    where = group.resolve(tiny_clip.inputs)
    assert torch.equal(seen["x"][where], src[where]) and torch.equal(seen["x"][~where], tgt[~where])


@torch.no_grad()
def test_anchor_corruption_replaces_only_anchor_tokens(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    anchors = TokenGroup.box(0, 0, 1, 3)
    mean = torch.full((model.cfg.d_model,), 0.25)
    name = "blocks.0.hook_resid_pre"
    clean = run_and_collect(model, Run(inputs), [name])[name]
    for replacement in ("mean", "resample"):
        run = anchors_removed(model, inputs, anchors, replacement=replacement, mean=mean)
        edited = run_and_collect(model, run, [name])[name]
        where = anchors.resolve(inputs)
        assert torch.equal(edited[~where], clean[~where])
        if replacement == "mean":
            assert torch.equal(edited[where], mean.expand(int(where.sum()), -1))
        else:
            donors = derangement(inputs.layout.n_images, 0)
            spans = inputs.layout.spans
            for span in spans:
                other = spans[int(donors[span.image_index])]
                picked = where[span.row, span.positions]
                assert torch.equal(edited[span.row, span.positions[picked]], clean[other.row, other.positions[picked]])
    assert sorted(derangement(5, 3).tolist()) == list(range(5)) and (derangement(5, 3) != torch.arange(5)).all()


@torch.no_grad()
def test_recovery_blocked_is_verified(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    run = recovery_blocked(model, inputs, layers=(layer for layer in (0, 1)))  # any iterable, a generator too
    made = run.edit(inputs)
    model.run_with_hooks(inputs, fwd_hooks=made.hooks, return_type=None)
    assert made.blocked_mass == {0: 0.0, 1: 0.0}
    # replicas block the same edges (row for row), without measuring them
    replicated = run.edit(repeat_inputs(inputs, 2))
    assert torch.equal(replicated.blocked, made.blocked.repeat(2, 1, 1)) and not replicated.verify
    with pytest.raises(ValueError, match="non-empty subset"):
        recovery_blocked(model, inputs, layers=[99])


def test_layout_mismatch_is_a_clear_error(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    other = model.prepare(random_images(3, seed=5), ["a much longer prompt than any of the others here", "x", "y"])
    with pytest.raises(ValueError, match="share their layout.*shapes"):
        check_same_layout(inputs, other)
    two_images = model.prepare([random_images(2, seed=2)], "what")
    one_each = model.prepare(random_images(1, seed=2), "what is")
    with pytest.raises(ValueError, match="share their layout"):
        patch_conditions(model, two_images, one_each, _metric(model), [Patch("blocks.0.hook_resid_pre")])


def test_bad_patches_and_metrics_are_clear_errors(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    metric = _metric(model)
    with pytest.raises(ValueError, match="per-head hook"):
        patch_conditions(model, inputs, inputs, metric, [Patch("blocks.0.hook_resid_pre", heads=1)])
    with pytest.raises(ValueError, match="out of range"):
        patch_conditions(model, inputs, inputs, metric, [Patch("blocks.0.attn.hook_z", heads=9)])
    with pytest.raises(ValueError, match="one value per batch row"):
        patch_conditions(model, inputs, inputs, CacheMetric(lambda a, i: a["logits"].sum()), [Patch("blocks.0.hook_resid_pre")])
    with pytest.raises(ValueError, match="positions for blocks.0.hook_resid_pre"):
        patch_conditions(model, inputs, inputs, metric, [Patch("blocks.0.hook_resid_pre", torch.ones(2, 2, dtype=torch.bool))])
    with pytest.raises(ValueError, match="hook must be 'z' or 'result'"):
        head_sweep(model, inputs, inputs, metric, hook="pattern")
    by_filter = Run(inputs, lambda batch: [(lambda name: name.endswith("hook_resid_mid"), lambda x, hook: x * 2)])
    with pytest.raises(InputError, match="by hook name"):  # the LLM-only copies could not apply it
        head_sweep(model, inputs, by_filter, metric)


@torch.no_grad()
def test_llm_inputs_embeds_runs_only_the_llm_and_matches_the_full_forward(tiny):
    model, inputs = tiny.model, tiny.inputs
    _, cache = model.run_with_cache(inputs, names_filter=["hook_multimodal_embed", "blocks.1.hook_resid_post"])
    fired = []
    hooks = [("vision.blocks.0.hook_resid_post", lambda x, hook: fired.append(hook.name)),
             ("adapter.hook_out", lambda x, hook: fired.append(hook.name))]
    logits = model.run_with_hooks(inputs, fwd_hooks=hooks, llm_inputs_embeds=cache["hook_multimodal_embed"])
    assert not fired, "vision and adapter must not run"
    torch.testing.assert_close(logits, model(inputs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="llm_inputs_embeds must be"):
        model(inputs, llm_inputs_embeds=cache["hook_multimodal_embed"][:, 1:])


@torch.no_grad()
def test_an_edit_before_the_llm_applies_once_when_copies_run_only_the_llm(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs

    def shift_llm_input(batch):
        return [("hook_multimodal_embed", lambda x, hook: x + 1.0)]

    target = Run(inputs, shift_llm_input)
    metric = CacheMetric(lambda acts, inp: acts["blocks.1.hook_resid_post"].norm(dim=-1).mean(-1), ["blocks.1.hook_resid_post"])
    nothing = Patch("blocks.0.hook_resid_pre", positions=torch.zeros(inputs.input_ids.shape, dtype=torch.bool))
    patched = patch_conditions(model, Run(inputs), target, metric, [nothing, nothing])
    torch.testing.assert_close(patched, baseline(model, target, metric).expand(2, -1), atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_metric_without_logits_stops_at_its_layer_with_the_same_values(tiny_clip):
    """A metric that reads block 1 only lets patched copies stop after block 1 (and start at their
    patched layer): the values equal those of full runs, and patches above block 1 change nothing."""
    model = tiny_clip.model
    clean, corrupted = Run(tiny_clip.inputs), recovery_blocked(model, tiny_clip.inputs)
    hook = "blocks.1.hook_resid_post"
    seen: list[set[str]] = []

    def read(activations, inputs):
        seen.append(set(activations))
        return activations[hook][:, -1].float().pow(2).mean(-1)

    full = head_sweep(model, clean, corrupted, CacheMetric(read, hooks=[hook]), chunk_size=8)
    assert "logits" in seen[-1]
    stopped = head_sweep(model, clean, corrupted, CacheMetric(read, hooks=[hook], reads_logits=False), chunk_size=8)
    assert "logits" not in seen[-1], "the copies ran past the layer the metric reads"
    torch.testing.assert_close(stopped, full, atol=1e-6, rtol=0)
    unpatched = baseline(model, corrupted, CacheMetric(read, hooks=[hook]))
    torch.testing.assert_close(stopped[2:], unpatched.expand_as(stopped[2:]), atol=1e-6, rtol=0)
    assert (stopped[:2] - unpatched).abs().max() > 0.01 * unpatched.abs().max(), "heads below the readout must matter"


@torch.no_grad()
def test_rows_joining_at_their_layer_equal_runs_started_there(tiny_clip):
    """Two copies in one forward joining at blocks 0 and 1: block 0 computes only the first, and
    the second equals a run started at block 1 from the residual it joined with (another image's,
    so a copy that had run block 0 would differ)."""
    model, inputs = tiny_clip.model, tiny_clip.inputs
    rows = len(inputs)
    other = model.prepare(random_images(rows, seed=7), ["what is in the image ?", "how many", "the colour of the left shape is ?"])
    seen: list[int] = []
    with rows_joining(model, {0: rows, 1: 2 * rows}, {1: model(other, stop_at_layer=1)}):
        logits = model.run_with_hooks(repeat_inputs(inputs, 2), llm_inputs_embeds=model(inputs, stop_at_layer=0).repeat(2, 1, 1),
                                      start_at_layer=0, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: seen.append(len(x)))])
    assert seen == [rows], "block 0 must compute only the copy that joined there"
    torch.testing.assert_close(logits[:rows], model(inputs), atol=1e-5, rtol=0)
    expected = model(model(other, stop_at_layer=1), start_at_layer=1, tokens=inputs)
    torch.testing.assert_close(logits[rows:], expected, atol=1e-5, rtol=0)
    assert (logits[rows:] - logits[:rows]).abs().max() > 1e-3, "the joined residual must matter"
    with pytest.raises(InputError, match="not leave"):
        with rows_joining(model, {0: 2 * rows, 1: rows}, rows):
            pass
    with pytest.raises(InputError, match="not all in this stack"):
        with rows_joining(model, {0: rows, model.cfg.n_layers: 2 * rows}, rows):
            pass


@torch.no_grad()
def test_rows_joining_after_an_attention_take_the_given_z(tiny_clip):
    """A copy joining block 1 at hook_z skips that attention (its hooks before z see the first
    copy only) and equals a run whose block-1 z is another image's; copies of the first rows' z
    give the first rows' result."""
    model, inputs = tiny_clip.model, tiny_clip.inputs
    rows = len(inputs)
    other = model.prepare(random_images(rows, seed=7), ["what is in the image ?", "how many", "the colour of the left shape is ?"])
    z_other = run_and_collect(model, Run(other), ["blocks.1.attn.hook_z"])["blocks.1.attn.hook_z"]
    residual = model(inputs, stop_at_layer=1).repeat(2, 1, 1)
    seen: dict[str, int] = {}
    record = [(f"blocks.1.{name}", lambda x, hook: seen.setdefault(hook.name, len(x)) and None)
              for name in ("attn.hook_q", "attn.hook_pattern", "attn.hook_z", "hook_resid_mid")]
    with rows_joining(model, {1: 2 * rows}, rows, attending={1: rows}, joining_z={1: z_other}):
        logits = model.run_with_hooks(repeat_inputs(inputs, 2), llm_inputs_embeds=residual, start_at_layer=1,
                                      fwd_hooks=record)
    assert seen == {"blocks.1.attn.hook_q": rows, "blocks.1.attn.hook_pattern": rows, "blocks.1.attn.hook_z": 2 * rows,
                    "blocks.1.hook_resid_mid": 2 * rows}
    torch.testing.assert_close(logits[:rows], model(inputs), atol=1e-5, rtol=0)
    expected = model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: z_other)])
    torch.testing.assert_close(logits[rows:], expected, atol=1e-5, rtol=0)
    assert (logits[rows:] - logits[:rows]).abs().max() > 1e-3, "the joined z must matter"
    with rows_joining(model, {1: 2 * rows}, rows, attending={1: rows}, joining_z=rows):
        copied = model.run_with_hooks(repeat_inputs(inputs, 2), llm_inputs_embeds=residual, start_at_layer=1)
    torch.testing.assert_close(copied[rows:], copied[:rows], atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="joining_z gives no z"):
        with rows_joining(model, {1: 2 * rows}, rows, attending={1: rows}):
            pass
    with pytest.raises(InputError, match="attention must compute"):  # rows block 0 computed must attend
        with rows_joining(model, {0: rows, 1: 2 * rows}, rows, attending={1: 0}, joining_z={1: z_other}):
            pass
