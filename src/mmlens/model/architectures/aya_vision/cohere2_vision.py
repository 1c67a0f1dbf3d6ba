"""Cohere2-Vision (Cohere2VisionForConditionalGeneration, Command A Vision): Aya Vision's SigLIP tower
on tiles plus a thumbnail and its Cohere2 LLM, with a projector and a tiling of its own.

The projector reads the tower's `last_hidden_state` (after its post-LayerNorm) and applies the pixel
shuffle and the SwiGLU without Aya's LayerNorm between them. The tiles follow Cohere2-Vision's
canvas rule (`cohere2_tiling.py`), and in the prompt each frame's run of image tokens is followed
by `<|IMG_LINE_BREAK|>`, all between `<|START_OF_IMG|>` and `<|END_OF_IMG|>`: the same marked-tiles
layout as Aya Vision's (`layout.py`), its markers being those line breaks.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...config import VisionConfig
from ..llava import Llava
from .cohere2_tiling import Cohere2Tiling
from .family import AyaVision
from .layout import END, START


class Cohere2Vision(AyaVision):
    hf_class_names = ("Cohere2VisionForConditionalGeneration",)
    marker_kind = "tile_break"  # the <|IMG_LINE_BREAK|> after each run
    tiling_kind = Cohere2Tiling
    _projector_kind = "swiglu"

    def check_supported(self, hf_model: nn.Module) -> None:
        Llava.check_supported(self, hf_model)  # its projector reads no chosen layer: Aya's checks of one do not apply
        self.check_shuffle(hf_model)

    @staticmethod
    def feature_layer(hf_model: nn.Module, vision: VisionConfig) -> int:
        return vision.n_layers  # the last block, read after ln_post (`last_hidden_state`)

    @staticmethod
    def _marker_tokens(processor: Any) -> dict[str, str]:
        return {START: processor.boi_token, END: processor.eoi_token}
