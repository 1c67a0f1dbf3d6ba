"""The control models: `random_llm` keeps the trained vision tower and adapter bit for bit and
re-draws every LLM weight (seeded, Hugging Face's initialisation), in every family; the trained
model is untouched; `randomly_initialised` re-draws everything as Hugging Face does; both are
placed like the model (device map, disk offload, dtype) and cost at most the model's memory.

The tiny family models come from configs with Hugging Face's init, whose norms and biases are
constants; their weights are jittered first ("trained"), so an LLM weight left in place shows."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from accelerate import dispatch_model
from transformers import LlavaForConditionalGeneration

from mmlens import HookedMLLM, MultimodalInputs
from mmlens.data import load_segmentation
from mmlens.errors import InputError, UnsupportedModelError
from mmlens.model.architectures.base import StageModules
from mmlens.probing.controls import llm_module_names, random_llm, randomly_initialised
from mmlens.testing import tiny_llava
from mmlens.testing_families import (
    tiny_gemma3, tiny_idefics3, tiny_internvl, tiny_llava_dinov2, tiny_llava_next, tiny_llava_onevision,
    tiny_llava_with, tiny_mistral3, tiny_paligemma, tiny_qwen2_vl, tiny_qwen3_vl,
)

from conftest import random_images
from test_offload import FAMILIES as OFFLOADED, cpu_and_disk_map

# Where each family's LLM lives in Hugging Face's module tree, written out independently of
# mmlens's architecture files: what the control must re-draw, and nothing else.
LLM_PREFIXES = ("model.language_model.", "model.text_model.", "lm_head.")


def _tied_llava():
    """A tiny LLaVA whose unembedding is its token embedding (tie_word_embeddings), as in Gemma."""
    hf, processor = tiny_llava()
    config = copy.deepcopy(hf.config)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return model, processor


FAMILIES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "llava": lambda: tiny_llava(),
    "llava-tied": _tied_llava,
    "llava-qwen2": lambda: tiny_llava_with("qwen2"),
    "llava-dinov2": lambda: tiny_llava_dinov2(registers=2),
    "llava-next": tiny_llava_next,
    "llava-onevision": tiny_llava_onevision,
    "paligemma": tiny_paligemma,
    "gemma3": tiny_gemma3,
    "idefics3": tiny_idefics3,
    "qwen2-vl": lambda: tiny_qwen2_vl("2"),
    "qwen2.5-vl": lambda: tiny_qwen2_vl("2.5"),
    "qwen3-vl": tiny_qwen3_vl,  # deepstack: tower features added into the first LLM layers
    "internvl": tiny_internvl,
    "mistral3": tiny_mistral3,
}


@dataclass
class Case:
    model: HookedMLLM
    inputs: MultimodalInputs


def _jittered(hf_model):
    """Every parameter moved off its initial value, reproducibly (a stand-in for training)."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return hf_model


@pytest.fixture(scope="module", params=["tiny-shapes-llava", *FAMILIES])
def case(request) -> Case:
    if request.param == "tiny-shapes-llava":  # the embedded model, trained on the synthetic scenes
        model = HookedMLLM.from_pretrained("tiny-shapes-llava")
        images = load_segmentation("scenes", split="validation", n=2)["image"]
        return Case(model, model.prepare(images, ""))
    hf_model, processor = FAMILIES[request.param]()
    model = HookedMLLM.from_hf(_jittered(hf_model), processor)
    return Case(model, model.prepare(random_images(2), ["what is in the image ?", "how many"]))


def _is_llm(key: str) -> bool:
    return key.startswith(LLM_PREFIXES)


def _state(model: HookedMLLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}


def test_random_llm_keeps_vision_and_adapter_and_redraws_every_llm_weight(case: Case):
    trained = case.model
    before = _state(trained)
    control = random_llm(trained, seed=0)
    after = control.hf_model.state_dict()
    assert after.keys() == before.keys() and control.hf_model is not trained.hf_model
    llm = [k for k in before if _is_llm(k)]
    kept = [k for k in before if not _is_llm(k)]
    # the LLM's whole surface is in `llm`: embedding, every block, final norm, unembedding
    assert any(k.endswith("embed_tokens.weight") for k in llm) and "lm_head.weight" in llm
    assert any(".norm.weight" in k and ".layers." not in k for k in llm)
    assert {k.split(".layers.")[1].split(".")[0] for k in llm if ".layers." in k} == {
        str(i) for i in range(trained.cfg.llm.n_layers)}
    assert kept and any("proj" in k or "merger" in k or "connector" in k for k in kept)
    same_vision = [k for k in kept if torch.equal(after[k], before[k])]
    assert same_vision == kept, "a vision or adapter weight changed"
    unchanged_llm = [k for k in llm if torch.equal(after[k], before[k])]
    assert not unchanged_llm, f"LLM weights not re-drawn: {unchanged_llm[:3]}"
    # the trained model is untouched
    assert all(torch.equal(v, before[k]) for k, v in trained.hf_model.state_dict().items())
    # HF's own initialisation: the same draw as the fully random control's LLM
    full = randomly_initialised(trained, seed=0).hf_model.state_dict()
    assert all(torch.equal(after[k], full[k]) for k in llm)


def test_random_llm_is_seeded(case: Case):
    first, again, other = (random_llm(case.model, seed).hf_model.state_dict() for seed in (3, 3, 4))
    assert all(torch.equal(first[k], again[k]) for k in first)
    drawn = [k for k, v in first.items() if _is_llm(k) and v.ndim >= 2]  # norms start at a constant
    assert drawn and all(not torch.equal(first[k], other[k]) for k in drawn)
    assert all(torch.equal(first[k], other[k]) for k in first if not _is_llm(k))


@torch.no_grad()
def test_random_llm_sees_the_same_image_tokens(case: Case):
    """The adapter's output (and Qwen3-VL's deepstack features) are the trained model's bit for bit;
    from the first LLM block on, every image token differs."""
    trained, inputs = case.model, case.inputs
    control = random_llm(trained, seed=0)
    logits_before = trained(inputs)
    names = ["adapter.hook_out", "blocks.0.hook_resid_post"]
    names += [n for n in trained.hook_dict if n.startswith("adapter.deepstack.") and n.endswith("hook_out")]
    _, ours = trained.run_with_cache(inputs, names_filter=names)
    _, theirs = control.run_with_cache(inputs, names_filter=names)
    for name in names[:1] + names[2:]:
        assert torch.equal(ours[name], theirs[name]), name
    layout = inputs.layout
    present = layout.table("llm").present
    a, b = (layout.gather("llm", cache["blocks.0.hook_resid_post"]) for cache in (ours, theirs))
    per_token = (a - b).abs().amax(-1)[present]
    assert len(per_token) > 0 and bool((per_token > 1e-3).all())
    assert torch.equal(trained(inputs), logits_before)  # the trained model still computes what it did


def test_randomly_initialised_draws_what_hugging_face_draws(case: Case):
    """Every tensor Hugging Face sets to a constant (norms, zero biases, rotary tables, position ids)
    is that constant; every drawn one has the spread of Hugging Face's own draw and differs from
    the trained model's; the caller's random state is left alone."""
    trained = case.model
    state = torch.random.get_rng_state()
    control = randomly_initialised(trained, seed=5).hf_model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    eager = []
    for seed in (5, 6):  # Hugging Face's own construction, twice: what differs between them is drawn
        torch.manual_seed(seed)
        eager.append(type(trained.hf_model)(copy.deepcopy(trained.hf_model.config)).state_dict())
    assert control.keys() == eager[0].keys()
    spreads = {}
    for key, reference in eager[0].items():
        if torch.equal(reference, eager[1][key]):
            assert torch.equal(control[key], reference.to(control[key].dtype)), key
        elif reference.numel() >= 1000:
            spreads[key] = float(control[key].float().std() / reference.float().std())
    assert spreads and all(0.8 < ratio < 1.25 for ratio in spreads.values()), spreads
    before = trained.hf_model.state_dict()
    assert all(not torch.equal(control[k], before[k]) for k in before if before[k].ndim >= 2
               and not k.endswith("position_ids"))


def test_llm_module_names_name_the_llm_side():
    hf, processor = tiny_qwen3_vl()
    model = HookedMLLM.from_hf(hf, processor)
    assert llm_module_names(model) == ("model.language_model", "lm_head")  # deepstack mergers stay in model.visual


def test_refuses_an_llm_sharing_a_weight_with_the_vision_side():
    hf, processor = tiny_llava()
    projector = hf.model.multi_modal_projector.linear_2
    attention = hf.model.language_model.layers[0].self_attn.o_proj
    assert projector.weight.shape == attention.weight.shape
    projector.weight = attention.weight  # one tensor on both sides of the model
    model = HookedMLLM.from_hf(hf, processor)
    with pytest.raises(UnsupportedModelError, match="shared between the LLM and the vision side.*randomly_initialised"):
        random_llm(model, seed=0)


@pytest.mark.parametrize("wrong", ["no embedding", "embedding in the tower"])
def test_refuses_a_family_whose_llm_cannot_be_located(wrong, monkeypatch):
    """A family file whose stage modules leave the LLM unlocatable (no embedding, or stage modules
    that only meet at the model's root) is refused rather than re-drawing part of the tower."""
    hf, processor = tiny_llava()
    model = HookedMLLM.from_hf(hf, processor)
    stages = model.architecture.stage_modules(hf)
    llm = stages["llm"]
    embed = None if wrong == "no embedding" else stages["vision"].tower.embeddings
    broken = {**stages, "llm": StageModules(layers=llm.layers, embed=embed, unembed=llm.unembed)}
    monkeypatch.setattr(model.architecture, "stage_modules", lambda _hf: broken)
    with pytest.raises(UnsupportedModelError, match="cannot re-draw the LLM alone"):
        random_llm(model, seed=0)
    with torch.no_grad():  # the model itself still runs
        assert torch.isfinite(model(model.prepare(random_images(1), ""))).all()


# ------------------------------------------------------------------ placement and memory
@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl", "mistral3"])
@torch.no_grad()
def test_controls_of_a_disk_offloaded_model_are_offloaded_like_it_and_draw_the_same(family, tmp_path):
    """Both controls of a model with a vision block, the adapter and an LLM block on disk are
    dispatched on the same device map, with their own offloaded weights in their own folder, in
    the model's dtype, and compute exactly what the controls of the model kept whole compute."""
    build, disk = OFFLOADED[family]
    hf_model, processor = build()
    hf_model = _jittered(hf_model).to(torch.bfloat16)
    whole = HookedMLLM.from_hf(copy.deepcopy(hf_model), processor)
    placed = cpu_and_disk_map(hf_model, disk)
    split = HookedMLLM.from_hf(dispatch_model(hf_model, placed, offload_dir=str(tmp_path / "model")), processor)
    inputs = whole.prepare(random_images(2), ["what is in the image ?", "how many"])
    for control in (randomly_initialised, random_llm):
        folder = tmp_path / control.__name__
        reference, offloaded = control(whole, seed=3), control(split, seed=3, offload_folder=folder)
        hf = offloaded.hf_model
        assert hf.hf_device_map == placed
        on_disk = [key for key, tensor in hf.named_parameters() if tensor.device.type == "meta"]
        assert on_disk and all(key.startswith(disk) for key in on_disk)
        assert set(json.loads((folder / "index.json").read_text())) >= set(on_disk)
        assert {t.dtype for t in hf.parameters()} == {torch.bfloat16}
        assert torch.equal(offloaded(inputs), reference(inputs)), control.__name__
    with pytest.raises(InputError, match="already holds offloaded weights"):
        random_llm(split, seed=3, offload_folder=tmp_path / "random_llm")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak resident set of Linux")
def test_a_control_costs_at_most_the_models_own_memory(tmp_path):
    """Building a control adds at most the model's own bytes (10% over them for the interpreter's
    own allocations and one tensor in transit), in its dtype; with most of the LLM on disk, at most
    the model's resident bytes plus one block. See control_memory_worker.py for the measurement."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MMLENS_MALLOC_TRIM_THRESHOLD": "0"}
    worker = Path(__file__).with_name("control_memory_worker.py")
    done = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    model, block, slack = report["model_bytes"], report["block_bytes"], 0.1 * report["model_bytes"]
    for control in ("random_init", "random_llm"):
        assert report["whole"][control] <= model + slack, report
        assert report["offloaded"][control] <= report["offloaded_resident_bytes"] + block + slack, report
