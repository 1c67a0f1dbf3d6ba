"""Llama 3.2 Vision (MllamaForConditionalGeneration): a tiled tower with a local and a gated global
encoder (`tower.py`), a linear projector, and a Llama LLM that reads the images only in its
cross-attention layers (`cross_attention.py`): image features are keys and values there, never
tokens of the LLM's sequence.

The `<|image|>` placeholder stays one ordinary text token; `cross_attention_mask` ([batch, seq,
image slot, tile]) says which tiles each text token may read (from its image's placeholder on).
The layout is therefore cross-attended (`layout.py`): its `llm` stage is the cross-attention keys.
Analyses built on image tokens in the sequence (knockouts and the bidirectional edit of image
positions, probes at LLM image positions) are refused by name; text -> image knockout edits the
cross-attention mask instead (`knockout.py`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ....errors import InputError, UnsupportedModelError
from ...config import CROSS_ATTENTION, AdapterConfig, MLLMConfig, VisionConfig
from ...hook_tree import fire
from ...images.layout import CrossAttendedLayout
from ...runtime.instrument import instrument_block
from ...runtime.layer_runs import silenced
from ...runtime.norms import instrument_norm
from ..base import Architecture
from ..llava.family import LLM_BLOCK, Llava
from ..module_paths import ModulePaths
from ..passed_checks import passed_checks
from .cross_attention import instrument_cross_attention_block
from .geometry import TileCanvasGeometry
from .layout import cross_attended_layout, tile_grid
from .tower import instrument_tower, tower_blocks

IMAGE_INPUTS = ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


class Mllama(Architecture):
    hf_class_names = ("MllamaForConditionalGeneration",)
    module_paths = ModulePaths(vision_tower="model.vision_model", vision_layers="transformer.layers",
                               projector="model.multi_modal_projector", llm="model.language_model",
                               unembed="lm_head")
    extra_input_names = IMAGE_INPUTS
    # every LLM-only run still reads the images, at each cross-attention layer
    llm_input_names = ("cross_attention_mask",)
    attention_modes = ("causal",)
    images_per_row = True  # the processor puts each row's images in its own slots
    llm_block = LLM_BLOCK
    special_token_fields = ("image_token_index",)

    # ------------------------------------------------------------- config
    def check_supported(self, hf_model: nn.Module) -> None:
        attn = hf_model.config.text_config._attn_implementation
        if attn not in ("eager", "sdpa"):
            raise UnsupportedModelError(
                f"Mllama with attn_implementation={attn!r}: the hooked attention adds Hugging Face's mask to its "
                "scores and cannot read that backend's mask; load with attn_implementation='eager' or 'sdpa'")

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        config = hf_model.config
        vc, tc = config.vision_config, config.text_config
        self.tile, self.max_tiles = vc.image_size, vc.max_num_tiles
        self.aspect_ratios = [list(r) for r in vc.supported_aspect_ratios]
        vision = VisionConfig(
            n_layers=vc.num_hidden_layers + vc.num_global_layers, n_heads=vc.attention_heads, d_model=vc.hidden_size,
            d_head=vc.hidden_size // vc.attention_heads, d_mlp=vc.intermediate_size, n_key_value_heads=vc.attention_heads,
            normalization_type="LN", positional_embedding_type="learned", image_size=vc.image_size,
            patch_size=vc.patch_size, has_cls=True, has_ln_pre=True,
        )
        side = vc.image_size // vc.patch_size
        adapter = AdapterConfig(
            kind="linear", d_in=vc.vision_output_dim, d_hidden=None, d_out=tc.hidden_size,
            feature_layers=(*vc.intermediate_layers_indices, vision.n_layers), select_strategy="full",
            n_image_tokens=side * side + 1, token_grid=(side, side),  # per tile: CLS and its patches
        )
        kinds = tuple(CROSS_ATTENTION if layer in tc.cross_attention_layers else "full_attention"
                      for layer in range(tc.num_hidden_layers))
        llm = replace(Llava.llm_config(tc), layer_types=kinds)
        cfg = self.assemble_config(hf_model, vision, adapter, llm)
        # the embedding holds 8 tokens past vocab_size (the image token among them); lm_head has vocab_size
        return replace(cfg, image_token_id=config.image_token_index)

    # ------------------------------------------------------------- modules
    def vision_layers(self, hf_model: nn.Module) -> nn.ModuleList:
        return tower_blocks(self.vision_tower(hf_model))

    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        handles = instrument_tower(self.vision_tower(hf_model), self.projector(hf_model), root)
        # a run from the LLM's input recomputes the images' features with these quiet (`llm_keywords`)
        self._tower_points = [m for group in (root.vision, root.adapter) for m in group.modules() if isinstance(m, HookPoint)]
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        cross = set(root.cfg.llm.cross_attention_layers)
        for index, (layer, hooks) in enumerate(zip(self.llm_layers(hf_model), root.blocks)):
            if index in cross:
                instrument_cross_attention_block(layer, hooks, use_result)
            else:
                instrument_block(layer, hooks, self.llm_block, use_result, "RMS")
        lm = self.language_model(hf_model)
        instrument_norm(lm.norm, root.ln_final, "RMS")

        # no image features are merged into the sequence: the LLM's input is the text embedding
        def embedded(x: Tensor) -> Tensor:
            return fire(root.hook_multimodal_embed, fire(root.hook_embed, x))

        def given_embeddings(_module, args, kwargs):
            if kwargs.get("inputs_embeds") is not None:
                kwargs["inputs_embeds"] = embedded(kwargs["inputs_embeds"])
            states = kwargs.get("cross_attention_states")
            if states is not None:  # Hugging Face's [row * tiles, tokens, d] as [row, keys, d]: rows can be cut
                batch = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[0]
                kwargs["cross_attention_states"] = states.reshape(batch, -1, states.shape[-1])
            return args, kwargs

        return handles + [lm.embed_tokens.register_forward_hook(lambda _m, _a, out: embedded(out)),
                          lm.register_forward_pre_hook(given_embeddings, with_kwargs=True)]

    def llm_keywords(self, hf_model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The images' features for the cross-attention layers: a run from the text embeddings still
        reads the images there, so it needs them, recomputed from the pixels with the tower's and the
        adapter's hook points quiet (only the LLM runs, as on every family)."""
        if inputs.get("pixel_values") is None:
            raise InputError("Mllama's LLM reads the images at every cross-attention layer, so a run from the LLM's "
                             "input embeddings needs the images too: pass the MultimodalInputs from model.prepare")
        model = hf_model.model
        with silenced(*self._tower_points):
            features = model.vision_model(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                          aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
            states = model.multi_modal_projector(features)
        return {"cross_attention_states": states.flatten(1, 3)}

    # ------------------------------------------------------------- images
    def extend_by_one_token(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        """A generated token reads the tiles its row's last token read, as Hugging Face's generation
        extends `cross_attention_mask`."""
        mask = extra.get("cross_attention_mask")
        if mask is None:
            return extra
        return {**extra, "cross_attention_mask": torch.cat([mask, mask[:, -1:]], dim=1)}

    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> CrossAttendedLayout:
        ratios = inputs.get("aspect_ratio_ids")
        if ratios is None:
            ratios = torch.zeros(input_ids.shape[0], 1, dtype=torch.long)
        return cross_attended_layout(input_ids.cpu(), ratios.cpu(), image_token_id=cfg.image_token_id, tile=self.tile,
                                     patch=cfg.vision.patch_size, max_tiles=self.max_tiles,
                                     aspect_ratios=self.aspect_ratios)

    def mask_geometry(self, processor: Any) -> TileCanvasGeometry:
        return TileCanvasGeometry(self.tile, processor.image_processor.max_image_tiles)

    def image_pixels(self, pixel_values: Tensor, image_index: int, **inputs: Tensor) -> Float[Tensor, "3 height width"]:
        """Image `image_index`'s canvas (its tiles put back in place), from [batch, slot, tile, 3, h, w] pixels."""
        ratios = inputs["aspect_ratio_ids"]
        images = [(b, s) for b in range(ratios.shape[0]) for s in range(ratios.shape[1]) if ratios[b, s] > 0]
        b, slot = images[image_index]
        rows, cols = tile_grid(int(ratios[b, slot]), self.aspect_ratios)
        tiles = pixel_values[b, slot, : rows * cols]
        return tiles.unflatten(0, (rows, cols)).permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2)

    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        if pixel_values is None:
            return
        tile = cfg.vision.image_size
        if pixel_values.ndim != 6 or tuple(pixel_values.shape[-3:]) != (3, tile, tile) \
                or pixel_values.shape[0] != input_ids.shape[0] or pixel_values.shape[2] != self.max_tiles:
            raise InputError(
                f"pixel_values have shape {tuple(pixel_values.shape)} but this model takes [batch {input_ids.shape[0]}, "
                f"image slots, {self.max_tiles} tiles, 3, {tile}, {tile}]; preprocess images with model.prepare(...)")
        missing = [name for name in IMAGE_INPUTS if name not in inputs]
        if missing:
            raise InputError(f"images without {missing}: Mllama needs every keyword its processor returns "
                             "(use model.prepare(...))")
        # placeholders and images per row must match; the walk builds the layout, so a batch that passed is
        # remembered by the values it reads
        passed_checks(self).run(lambda: self.layout(cfg, input_ids, **inputs), input_ids, inputs["aspect_ratio_ids"])

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """Two rows, one image each: a single tile, and the widest grid of tiles, with text before and after."""
        generator = torch.Generator().manual_seed(seed)
        tile = cfg.vision.image_size
        pixels = torch.randn(2, 1, self.max_tiles, 3, tile, tile, generator=generator)
        wide = max(range(len(self.aspect_ratios)), key=lambda i: self.aspect_ratios[i][0] * self.aspect_ratios[i][1])
        ratio_ids = torch.tensor([[1], [wide + 1]])
        tiles = [1, self.aspect_ratios[wide][0] * self.aspect_ratios[wide][1]]
        ratio_mask = torch.tensor([[[int(t < n) for t in range(self.max_tiles)]] for n in tiles])
        text = [t for t in range(min(cfg.d_vocab, 16)) if t != cfg.image_token_id][:4]
        ids = torch.tensor([[text[0], cfg.image_token_id, *text[1:]], [*text[:2], cfg.image_token_id, *text[2:3], text[0]]])
        after = (torch.arange(ids.shape[1]) >= (ids == cfg.image_token_id).int().argmax(1, keepdim=True)).long()
        cross = after[:, :, None, None] * ratio_mask[:, None]
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids),
                "aspect_ratio_ids": ratio_ids, "aspect_ratio_mask": ratio_mask, "cross_attention_mask": cross}

    # ------------------------------------------------------------- cross-attention edits
    def cross_attention_keys_blocked(
        self, layout: CrossAttendedLayout, extra: dict[str, Tensor], queries: Tensor, images: list[int] | None,
        tiles: list[int] | None,
    ) -> dict[str, Tensor]:
        """The family's keywords with the text tokens `queries` ([batch, seq]) cut off from the tiles
        `tiles` (None: all) of the images `images` (layout order; None: all) in every cross-attention
        layer: what Hugging Face runs when its `cross_attention_mask` is edited by hand, which is
        what this does. A text token left with no tile sees no image: Hugging Face then drops its
        cross-attention MLP (the `hook_mlp_gate` is 0 there) and spreads its attention evenly."""
        mask = extra["cross_attention_mask"].clone()
        chosen = range(layout.n_images) if images is None else images
        for index in chosen:
            span = layout.spans[index]
            slot = sum(1 for other in layout.images[span.row] if other.image_index < span.image_index)
            cut = list(range(len(span.segments))) if tiles is None else list(tiles)
            bad = [t for t in cut if not 0 <= t < len(span.segments)]
            if bad:
                raise InputError(f"tiles {bad} out of range: image {index} has tiles 0..{len(span.segments) - 1}")
            rows = queries[span.row].to(mask.device)
            for t in cut:
                mask[span.row, rows, slot, t] = 0
        return {**extra, "cross_attention_mask": mask}
