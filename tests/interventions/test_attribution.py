"""Attribution patching is the first-order term of exact patching: checked against a finite
difference of a partial patch in float64, and it vanishes when source and target agree."""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.interventions import TokenGroup
from mmlens.interventions.attribution import attribution_patching, positions_mask, rank_correlation
from mmlens.interventions.corruptions import counterfactual_images
from mmlens.interventions.patching import Run, head_sweep, repeat_inputs, run_and_collect
from mmlens.interventions.patching_metrics import logit_difference, probe_metric
from mmlens.probing import LinearProbe
from mmlens.testing import tiny_llava

from conftest import random_images


@pytest.fixture(scope="module")
def tiny64():
    """A tiny random LLaVA in float64, so a finite difference can check the gradient tightly (one
    prompt, no padding: HF's float64 additive mask overflows to -inf on padded rows)."""
    hf, processor = tiny_llava(vision="clip", seed=0)
    model = HookedMLLM.from_hf(hf.double(), processor)
    return model, model.prepare(random_images(3, 0), "what is in the image ?")


def test_attribution_is_the_derivative_of_a_partial_patch(tiny64):
    model, inputs = tiny64
    clean = Run(inputs)
    corrupted = counterfactual_images(model, inputs, random_images(inputs.layout.n_images, seed=3))
    metric = logit_difference(answer=5, wrong=7)
    found = attribution_patching(model, clean, corrupted, metric)
    layer, head = 0, 2  # image positions in layer 0 reach the last token through layer 1's attention
    name = f"blocks.{layer}.attn.hook_z"
    src = run_and_collect(model, clean, [name])[name]
    where = TokenGroup.image().resolve(inputs)

    def metric_at(alpha: float) -> torch.Tensor:
        def move(z, hook):
            z = z.clone()
            step = alpha * (src[:, :, head] - z[:, :, head])
            z[:, :, head] += step * where[..., None].to(z.dtype)
            return z
        with torch.no_grad():
            logits = model.run_with_hooks(corrupted.inputs, fwd_hooks=[(name, move)])
        return metric({"logits": logits}, inputs)

    # attention softmax runs in float32 even in a float64 model, so the step cannot be tiny
    eps = 1e-3
    slope = (metric_at(eps) - metric_at(-eps)) / (2 * eps)
    estimate = found.per_head(positions_mask(inputs, TokenGroup.image()))[layer, head]
    torch.testing.assert_close(estimate, slope, rtol=1e-3, atol=5e-5)
    assert slope.abs().max() > 1e-4, "the head must matter for the check to mean anything"


def test_attribution_vanishes_when_source_equals_target(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    found = attribution_patching(model, inputs, inputs, logit_difference(5, 7))
    assert found.values.shape == (model.cfg.n_layers, len(inputs), inputs.input_ids.shape[1], model.cfg.llm.n_heads)
    assert found.values.abs().max() == 0
    torch.testing.assert_close(found.source_metric, found.target_metric)


def test_accuracy_metric_is_refused_and_correlation_is_computed(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    d, n_classes = model.cfg.d_model, 3
    generator = torch.Generator().manual_seed(0)
    probe = LinearProbe(torch.zeros(d), torch.ones(d), torch.randn(d, n_classes, generator=generator), torch.zeros(n_classes))
    labels = torch.randint(0, n_classes, (inputs.layout.n_images, len(inputs.layout.token_grid)), generator=generator)
    other = counterfactual_images(model, inputs, random_images(inputs.layout.n_images, seed=4))
    accuracy = probe_metric(model, probe, "blocks.1.hook_resid_post", inputs, labels, kind="accuracy")
    with pytest.raises(ValueError, match="no gradient"):
        attribution_patching(model, inputs, other, accuracy)
    margin = probe_metric(model, probe, "blocks.1.hook_resid_post", inputs, labels)
    estimate = attribution_patching(model, inputs, other, margin).per_head().mean(-1)
    with torch.no_grad():
        exact = head_sweep(model, inputs, other, margin).mean(-1)
    correlation = rank_correlation(estimate, exact)
    assert -1 <= correlation <= 1 and correlation == rank_correlation(estimate.numpy(), exact.numpy())
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@torch.no_grad()
def test_probe_metric_is_the_mean_true_class_margin_of_the_scored_tokens(tiny_clip):
    model, inputs = tiny_clip.model, tiny_clip.inputs
    d, n_classes, hook = model.cfg.d_model, 4, "blocks.1.hook_resid_post"
    generator = torch.Generator().manual_seed(1)
    probe = LinearProbe(torch.randn(d, generator=generator), torch.rand(d, generator=generator) + 0.5,
                        torch.randn(d, n_classes, generator=generator), torch.randn(n_classes, generator=generator))
    n_tokens = len(inputs.layout.token_grid)
    labels = torch.randint(0, n_classes, (inputs.layout.n_images, n_tokens), generator=generator)
    labels[1] = 255  # an image with nothing labelled scores NaN, not a number
    box = TokenGroup.box(0, 0, 2, 4)
    margin = probe_metric(model, probe, hook, inputs, labels, tokens=box)
    accuracy = probe_metric(model, probe, hook, inputs, labels, tokens=box, kind="accuracy")
    acts = run_and_collect(model, Run(inputs), [hook])
    got, hits = margin(acts, inputs), accuracy(acts, inputs)
    chosen = box.resolve(inputs)
    for k, span in enumerate(inputs.layout.spans):
        keep = chosen[span.row, span.positions] & (labels[k] != 255)
        if not keep.any():
            assert torch.isnan(got[span.row]) and torch.isnan(hits[span.row])
            continue
        logits = probe.logits(acts[hook][span.row, span.positions])[keep]
        truth = labels[k][keep]
        true = logits[torch.arange(len(truth)), truth]
        others = logits.clone()
        others[torch.arange(len(truth)), truth] = float("-inf")
        torch.testing.assert_close(got[span.row], (true - others.max(1).values).mean())
        torch.testing.assert_close(hits[span.row], (logits.argmax(1) == truth).float().mean())

    # copies of the run evaluated at once (patching's chunks) = each copy on its own, NaN rows kept
    copies = 3
    repeated = run_and_collect(model, Run(repeat_inputs(inputs, copies)), [hook])
    repeated[hook] = repeated[hook] + torch.arange(copies, dtype=repeated[hook].dtype).repeat_interleave(len(inputs))[:, None, None]
    for metric in (margin, accuracy):
        every = metric.per_copy(repeated, repeat_inputs(inputs, copies), copies)
        one_by_one = torch.stack([metric({hook: repeated[hook][r * len(inputs):(r + 1) * len(inputs)]}, inputs)
                                  for r in range(copies)])
        torch.testing.assert_close(every, one_by_one, atol=1e-6, rtol=0, equal_nan=True)
    shifted = margin.per_copy(repeated, repeat_inputs(inputs, copies), copies)
    assert not torch.equal(shifted[0], shifted[1]), "the copies differ, so a per-copy mix-up would show"
    with pytest.raises(ValueError, match="copies"):
        margin.per_copy(repeated, repeat_inputs(inputs, copies), 2)
