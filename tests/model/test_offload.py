"""Disk offload through accelerate in every family: one block of the vision tower, the adapter and
one LLM block sent to disk give the same logits and the same activation at every hook point as the
model kept whole, whether accelerate dispatched the model before mmlens hooked it or after.

Offloaded weights are `meta` tensors outside their module's forward and are read from the
offload folder inside it, on the CPU, with the same kernels: the numbers must be equal bit for
bit. The device maps are written out here, by module name, independently of the family files.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from accelerate import dispatch_model
from torch import nn

from mmlens import HookedMLLM
from mmlens.errors import InputError
from mmlens.model.runtime.instrument import restore
from mmlens.model.loading import load_hf_checkpoint
from mmlens.testing import tiny_llava
from mmlens.testing_families import (
    tiny_gemma3, tiny_idefics3, tiny_internvl, tiny_llava_dinov2, tiny_llava_next, tiny_llava_onevision,
    tiny_llava_with, tiny_mistral3, tiny_paligemma, tiny_qwen2_vl, tiny_qwen3_vl,
)

from conftest import random_images

LLAVA_LIKE = ("model.vision_tower.encoder.layers.0", "model.multi_modal_projector", "model.language_model.layers.1")

# family: (builder, the modules sent to disk: a vision block, the adapter, an LLM block)
FAMILIES: dict[str, tuple[Callable[[], tuple[nn.Module, Any]], tuple[str, ...]]] = {
    "llava": (tiny_llava, LLAVA_LIKE),
    "llava-qwen2": (lambda: tiny_llava_with("qwen2"), LLAVA_LIKE),
    "llava-dinov2": (lambda: tiny_llava_dinov2(registers=2),
                     ("model.vision_tower.encoder.layer.0", *LLAVA_LIKE[1:])),
    "llava-next": (tiny_llava_next, LLAVA_LIKE),
    "llava-onevision": (tiny_llava_onevision, LLAVA_LIKE),
    "paligemma": (tiny_paligemma, LLAVA_LIKE),
    "gemma3": (tiny_gemma3, LLAVA_LIKE),
    "idefics3": (tiny_idefics3, ("model.vision_model.encoder.layers.0", "model.connector", "model.text_model.layers.1")),
    "qwen2-vl": (lambda: tiny_qwen2_vl("2"),
                 ("model.visual.blocks.0", "model.visual.merger", "model.language_model.layers.1")),
    "qwen2.5-vl": (lambda: tiny_qwen2_vl("2.5"),
                   ("model.visual.blocks.0", "model.visual.merger", "model.language_model.layers.1")),
    "qwen3-vl": (tiny_qwen3_vl, ("model.visual.blocks.0", "model.visual.merger", "model.visual.deepstack_merger_list.0",
                                 "model.language_model.layers.1")),
    "internvl": (tiny_internvl, ("model.vision_tower.encoder.layer.0", *LLAVA_LIKE[1:])),
    "mistral3": (tiny_mistral3, ("model.vision_tower.transformer.layers.0", *LLAVA_LIKE[1:])),
}


def cpu_and_disk_map(model: nn.Module, disk: tuple[str, ...]) -> dict[str, str]:
    """A device map covering the whole model: each module in `disk` on "disk", everything else on
    "cpu", split only as finely as needed (a parent of a disk module is listed by its children and
    its own parameters and buffers)."""
    modules = dict(model.named_modules())
    missing = [name for name in disk if name not in modules]
    assert not missing, f"no such module: {missing}"
    placed: dict[str, str] = {}

    def visit(name: str, module: nn.Module) -> None:
        if name in disk:
            placed[name] = "disk"
        elif not any(d.startswith(f"{name}.") for d in disk) and name:
            placed[name] = "cpu"
        else:
            prefix = f"{name}." if name else ""
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            placed.update({prefix + tensor: "cpu" for tensor, _ in own})
            for child, submodule in module.named_children():
                visit(prefix + child, submodule)

    visit("", model)
    return placed


def _jittered(hf_model: nn.Module) -> nn.Module:
    """Every parameter moved off Hugging Face's initial value (norms start at constants), so a
    weight that is not loaded from the offload folder shows."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return hf_model


def _offloaded(hf_model: nn.Module, disk: tuple[str, ...], folder) -> nn.Module:
    placed = cpu_and_disk_map(hf_model, disk)
    dispatched = dispatch_model(hf_model, placed, offload_dir=str(folder))
    tensor = next(t for n, t in hf_model.named_parameters() if n.startswith(f"{disk[0]}."))
    assert tensor.device.type == "meta", "the module was not offloaded"
    return dispatched


def _every_hook(model: HookedMLLM, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.set_use_attn_result(True)  # hook_result reads o_proj's weight itself: offloaded, it is loaded for it
    try:
        logits, cache = model.run_with_cache(inputs)
    finally:
        model.set_use_attn_result(False)
    return logits, dict(cache.items())


@pytest.mark.parametrize("when", ["dispatched before hooking", "dispatched after hooking"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_disk_offload_of_every_stage_equals_the_whole_model(family, when, tmp_path):
    build, disk = FAMILIES[family]
    hf_model, processor = build()
    whole = HookedMLLM.from_hf(copy.deepcopy(_jittered(hf_model)), processor)
    if when == "dispatched before hooking":
        split = HookedMLLM.from_hf(_offloaded(hf_model, disk, tmp_path), processor)
    else:
        split = HookedMLLM.from_hf(hf_model, processor)
        _offloaded(hf_model, disk, tmp_path)
    inputs = whole.prepare(random_images(2), ["what is in the image ?", "how many"])
    assert torch.equal(split(inputs), whole(inputs))
    (split_logits, split_cache), (whole_logits, whole_cache) = _every_hook(split, inputs), _every_hook(whole, inputs)
    assert torch.equal(split_logits, whole_logits)
    assert split_cache.keys() == whole_cache.keys()
    different = [name for name in whole_cache if not torch.equal(split_cache[name], whole_cache[name])]
    assert not different, different[:5]


@torch.no_grad()
def test_a_qwen25_vl_checkpoint_loaded_with_disk_offload_equals_the_whole_model(tmp_path):
    """The path the issue measured: Hugging Face's own loading with a device map and an offload
    folder (accelerate's hooks set up by transformers), then mmlens on top."""
    build, disk = FAMILIES["qwen2.5-vl"]
    hf_model, processor = build()
    _jittered(hf_model).save_pretrained(tmp_path / "checkpoint")
    whole = HookedMLLM.from_hf(hf_model, processor)
    placed = cpu_and_disk_map(hf_model, disk)
    loaded, _ = load_hf_checkpoint(tmp_path / "checkpoint", device_map=placed, offload_folder=tmp_path / "offload",
                                   load_processor=False, attn_implementation="eager")  # as the tiny model was built
    assert {loaded.hf_device_map[name] for name in disk} == {"disk"}
    split = HookedMLLM.from_hf(loaded, processor)
    inputs = whole.prepare(random_images(2), ["what is in the image ?", "how many"])
    assert torch.equal(split(inputs), whole(inputs))
    (split_logits, split_cache), (whole_logits, whole_cache) = _every_hook(split, inputs), _every_hook(whole, inputs)
    assert torch.equal(split_logits, whole_logits)
    assert all(torch.equal(split_cache[name], whole_cache[name]) for name in whole_cache)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "mistral3"])
@torch.no_grad()
def test_restoring_after_a_later_dispatch_leaves_hugging_faces_forward_inside_accelerates_hook(family, tmp_path):
    """Hooked, then dispatched (accelerate wraps the hooked forwards), then `restore`: every module
    runs Hugging Face's own forward again, still inside accelerate's hook."""
    build, disk = FAMILIES[family]
    hf_model, processor = build()
    reference = copy.deepcopy(_jittered(hf_model))
    inputs = HookedMLLM.from_hf(hf_model, processor).prepare(random_images(2), ["what is in the image ?", "how many"])
    _offloaded(hf_model, disk, tmp_path)
    restore(hf_model)
    for name, module in hf_model.named_modules():
        if hasattr(module, "_hf_hook"):
            assert module._old_forward == type(module).forward.__get__(module), name
        else:
            assert "forward" not in module.__dict__, name
    assert torch.equal(hf_model(**inputs.hf_kwargs()).logits, reference(**inputs.hf_kwargs()).logits)


@torch.no_grad()
def test_weight_views_of_an_offloaded_layer_are_refused_and_the_others_still_read(tmp_path):
    """An offloaded layer's weights exist only while it runs: its TL views are a clear error, not
    `meta` tensors; the layers kept in memory read as in the whole model."""
    build, disk = FAMILIES["llava"]
    hf_model, processor = build()
    whole = HookedMLLM.from_hf(copy.deepcopy(_jittered(hf_model)), processor)
    split = HookedMLLM.from_hf(_offloaded(hf_model, disk, tmp_path), processor)
    for read in (lambda m: m.blocks[1].attn.W_Q, lambda m: m.blocks[1].attn.b_O, lambda m: m.blocks[1].mlp.W_out,
                 lambda m: m.blocks[1].ln2.w, lambda m: m.W_Q):
        with pytest.raises(InputError, match="offloaded by accelerate"):
            read(split)
    assert split.blocks[1].attn.repeat_kv_heads == whole.blocks[1].attn.repeat_kv_heads
    for read in (lambda m: m.blocks[0].attn.W_Q, lambda m: m.blocks[0].mlp.W_in, lambda m: m.W_U, lambda m: m.W_E):
        assert torch.equal(read(split), read(whole))


@torch.no_grad()
def test_an_offloaded_final_norm_still_folds_into_the_unembedding(tmp_path):
    """The final norm and the head are the last modules, offloaded first by `device_map="auto"`:
    the folded `W_U`, `unembed` and the logit lens read the norm's weight while accelerate holds it."""
    build, _ = FAMILIES["gemma3"]  # a `1 + weight` norm: a weight left at meta or zeros would show
    hf_model, processor = build()
    whole = HookedMLLM.from_hf(copy.deepcopy(_jittered(hf_model)), processor)
    split = HookedMLLM.from_hf(_offloaded(hf_model, ("model.language_model.norm",), tmp_path), processor)
    inputs = split.prepare(random_images(2), ["what is here?", "and here?"])
    logits, cache = split.run_with_cache(inputs)
    torch.testing.assert_close(logits, whole(inputs), atol=1e-5, rtol=0)
    torch.testing.assert_close(split.W_U, whole.W_U, atol=0, rtol=0)
    lens, _ = cache.logit_lens()
    torch.testing.assert_close(lens[-1], logits, atol=1e-5, rtol=1e-5)
    residual = cache["ln_final.hook_normalized"]
    torch.testing.assert_close(split.unembed(residual), logits, atol=1e-5, rtol=1e-5)
