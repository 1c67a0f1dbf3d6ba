"""A vision feature traced through the adapter into the LLM, and the logit lens drawn over the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlens import HookedMLLM
from mmlens.errors import InputError
from mmlens.sae import logit_lens_maps, trace_vision_feature
from mmlens.testing import tiny_llava
from mmlens.testing.families.llava_next import tiny_llava_next

from conftest import random_images
from test_splice import sae_at

PROMPTS = ["what is in the image ?", "how many shapes ?"]
VISION_POINT = "vision.blocks.0.hook_resid_post"  # the layer the adapter reads (vision_feature_layer=-2)


@pytest.fixture(scope="module")
def llava():
    model = HookedMLLM.from_hf(*tiny_llava())
    return model, model.prepare(random_images(2), PROMPTS)


@pytest.fixture(scope="module")
def llava_next():
    model = HookedMLLM.from_hf(*tiny_llava_next())
    return model, model.prepare(random_images(2, sizes=((40, 70), (64, 30))), PROMPTS)


@torch.no_grad()
def test_an_ablated_vision_feature_moves_exactly_the_tokens_whose_patches_it_fired_on(llava) -> None:
    model, inputs = llava
    vision_sae = sae_at(VISION_POINT, model.cfg.vision.d_model)
    llm_sae = sae_at("blocks.1.hook_resid_post", model.cfg.d_model, seed=1)
    fired = None
    for feature in range(vision_sae.cfg.d_sae):  # one that fires at some patches, not all
        trace = trace_vision_feature(model, vision_sae, inputs, feature, llm_sae=llm_sae)
        fired = trace.vision > 0
        if fired.any() and not fired.all():
            break
    assert fired.any() and not fired.all()
    # LLaVA's projector maps each patch to its own token: the feature reaches those tokens only
    assert torch.equal(trace.token_change > 0, fired)
    assert trace.llm_feature_change.shape == (llm_sae.cfg.d_sae,)
    (best, change), *_ = trace.top_llm_features(3)
    assert change > 0 and change == pytest.approx(float(trace.llm_feature_change.max()))


def test_tracing_refuses_a_non_vision_sae(llava) -> None:
    model, inputs = llava
    with pytest.raises(InputError, match="vision-tower SAE"):
        trace_vision_feature(model, sae_at("adapter.hook_out", model.cfg.d_model), inputs, 0)


@torch.no_grad()
def test_last_lens_entry_is_the_models_own_prediction_at_each_image_token(llava) -> None:
    model, inputs = llava
    lens = logit_lens_maps(model, inputs, token=5)
    assert lens.labels[-1] == "final_post" and len(lens.labels) == model.cfg.n_layers + 1
    probabilities = inputs.layout.gather("llm", model(inputs).softmax(-1))
    torch.testing.assert_close(lens.top_probability[-1], probabilities.max(-1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.token_probability[-1], probabilities[..., 5], atol=1e-5, rtol=0)
    painted = lens.painted(lens.token_probability)
    boxes = inputs.layout.token_grid.boxes
    y0, x0, y1, x1 = boxes[6].tolist()
    assert torch.all(painted[:, :, y0:y1, x0:x1] == lens.token_probability[:, :, 6, None, None])


@torch.no_grad()
def test_lens_over_tiles_paints_each_images_canvas_one_panel_per_layer(llava_next) -> None:
    model, inputs = llava_next
    lens = logit_lens_maps(model, inputs)
    table = inputs.layout.table("llm")
    assert lens.top_token.shape == (model.cfg.n_layers + 1, 2, table.present.shape[1])
    fig = lens.figure(image=1, tokenizer=model.tokenizer)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == model.cfg.n_layers + 1
    assert np.asarray(heatmaps[0].z).shape == tuple(table.canvas[1].tolist())
    assert all(isinstance(w, str) for w in np.asarray(heatmaps[-1].text).ravel())
