"""Mistral 3 (Mistral3ForConditionalGeneration): a native-resolution Pixtral ViT -> RMSNorm, 2x2 patch
merger and MLP projector -> Mistral LLM.

Each image keeps its own resolution (resized to fit the longest edge, sides rounded up to
multiples of 2 x patch size; `image_sizes` gives each size inside the zero-padded batch). The
tower runs all images as one packed sequence with a block-diagonal mask (see `tower.py`),
and the merger turns each 2x2 patch group into one LLM token. In the prompt an image is its token
rows, each followed by `[IMG_BREAK]` and the last by `[IMG_END]` (see `layout.py`); only
the `[IMG]` tokens receive image features, the breaks and the end are text embeddings. The LLM's
positions follow the attention mask, so runs from the merged embeddings need nothing more.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from ....errors import InputError, UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, VisionConfig
from ...images.layout import ImageTokenLayout
from ...runtime.instrument import instrument_block, instrument_language_model
from ...runtime.norms import instrument_norm
from ..base import Architecture
from ..bridge_aliases import LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES, PROJECTOR_OUTPUT_ALIASES
from ..llava import LLM_BLOCK, Llava
from ..module_paths import ModulePaths
from .geometry import PixtralGeometry
from .layout import mistral3_layout
from .tower import PIXTRAL_BLOCK, hook_packed_embeddings, instrument_projector

SIZES = "image_sizes"


class Mistral3(Architecture):
    hf_class_names = ("Mistral3ForConditionalGeneration",)
    extra_input_names = (SIZES,)
    module_paths = ModulePaths(vision_tower="model.vision_tower", vision_layers="transformer.layers",
                               projector="model.multi_modal_projector", llm="model.language_model")
    # TransformerBridge (TL 4.3) wraps Mistral 3 as LLaVA with the Pixtral tower opaque: of the vision
    # side it names only the tower's output and the projector's output (ours carry a leading dim of
    # one); its `vision_projector.hook_in` and `vision_encoder.hook_out` are block outputs, resolved in
    # `canonical_name` since their block depends on the model. The LLM's names are LLaVA's.
    bridge_aliases = (*PROJECTOR_OUTPUT_ALIASES, *LLM_ALIASES, *LLM_BRANCH_OUTPUT_ALIASES)
    llm_block = LLM_BLOCK
    vision_block = PIXTRAL_BLOCK
    # [IMG_BREAK] / [IMG_END] ids, read from the processor when there is one (else not checked)
    break_token_id: int | None = None
    end_token_id: int | None = None
    # whether each row of an image's tokens is closed by [IMG_BREAK] / [IMG_END] (LightOnOCR's are not)
    row_breaks = True

    # ------------------------------------------------------------- config and modules
    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        config = hf_model.config
        vc = config.vision_config
        if not isinstance(self.feature_layer(config), int):
            raise UnsupportedModelError(
                f"vision_feature_layer={self.feature_layer(config)}: Mistral 3's projector norms features of one "
                "layer's width; several concatenated layers are not a model Hugging Face can run either"
            )
        vision = self.vision_config(hf_model)
        projector, merge = self.projector(hf_model), config.spatial_merge_size
        adapter = AdapterConfig(
            kind=f"patch_merger_{merge}x{merge}",
            d_in=projector.patch_merger.merging_layer.in_features,
            d_hidden=projector.linear_1.out_features,
            d_out=projector.linear_2.out_features,
            feature_layers=(self.feature_layer(config) % (vc.num_hidden_layers + 1),),
            select_strategy="full",
            n_image_tokens=0,  # variable: (h / merge) x (w / merge) per image
            token_grid=(0, 0),
        )
        return self.assemble_config(hf_model, vision, adapter, Llava.llm_config(config.text_config))

    @staticmethod
    def feature_layer(config: Any) -> Any:
        """The tower's hidden state the projector reads (LightOnOCR's config has none: the last)."""
        return config.vision_feature_layer

    def vision_config(self, hf_model: nn.Module) -> VisionConfig:
        """The Pixtral tower's: RMSNorm, 2-D rotary, SwiGLU, `ln_pre`; every image its own size."""
        vc = hf_model.config.vision_config
        mlp = self.vision_layers(hf_model)[0].feed_forward
        return VisionConfig.from_encoder(
            vc, d_mlp=mlp.up_proj.out_features, normalization_type="RMS",
            positional_embedding_type="rotary", patch_size=vc.patch_size,  # image_size 0: every image its own size
            has_ln_pre=True, gated_mlp=True,
        )

    def use_processor(self, processor: Any) -> None:
        self.break_token_id = getattr(processor, "image_break_token_id", None)
        self.end_token_id = getattr(processor, "image_end_token_id", None)

    # ------------------------------------------------------------- hooks
    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        self._hf_model = hf_model  # its config: layouts, input checks, the probe batch, bridge names
        tower = self.vision_tower(hf_model)
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        norm = root.cfg.vision.normalization_type
        for layer, hooks in zip(self.vision_layers(hf_model), root.vision.blocks):
            instrument_block(layer, hooks, self.vision_block, use_result, norm)
        handles = [hook_packed_embeddings(tower.ln_pre, root.vision.hook_embed)]
        instrument_norm(tower.ln_pre, root.vision.ln_pre, norm)
        self.instrument_adapter(hf_model, root)
        lm = self.language_model(hf_model)
        return handles + instrument_language_model(lm, self.llm_layers(hf_model), self.llm_block, root, use_result)

    def instrument_adapter(self, hf_model: nn.Module, root: Any) -> None:
        """The projector: its RMSNorm (`vision.ln_post`), the 2x2 merger and the MLP."""
        instrument_projector(self.projector(hf_model), root.vision.ln_post, root.adapter, root.cfg.vision.normalization_type)

    def canonical_name(self, name: str) -> str:
        config = self._hf_model.config
        last = config.vision_config.num_hidden_layers - 1
        feature = self.feature_layer(config) % (last + 2) - 1  # the block whose output the projector reads
        blocks = {"vision_encoder.hook_out": last, "vision_projector.hook_in": feature}
        if name in blocks and blocks[name] >= 0:
            return f"vision.blocks.{blocks[name]}.hook_resid_post"
        return super().canonical_name(name)

    # ------------------------------------------------------------- images -> tokens
    def merge_size(self) -> int:
        """Patches per LLM token along each side (a LLaVA checkpoint with this tower has no merger: 1)."""
        return self._hf_model.config.spatial_merge_size

    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        config = self._hf_model.config
        sizes = inputs.get(SIZES)
        return mistral3_layout(
            input_ids.cpu(), None if sizes is None else sizes.cpu(), image_token_id=config.image_token_id,
            patch_size=config.vision_config.patch_size, merge=self.merge_size(),
            break_token_id=self.break_token_id, end_token_id=self.end_token_id, row_breaks=self.row_breaks,
        )

    def image_pixels(self, pixel_values: Tensor, image_index: int, **inputs: Tensor) -> Tensor:
        height, width = inputs[SIZES][image_index].tolist()
        return pixel_values[image_index, :, :height, :width]  # the batch pads at the bottom and right

    def mask_geometry(self, processor: Any) -> PixtralGeometry:
        return PixtralGeometry.from_processor(processor)

    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        n_tokens = int((input_ids == cfg.image_token_id).sum())
        if pixel_values is None:
            if n_tokens:
                raise InputError(f"{n_tokens} image tokens in input_ids but no pixel_values")
            return
        sizes = inputs.get(SIZES)
        if pixel_values.ndim != 4 or sizes is None or sizes.shape != (pixel_values.shape[0], 2):
            raise InputError(
                f"pixel_values of shape {tuple(pixel_values.shape)} need image_sizes [n_images, 2] (got "
                f"{None if sizes is None else tuple(sizes.shape)}); preprocess images with model.prepare(...)"
            )
        if (sizes[:, 0] > pixel_values.shape[2]).any() or (sizes[:, 1] > pixel_values.shape[3]).any():
            raise InputError(f"image_sizes {sizes.tolist()} exceed the padded pixel_values {tuple(pixel_values.shape)}")
        factor = self._hf_model.config.vision_config.patch_size * self.merge_size()
        expected = int(((sizes // factor)).prod(-1).sum())
        if n_tokens != expected:
            raise InputError(
                f"image_sizes make {expected} image tokens but input_ids hold {n_tokens}; the prompts' "
                "placeholders and the images must match"
            )

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """Two rows, one image each, of different sizes (token grids 2x3 and 3x2), each row of image
        tokens closed by a break and the last by an end token, text around; equal lengths."""
        config = self._hf_model.config
        factor = config.vision_config.patch_size * self.merge_size()
        grids = [(2, 3), (3, 2)]
        specials = {config.image_token_id, self.break_token_id, self.end_token_id}
        text = [t for t in range(min(cfg.d_vocab, 32)) if t not in specials][:6]
        breaking = text[-1] if self.break_token_id is None else self.break_token_id
        ending = text[-2] if self.end_token_id is None else self.end_token_id
        rows = []
        for k, (th, tw) in enumerate(grids):
            closing = [[ending if r == th - 1 else breaking] if self.row_breaks else [] for r in range(th)]
            image = [tok for r in range(th) for tok in [config.image_token_id] * tw + closing[r]]
            rows.append(text[:k] + image + text[k:])
        length = max(map(len, rows))
        ids = torch.tensor([row + text[: length - len(row)] for row in rows])
        sizes = torch.tensor(grids) * factor
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(2, config.vision_config.num_channels, *(int(s) for s in sizes.max(0).values), generator=generator)
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids), SIZES: sizes}
