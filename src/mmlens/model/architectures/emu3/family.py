"""Emu3 (Emu3ForConditionalGeneration): a VQ tokenizer's encoder -> discrete codes -> a Llama-style LLM.

An image (resized so both sides are multiples of 8, the encoder's spatial factor) becomes an h x w
grid of codes (`vq_encoder.py`: the vision stage). The adapter is a lookup, nothing learned beyond
the LLM's own embedding: each code is mapped to its token id (`<|visual token NNNNNN|>`), an
end-of-row token follows each row, and the LLM's token embedding embeds them; they replace the
image's h x (w + 1) placeholders, which the processor wraps in `<|image start|>h*w<|image token|>` ...
`<|extra_201|><|image end|>` (text). Its points: `adapter.hook_in` (the token ids, [n_tokens] over
every image, end-of-row tokens included; an edit there swaps codes) and `adapter.hook_out` (their
embeddings, [n_tokens, d_model]). The code grid is a `CodeGridLayout`. The argmin between the two
stages has no gradient: attribution from the LLM stops at `adapter.hook_out`, and a patch at a vision
point reaches the LLM only where it changes a chosen code.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from ....errors import InputError, UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, VisionConfig
from ...hook_tree import fire, is_hooked
from ...images.layout import ImageTokenLayout, code_grid_layout
from ...runtime.instrument import instrument_language_model
from ..base import Architecture
from ..bridge_aliases import LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES
from ..llava import LLM_BLOCK, Llava
from ..module_paths import ModulePaths
from .geometry import Emu3Geometry
from .vq_encoder import BeforeArgminHookPoint, add_vq_hooks, code_units, instrument_vq_encoder

SIZES = "image_sizes"


class _MethodOverride:
    """An instance attribute shadowing a method (Emu3Model.get_image_features), removable like a hook handle."""

    def __init__(self, owner: Any, name: str, method: Any):
        self.owner, self.name = owner, name
        setattr(owner, name, method)

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


class Emu3(Architecture):
    hf_class_names = ("Emu3ForConditionalGeneration",)
    extra_input_names = (SIZES,)
    module_paths = ModulePaths(vision_tower="model.vqmodel.encoder", vision_layers="middle_block",  # see vision_layers
                               projector="model.vqmodel.quantize", llm="model.text_model")
    # TransformerBridge (TL 4.3) wraps Emu3's text model as Llama and leaves the VQ tokenizer unmapped
    bridge_aliases = (*LLM_ALIASES, *LLM_BRANCH_OUTPUT_ALIASES)
    llm_block = LLM_BLOCK
    # the `<|image token|>` before each image's codes and the `<|extra_201|>` after them, from the processor
    markers: dict[str, int | None] = {}

    def check_supported(self, hf_model: nn.Module) -> None:
        """Refuse, by name, the VQ options whose hooks would need another resolution than the code grid."""
        vq = hf_model.config.vq_config
        last = len(vq.channel_multiplier) - 1
        problem = None
        if list(vq.attn_resolutions) != [last]:
            problem = (f"attn_resolutions = {list(vq.attn_resolutions)}: mmlens hooks the VQ encoder's attention at "
                       f"code resolution, its last level ({last}), as released; attention at a finer level needs a "
                       "patch grid of that resolution in the layout")
        elif vq.double_latent:
            problem = "double_latent = True (a latent of mean and variance), which the released tokenizer does not have"
        if problem:
            raise UnsupportedModelError(f"Emu3ForConditionalGeneration: config.vq_config.{problem}")

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        config = hf_model.config
        vq, text = config.vq_config, config.text_config
        width = vq.base_channels * vq.channel_multiplier[-1]
        factor = 2 ** (len(vq.channel_multiplier) - 1)
        vision = VisionConfig(
            n_layers=len(code_units(self.vision_tower(hf_model))), n_heads=vq.num_attention_heads, d_model=width,
            d_head=width // vq.num_attention_heads, d_mlp=width, n_key_value_heads=vq.num_attention_heads,
            normalization_type="GroupNorm", positional_embedding_type="none",  # convolutions carry position
            patch_size=factor, has_ln_post=False,  # image_size 0: every image its own size
        )
        adapter = AdapterConfig(
            kind="vq_code_lookup", d_in=vq.embed_dim, d_hidden=None, d_out=text.hidden_size,
            feature_layers=(vision.n_layers,), select_strategy="full",
            n_image_tokens=0, token_grid=(0, 0),  # variable: h x (w + 1) per image
        )
        return self.assemble_config(hf_model, vision, adapter, Llava.llm_config(text))

    def use_processor(self, processor: Any) -> None:
        tokenizer = processor.tokenizer
        self.markers = {"start": tokenizer.convert_tokens_to_ids(processor.fake_token_around_image),
                        "end": tokenizer.convert_tokens_to_ids(processor.eof_token)}

    # ------------------------------------------------------------- hooks
    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        vqmodel = hf_model.model.vqmodel
        add_vq_hooks(root.vision, vqmodel.encoder)
        root.adapter.hook_in.__class__ = BeforeArgminHookPoint  # integer token ids: no gradient either
        instrument_vq_encoder(vqmodel.encoder, vqmodel.quantize, root.vision, use_result)
        handles = [self._instrument_lookup(hf_model.model, root.adapter)]
        lm = self.language_model(hf_model)
        return handles + instrument_language_model(lm, self.llm_layers(hf_model), self.llm_block, root, use_result)

    @staticmethod
    def _instrument_lookup(emu3: nn.Module, adapter: Any) -> _MethodOverride:
        """`adapter.hook_in` on the token ids the codes map to, `adapter.hook_out` on their embeddings;
        Hugging Face's own method runs while neither listens."""
        original = emu3.get_image_features
        factor = emu3.vqmodel.vision_spatial_factor

        def get_image_features(pixel_values: Tensor, image_sizes: Tensor, **kwargs: Any) -> Any:
            if not (is_hooked(adapter.hook_in) or is_hooked(adapter.hook_out)):
                return original(pixel_values, image_sizes, **kwargs)
            encoded = emu3.vqmodel.encode(pixel_values, image_sizes, return_dict=True, **kwargs)
            mapping = emu3.vocabulary_mapping
            ids = fire(adapter.hook_in, torch.cat([mapping.convert_img2bpe(codes).flatten() for codes in encoded.image_tokens]))
            embeddings = fire(adapter.hook_out, emu3.get_input_embeddings()(ids))
            split = [(int(h) // factor) * (int(w) // factor + 1) for h, w in image_sizes]
            encoded.pooler_output = torch.split(embeddings, split)
            return encoded

        return _MethodOverride(emu3, "get_image_features", get_image_features)

    def vision_layers(self, hf_model: nn.Module) -> nn.ModuleList:
        """The attention modules at code resolution, one per `vision.blocks.{i}` (the encoder has no
        list of such blocks: each is an attention and the resnet block after it, `code_units`)."""
        return nn.ModuleList(attn for attn, _, _ in code_units(self.vision_tower(hf_model)))

    def blocks(self, hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The LLM's blocks. The VQ encoder's hooked path runs each image once where Hugging Face runs
        every temporal copy, so its modules' outputs have other shapes than the bare ones; its maths is
        checked against Hugging Face's recorded states in the family's tests."""
        return [(f"blocks.{l}", m) for l, m in enumerate(self.llm_layers(hf_model))]

    # ------------------------------------------------------------- images -> tokens
    @staticmethod
    def _factor(cfg: MLLMConfig) -> int:
        return cfg.vision.patch_size

    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        factor = self._factor(cfg)
        sizes = inputs.get(SIZES)
        grids = [] if sizes is None else [(int(h) // factor, int(w) // factor) for h, w in sizes.tolist()]
        padded = tuple(max((g[d] for g in grids), default=0) for d in (0, 1))  # the processor pads to the largest
        return code_grid_layout(input_ids.cpu(), grids, image_token_id=cfg.image_token_id, padded_grid=padded,
                                code_size=factor, markers=self.markers)

    def image_pixels(self, pixel_values: Tensor, image_index: int, **inputs: Tensor) -> Tensor:
        height, width = inputs[SIZES][image_index].tolist()
        return pixel_values[image_index, :, :height, :width]  # the batch pads at the bottom and right

    def mask_geometry(self, processor: Any) -> Emu3Geometry:
        return Emu3Geometry.from_processor(processor)

    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        n_tokens = int((input_ids == cfg.image_token_id).sum())
        if pixel_values is None:
            if n_tokens:
                raise InputError(f"{n_tokens} image placeholders in input_ids but no pixel_values")
            return
        sizes, factor = inputs.get(SIZES), self._factor(cfg)
        if pixel_values.ndim != 4 or sizes is None or tuple(sizes.shape) != (pixel_values.shape[0], 2):
            raise InputError(
                f"pixel_values of shape {tuple(pixel_values.shape)} need image_sizes [n_images, 2] (got "
                f"{None if sizes is None else tuple(sizes.shape)}); preprocess images with model.prepare(...)")
        if (sizes % factor).any() or (sizes[:, 0] > pixel_values.shape[2]).any() or (sizes[:, 1] > pixel_values.shape[3]).any():
            raise InputError(f"image_sizes {sizes.tolist()} must be multiples of {factor} px inside the padded "
                             f"pixel_values {tuple(pixel_values.shape)}; preprocess images with model.prepare(...)")
        expected = int(((sizes[:, 0] // factor) * (sizes[:, 1] // factor + 1)).sum())
        if n_tokens != expected:
            raise InputError(f"image_sizes make {expected} image placeholders (rows x (codes per row + 1) each) but "
                             f"input_ids hold {n_tokens}; the prompts' placeholders and the images must match")

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """Two rows, one image each, of different code grids (2x3 and 3x2), each between its markers."""
        factor = self._factor(cfg)
        grids = [(2, 3), (3, 2)]
        marks = [m for m in self.markers.values() if m is not None]
        text = [t for t in range(min(cfg.d_vocab, 32)) if t != cfg.image_token_id and t not in marks][:6]
        start, end = self.markers.get("start") or text[-1], self.markers.get("end") or text[-2]
        rows = [text[:k] + [start] + [cfg.image_token_id] * (h * (w + 1)) + [end] + text[k:3]
                for k, (h, w) in enumerate(grids)]
        length = max(map(len, rows))
        ids = torch.tensor([row + text[: length - len(row)] for row in rows])
        sizes = torch.tensor(grids) * factor
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(2, 3, *(int(s) for s in sizes.max(0).values), generator=generator)
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids), SIZES: sizes}
