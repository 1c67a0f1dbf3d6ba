"""from_pretrained: local checkpoints offline, clear errors for missing weights and hub misses."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmlens import HookedMLLM
from mmlens.testing import tiny_llava

from conftest import random_images


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_local_checkpoint_loads_offline_and_matches(tmp_path, offline):
    hf, processor = tiny_llava(seed=3)
    hf.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = HookedMLLM.from_pretrained(tmp_path, attn_implementation="eager")
    if importlib.util.find_spec("torchvision") is None:  # where it is installed, transformers imports it
        assert "torchvision" not in sys.modules, "loading must not pull in torchvision"
    inputs = model.prepare(random_images(2), ["how many", "what is in the image ?"])
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), hf(**inputs.hf_kwargs()).logits, atol=1e-5, rtol=0)


def test_dtype_is_applied(tmp_path, offline):
    hf, processor = tiny_llava()
    hf.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = HookedMLLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.cfg.dtype == torch.bfloat16
    inputs = model.prepare(random_images(1), "how many")
    assert inputs.pixel_values.dtype == torch.bfloat16
    assert model(inputs).dtype == torch.bfloat16


def test_missing_weights_say_what_was_expected(tmp_path):
    hf, _ = tiny_llava()
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        HookedMLLM.from_pretrained(tmp_path)


def test_hub_id_offline_not_cached(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        HookedMLLM.from_pretrained("llava-hf/llava-1.5-7b-hf")


def test_unsupported_checkpoint_architecture(tmp_path, offline):
    LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="supported architectures"):
        HookedMLLM.from_pretrained(tmp_path)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="no such directory"):
        HookedMLLM.from_pretrained("./does/not/exist")


def test_damaged_checkpoint_files_are_named(tmp_path):
    from mmlens.errors import ModelLoadError

    hf, processor = tiny_llava()
    hf.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(ModelLoadError, match=r"model.safetensors|damaged or truncated"):
        HookedMLLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match=r"config.json cannot be read as a Hugging Face config"):
        HookedMLLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("kw, message", [
    ({"dtype": "float8"}, "dtype 'float8' is not supported; use one of float32, float16, bfloat16"),
    ({"device": "cuda:3"} if not torch.cuda.is_available() else {"device": "cuda:999"}, "cuda"),
    ({"device": "gpu"}, "is not a torch device"),
])
def test_unusable_dtype_or_device_is_refused_before_loading(kw, message):
    from mmlens.errors import InputError

    with pytest.raises(InputError, match=message):
        HookedMLLM.from_pretrained("tiny-shapes-llava", **kw)


def test_a_hub_id_with_the_hub_unreachable_fails_at_once_without_retries(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    from mmlens.errors import HubUnavailableError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=r"not-a-real/model.*127\.0\.0\.1:9 cannot be reached.*local cache"):
        HookedMLLM.from_pretrained("not-a-real/model")
    assert time.perf_counter() - started < 3, "Hugging Face's retries (1 + 2 + 4 + 8 + 8 s) must not run"


def _with_token_id(builder, field: str):
    def build():
        hf_model, processor = builder()
        vocab = hf_model.get_input_embeddings().num_embeddings
        setattr(hf_model.config, field, vocab + 7)
        return hf_model, processor, vocab
    return build


# (family, the config attribute, the key config.json stores it under: Hugging Face's attribute_map aliases)
@pytest.mark.parametrize("family,field,stored", [
    ("llava", "image_token_id", "image_token_index"), ("qwen2_vl", "vision_end_token_id", "vision_end_token_id"),
    ("qwen2_vl", "image_token_id", "image_token_id"), ("gemma3", "boi_token_index", "boi_token_index"),
    ("llama4", "boi_token_id", "boi_token_index"),
])
def test_special_token_ids_outside_the_vocabulary_are_named_at_load(family, field, stored):
    from mmlens.errors import ModelLoadError
    from mmlens.testing.families.llama4 import tiny_llama4
    from mmlens.testing_families import tiny_gemma3, tiny_qwen2_vl

    builder = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "gemma3": tiny_gemma3, "llama4": tiny_llama4}[family]
    hf_model, processor, vocab = _with_token_id(builder, field)()
    with pytest.raises(ModelLoadError, match=rf"config\.{field} = {vocab + 7} is not a token of the vocabulary, which has "
                                             rf"{vocab} tokens.*Fix {stored} in the checkpoint's config\.json"):
        HookedMLLM.from_hf(hf_model, processor)
