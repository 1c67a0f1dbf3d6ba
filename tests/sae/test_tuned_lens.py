"""The tuned lens on the embedded model: identity before training (the logit lens exactly), a lower
held-out KL to the model's final prediction at every layer after, saved and loaded exactly, and a
lens of another shape refused before any forward."""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.interventions.groups import TokenGroup
from mmlens.sae import TunedLens, logit_lens_maps, train_tuned_lens
from mmlens.sae.tuned_lens import image_token_residuals, lens_kl, lens_log_probs

N_TRAIN, N_HELD_OUT = 32, 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: under load a second thread makes each step 30x slower
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="train", n=N_TRAIN + N_HELD_OUT, seed=0)
    images = [scenes[row]["image"] for row in range(N_TRAIN + N_HELD_OUT)]
    return model, images[:N_TRAIN], images[N_TRAIN:], train_tuned_lens(model, images[:N_TRAIN], steps=200, seed=0)


def test_an_untrained_tuned_lens_draws_exactly_the_logit_lens(trained) -> None:
    model, _, held_out, _ = trained
    inputs = model.prepare(held_out[:2], ["", ""])
    logit, identity = logit_lens_maps(model, inputs, token=3), logit_lens_maps(model, inputs, token=3,
                                                                               lens=TunedLens.for_model(model))
    assert identity.lens == "tuned lens" and logit.lens == "logit lens"
    assert identity.labels == logit.labels
    for field in ("top_token", "top_probability", "token_probability"):
        assert torch.equal(getattr(identity, field), getattr(logit, field)), field
    assert identity.figure(0).layout.title.text.startswith("Tuned lens over image 0")


def test_training_lowers_the_held_out_kl_at_every_layer(trained) -> None:
    model, _, held_out, lens = trained
    residuals = image_token_residuals(model, held_out)  # images the lens never saw
    assert residuals.shape == (model.cfg.n_layers + 1, N_HELD_OUT * 64, model.cfg.d_model)
    logit_kl, tuned_kl = lens_kl(model, residuals), lens_kl(model, residuals, lens)
    assert logit_kl[-1] < 1e-5 and tuned_kl[-1] < 1e-5  # the last entry is the model's own prediction
    assert (tuned_kl[:-1] < 0.75 * logit_kl[:-1]).all(), (logit_kl, tuned_kl)


def test_the_maps_are_the_trained_lens_read_through_the_final_norm(trained) -> None:
    """The drawn maps (the cache's final norm) and the training objective (`model.ln_final`) read alike."""
    model, _, held_out, lens = trained
    inputs = model.prepare(held_out[:2], ["", ""])
    maps, logit = logit_lens_maps(model, inputs, lens=lens), logit_lens_maps(model, inputs)
    residuals = image_token_residuals(model, held_out[:2])
    top = lens_log_probs(model, lens, residuals).exp().max(-1).values
    torch.testing.assert_close(maps.top_probability.flatten(1), top, atol=1e-5, rtol=0)
    assert not torch.allclose(maps.top_probability[:-1], logit.top_probability[:-1], atol=1e-2)
    torch.testing.assert_close(maps.top_probability[-1], logit.top_probability[-1], atol=1e-6, rtol=0)


def test_training_reads_only_the_chosen_tokens(trained) -> None:
    model, train, _, _ = trained
    corner = TokenGroup.box(0, 0, 1, 1)  # the top-left cell of each image's grid
    assert image_token_residuals(model, train[:3], corner).shape[1] == 3
    with pytest.raises(InputError, match="steps"):
        train_tuned_lens(model, train[:2], steps=0)


def test_save_and_load_round_trip_exactly(trained, tmp_path) -> None:
    model, _, held_out, lens = trained
    folder = lens.save(tmp_path / "lens")
    loaded = TunedLens.load(folder, model)
    assert loaded.config() == lens.config() and loaded.config()["model_name"]
    for (name, saved), (_, read) in zip(lens.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(saved, read), name
    inputs = model.prepare(held_out[:1], [""])
    assert torch.equal(logit_lens_maps(model, inputs, lens=loaded).top_probability,
                       logit_lens_maps(model, inputs, lens=lens).top_probability)
    (folder / "tuned_lens.safetensors").unlink()
    with pytest.raises(InputError, match="tuned_lens.safetensors missing"):
        TunedLens.load(folder)


def test_a_lens_of_another_shape_is_refused_before_any_forward(trained, tmp_path) -> None:
    model, _, held_out, _ = trained
    inputs = model.prepare(held_out[:1], [""])
    ran = []
    model.add_hook("blocks.0.hook_resid_pre", lambda activation, hook: ran.append(1))
    try:
        for wrong in (TunedLens(model.cfg.d_model, model.cfg.n_layers + 1), TunedLens(model.cfg.d_model * 2, model.cfg.n_layers)):
            with pytest.raises(InputError, match="train one on this model"):
                logit_lens_maps(model, inputs, lens=wrong)
            with pytest.raises(InputError, match=f"n_layers={model.cfg.n_layers}"):
                TunedLens.load(wrong.save(tmp_path / f"wrong_{wrong.d_model}_{wrong.n_layers}"), model)
    finally:
        model.reset_hooks()
    assert not ran
