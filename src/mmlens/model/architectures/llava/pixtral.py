"""LLaVA with a Pixtral tower (Pixtral-12B in LLaVA format: LlavaForConditionalGeneration whose
`vision_config` is `pixtral`).

Each image keeps its own resolution and the tower packs every image into one sequence with a
block-diagonal mask: Mistral 3's tower, hooked as there (`mistral3/tower.py`). The LLaVA projector
then maps every patch to one LLM token (no merger), and in the prompt an image is its patch rows,
each closed by `[IMG_BREAK]` and the last by `[IMG_END]`: Mistral 3's layout with a merge size of
one (`mistral3/layout.py`). The tower has no norm after its last block, so there is no `vision.ln_post`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ....errors import UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, VisionConfig
from ..mistral3 import Mistral3
from .family import LLMS, Llava


class LlavaPixtral(Mistral3):
    # registered as LLaVA's: `Llava.for_checkpoint` picks this variant for a Pixtral tower
    hf_class_names = ()
    llms = LLMS

    def check_supported(self, hf_model: nn.Module) -> None:
        config = hf_model.config
        text_type = config.text_config.model_type
        if text_type not in self.llms:
            raise UnsupportedModelError(
                f"{type(hf_model).__name__}: config.text_config.model_type = {text_type!r} is an LLM mmlens does not "
                f"hook beside a Pixtral tower; supported LLMs: {list(self.llms)}"
            )
        if not isinstance(config.vision_feature_layer, int):
            raise UnsupportedModelError(
                f"{type(hf_model).__name__}: vision_feature_layer={config.vision_feature_layer} with a Pixtral tower "
                "(several tower layers concatenated) is not supported; set vision_feature_layer to one layer (-1)"
            )
        if config.vision_feature_select_strategy != "full":
            raise UnsupportedModelError(
                f"{type(hf_model).__name__}: vision_feature_select_strategy="
                f"{config.vision_feature_select_strategy!r} with a Pixtral tower drops the first patch of the packed "
                "sequence, which has no CLS token; Pixtral checkpoints use 'full'"
            )

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        config = hf_model.config
        vision = self.vision_config(hf_model)
        projector = self.projector(hf_model)
        adapter = AdapterConfig(
            kind=f"mlp2x_{config.projector_hidden_act}",
            d_in=projector.linear_1.in_features,
            d_hidden=projector.linear_1.out_features,
            d_out=projector.linear_2.out_features,
            feature_layers=(config.vision_feature_layer % (vision.n_layers + 1),),
            select_strategy="full",
            n_image_tokens=0,  # variable: one token per patch of each image
            token_grid=(0, 0),
        )
        return self.assemble_config(hf_model, vision, adapter, Llava.llm_config(config.text_config))

    def vision_config(self, hf_model: nn.Module) -> VisionConfig:
        return replace(super().vision_config(hf_model), has_ln_post=False)

    def instrument_adapter(self, hf_model: nn.Module, root: Any) -> None:
        Llava._instrument_projector(self.projector(hf_model), root.adapter)

    def merge_size(self) -> int:
        return 1
