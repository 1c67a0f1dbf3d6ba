"""Models split by accelerate (`device_map`): equal to the unsplit model, hooks and edits included.

On this machine the split is CPU + disk offload: the offloaded layers' weights are `meta` tensors
until accelerate loads them for their forward, so any code that bypasses accelerate's hooks (or
reads a weight directly) fails loudly rather than silently. A CUDA split runs where CUDA exists.
"""

from __future__ import annotations

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.interventions.corruptions import recovery_blocked
from mmlens.interventions.patching import Run, head_sweep
from mmlens.interventions.patching_metrics import logit_difference
from mmlens.probing import probe_sweep

LLM = "model.language_model"


def device_map(offloaded: str = "disk", rest: str | int = "cpu") -> dict[str, str | int]:
    """tiny-shapes-llava with LLM layers 1 and 2 sent to `offloaded`, everything else on `rest`."""
    placed = {"model.vision_tower": rest, "model.multi_modal_projector": rest, f"{LLM}.embed_tokens": rest,
              f"{LLM}.norm": rest, f"{LLM}.rotary_emb": rest, "lm_head": rest}
    return placed | {f"{LLM}.layers.{l}": (offloaded if l in (1, 2) else rest) for l in range(4)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_grad_enabled(False)
    whole = HookedMLLM.from_pretrained("tiny-shapes-llava")
    split = HookedMLLM.from_pretrained("tiny-shapes-llava", device_map=device_map(),
                                       offload_folder=tmp_path_factory.mktemp("offload"))
    yield whole, split
    torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def scenes():
    return load_segmentation("scenes", split="validation", n=16, seed=0)


def test_offloaded_layers_really_are_offloaded(pair):
    _, split = pair
    layer = split.hf_model.model.language_model.layers[1]
    assert layer.self_attn.q_proj.weight.device.type == "meta"
    assert split.hf_model.hf_device_map[f"{LLM}.layers.1"] == "disk"
    assert split.cfg.device == torch.device("cpu")


def test_every_hook_of_the_offloaded_model_equals_the_whole_model(pair, scenes):
    whole, split = pair
    inputs = [m.prepare(scenes[[0, 1]]["image"], "what is in the image ?") for m in pair]
    for model in pair:
        model.set_use_attn_result(True)  # hook_result reads o_proj's weight directly: offloaded, it is loaded for it
    try:
        (full_logits, full), (split_logits, offloaded) = (m.run_with_cache(i) for m, i in zip(pair, inputs))
    finally:
        for model in pair:
            model.set_use_attn_result(False)
    # the same weights and the same kernels on the same device: the same computation
    assert torch.equal(full_logits, split_logits)
    assert set(full.keys()) == set(offloaded.keys()) and "blocks.1.attn.hook_result" in full.keys()
    for name in full.keys():
        assert torch.equal(full[name], offloaded[name]), name


def test_knockout_and_patching_on_the_offloaded_model(pair, scenes):
    values = []
    for model in pair:
        inputs = model.prepare(scenes[[0, 1]]["image"], "what is in the image ?")
        blocked = recovery_blocked(model, inputs)  # verified: no attention left on a blocked edge
        knocked_out = model.run_with_hooks(inputs, fwd_hooks=blocked.edit(inputs).hooks)
        values.append((knocked_out, head_sweep(model, Run(inputs), blocked, logit_difference(5, 7), layers=[2])))
    (full_logits, full_sweep), (split_logits, split_sweep) = values
    assert torch.equal(full_logits, split_logits)
    assert torch.equal(full_sweep, split_sweep)


def test_probe_sweep_on_the_offloaded_model(pair, scenes):
    sites = ["adapter.hook_out", "blocks.1.hook_resid_post", "blocks.2.hook_resid_mid"]
    tables = [probe_sweep(m, scenes.select(range(8)), sites=sites, probe="ridge", progress=False, n_boot=1000).table
              for m in pair]
    assert tables[0].equals(tables[1])


def test_device_map_mistakes_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="device or device_map, not both"):
        HookedMLLM.from_pretrained("tiny-shapes-llava", device="cpu", device_map="auto")
    with pytest.raises(InputError, match="offload_folder"):
        HookedMLLM.from_pretrained("tiny-shapes-llava", device_map=device_map())
    # a misspelt or missing module is the map's mistake, named as such (not a damaged checkpoint)
    misspelt = {("model.language_model.layer.1" if k == f"{LLM}.layers.1" else k): v for k, v in device_map().items()}
    with pytest.raises(InputError, match=r"'model.language_model.layer.1' \(did you mean 'model.language_model.layers.1'\?\)"):
        HookedMLLM.from_pretrained("tiny-shapes-llava", device_map=misspelt, offload_folder=tmp_path)
    without_layer = {k: v for k, v in device_map().items() if k != f"{LLM}.layers.3"}
    with pytest.raises(InputError, match=r"no device to 9 parameter\(s\): those of model.language_model.layers.3;"):
        HookedMLLM.from_pretrained("tiny-shapes-llava", device_map=without_layer, offload_folder=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device_map: .*no CUDA device"):
            HookedMLLM.from_pretrained("tiny-shapes-llava", device_map=device_map(offloaded=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_split_between_cuda_and_cpu_equals_the_whole_model_on_cpu(scenes):
    whole = HookedMLLM.from_pretrained("tiny-shapes-llava")
    split = HookedMLLM.from_pretrained("tiny-shapes-llava", device_map=device_map(offloaded="cpu", rest=0))
    assert split.cfg.device == torch.device("cuda:0")
    inputs = [m.prepare(scenes[[0, 1]]["image"], "what") for m in (whole, split)]
    (a, full), (b, parted) = whole.run_with_cache(inputs[0]), split.run_with_cache(inputs[1])
    torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)  # other kernels on the GPU
    for name in full.keys():
        torch.testing.assert_close(parted[name].cpu(), full[name], atol=1e-4, rtol=1e-3)
    sites = ["adapter.hook_out", "blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    tables = [probe_sweep(m, scenes, sites=sites, probe="ridge", progress=False, n_boot=1000).table for m in (whole, split)]
    assert (tables[0].miou - tables[1].miou).abs().max() <= 0.01
