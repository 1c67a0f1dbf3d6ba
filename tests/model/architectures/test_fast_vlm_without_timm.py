"""FastVLM where timm or torchvision is missing (mmlens's own test environment leaves torchvision out):
Hugging Face cannot build the model, and loading a checkpoint says which package is missing and how to
install it before reading any weight. Runs in every environment: where both are installed, the check is
shown torchvision missing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import FastVlmConfig

from mmlens import HookedMLLM
from mmlens.errors import ModelLoadError
from mmlens.model.architectures.fast_vlm import timm_backend


def test_a_fastvlm_checkpoint_without_timm_names_timm_and_torchvision(tmp_path, monkeypatch):
    present = timm_backend.find_spec
    monkeypatch.setattr(timm_backend, "find_spec", lambda name: None if name == "torchvision" else present(name))
    config = FastVlmConfig(
        vision_config={"model_type": "timm_wrapper", "architecture": "fastvit_mci3", "hidden_size": 128,
                       "model_args": {"inference_mode": True}},
        text_config={"model_type": "qwen2", "vocab_size": 40, "hidden_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64},
    )
    config.architectures = ["FastVlmForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    save_file({"stand_in": torch.zeros(1)}, tmp_path / "model.safetensors")  # refused before it is read
    with pytest.raises(ModelLoadError, match=r"(timm and )?torchvision (is|are) not installed.*timm model.*"
                                             r"pip install timm torchvision"):
        HookedMLLM.from_pretrained(tmp_path)
