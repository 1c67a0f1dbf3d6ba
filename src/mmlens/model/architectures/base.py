"""What an architecture file provides: how to read a model family's config and where to hook it.

A model family (LLaVA, later LLaVA-NeXT, Qwen2.5-VL ...) is one subclass of `Architecture` in its
own small file, registered by its Hugging Face class name. `HookedMLLM` only talks to this
interface.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..config import MLLMConfig


@dataclass(frozen=True)
class StageModules:
    """The Hugging Face modules of one transformer stack that the TL surface reads or runs:
    its blocks in order (for start/stop at a layer), for the LLM the token embedding and the
    unembedding (`W_E`, `W_U`, `model.unembed`), for the vision stack the module taking pixels."""

    layers: tuple[nn.Module, ...]
    embed: nn.Module | None = None
    unembed: nn.Module | None = None
    tower: nn.Module | None = None  # the vision stack's own module, called on pixel values


class Architecture(ABC):
    """Adapter between one Hugging Face model family and mmlens's hook tree."""

    hf_class_names: tuple[str, ...] = ()
    # (pattern, replacement) pairs mapping TransformerBridge hook names to ours.
    bridge_aliases: tuple[tuple[str, str], ...] = ()

    @abstractmethod
    def build_config(self, hf_model: nn.Module) -> MLLMConfig: ...

    @abstractmethod
    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        """Install hooks on `hf_model` that fire `root`'s hook points; return removable handles."""

    @abstractmethod
    def forward(self, hf_model: nn.Module, **inputs: Tensor) -> Any:
        """Run the Hugging Face model on `input_ids`, `pixel_values`, `attention_mask`."""

    @abstractmethod
    def stage_modules(self, hf_model: nn.Module) -> dict[str, StageModules]:
        """`{"vision": ..., "llm": ...}`: the modules behind the weight surface and start/stop at a layer."""

    def canonical_name(self, name: str) -> str:
        for pattern, replacement in self.bridge_aliases:
            if re.fullmatch(pattern, name):
                return re.sub(pattern, replacement, name)
        return name
