"""Llama 4 (Llama4ForConditionalGeneration): a tiled vision tower with a 2-D complex rotary and a
trailing CLS token, a pixel shuffle + MLP + linear adapter, and a mixture-of-experts LLM whose
attention layers are of two kinds.

Images are cut into tiles plus a global image (`layout.py`, `geometry.py`); each frame goes through
the tower on its own (`tower.py`). The LLM's blocks are pre-norm RMSNorm blocks; the layers in
`moe_layers` (every `interleave_moe_layer_step`-th) route each token to the `num_experts_per_tok`
experts with the highest router logits, each weighted by the sigmoid of its logit *before* the
expert (on its input), and add a shared expert on every token; the others have a dense SwiGLU MLP
(`activation_fn`). Its attention layers (`attention.py`) are rotary layers with L2-normalised
queries and keys and chunked attention (`attention_chunk_size`: a token sees only earlier tokens
of its own chunk, counted from the row's first real token), or NoPE layers (`no_rope_layers`) with
full causal attention and the temperature-tuned queries. Hugging Face takes one 4-D mask per layer
type (`hf_attention_mask`). Bidirectional image attention opens the images in the full-attention
layers only; the chunked layers stay causal and chunked.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import einops
import torch
from jaxtyping import Bool, Int
from torch import Tensor, nn

from ....errors import InputError, LayoutMismatchError, UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, MoEConfig, StageConfig, VisionConfig
from ...images.layout import ImageTokenLayout
from ...runtime.attention_masks import additive_mask
from ...runtime.instrument import AttentionSpec, BlockSpec, instrument_language_model
from ...runtime.moe import MoESpec
from ..base import Architecture
from ..bridge_aliases import (
    LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES, MOE_ALIASES, PROJECTOR_OUTPUT_ALIASES, SHARED_EXPERT_ALIASES, alias,
)
from ..internvl.family import SIZES, InternVL, original_sizes
from ..llava import Llava
from ..module_paths import ModulePaths
from .attention import text_position_step
from .geometry import OriginalCanvasGeometry, plan_tiles
from .layout import END, GLOBAL_TAG, PATCH, ROW_BREAK, START, TILE_SEPARATOR, FrameSizes, image_span
from .tower import LLAMA4_VISION_BLOCK, instrument_adapter, instrument_tower


LLAMA4_MOE = MoESpec(router="router", scoring="sigmoid", top_k_of="logits", renormalize=False, weights_on="input",
                     transposed=True, shared_expert="shared_expert", returns_router_logits=True)
LLAMA4_BLOCK = BlockSpec(ln1="input_layernorm", attn="self_attn", ln2="post_attention_layernorm", mlp="feed_forward",
                         gated_mlp=True, attention=AttentionSpec(position_step=text_position_step, softmax_in_float32=False),
                         moe=LLAMA4_MOE)

_L = "blocks.{layer}."
# TL 4.3's Llama 4 bridge: its MoE bridge captures the router's logits as `hook_router_scores`; dense
# layers keep their projections under dense_* (as on every MoE stack), the shared expert its own
LLAMA4_MOE_ALIASES = (alias(_L + "mlp.hook_router_logits", _L + "mlp.hook_router_scores"),
                      *(a for a in MOE_ALIASES if "dense_" in a.bridge[0].text), *SHARED_EXPERT_ALIASES)
# the bridge wraps the tower (with its adapter) and the projector whole: the tower's output is the
# projector's input, our `adapter.hook_hidden` (the bridge's is flat, [frames * tokens, d])
LLAMA4_ADAPTER_ALIASES = (alias("adapter.hook_hidden", "vision_encoder.hook_out", "vision_projector.hook_in"),)
_DENSE_MLP_ALIASES = tuple(a for a in LLM_ALIASES if a.ours.text.startswith(_L + "mlp."))


class Llama4(Architecture):
    hf_class_names = ("Llama4ForConditionalGeneration",)
    module_paths = ModulePaths(vision_tower="vision_model", vision_layers="model.layers",
                               projector="multi_modal_projector", llm="language_model.model",
                               unembed="language_model.lm_head")
    bridge_aliases = (*LLAMA4_ADAPTER_ALIASES, *PROJECTOR_OUTPUT_ALIASES, *LLAMA4_MOE_ALIASES,
                      *(a for a in LLM_ALIASES if a not in _DENSE_MLP_ALIASES), *LLM_BRANCH_OUTPUT_ALIASES)
    layout_input_names = (SIZES,)
    special_token_fields = ("image_token_id", "boi_token_id", "eoi_token_id")
    llm_block = LLAMA4_BLOCK
    vision_block = LLAMA4_VISION_BLOCK
    # filled by `use_processor`: the ids of the image's marker tokens, and the tile size and count
    token_ids: dict[str, int] | None = None
    tiling: tuple[int, int] | None = None

    # ------------------------------------------------------------- config
    def check_supported(self, hf_model: nn.Module) -> None:
        config = hf_model.config
        attn = config.text_config._attn_implementation
        if attn not in ("eager", "sdpa"):
            raise UnsupportedModelError(
                f"Llama 4 with attn_implementation={attn!r}: the hooked attention adds Hugging Face's mask to its "
                "scores and cannot read that backend's mask; load with attn_implementation='eager' or 'sdpa'")
        vc = config.vision_config
        side, fold = vc.image_size // vc.patch_size, 1 / vc.pixel_shuffle_ratio
        if fold != round(fold) or side % round(fold):
            raise UnsupportedModelError(
                f"Llama 4 with pixel_shuffle_ratio={vc.pixel_shuffle_ratio} on {side} x {side} patches: the layout "
                "folds whole r x r squares of patches (r = 1 / ratio, an integer dividing the patches per side)")

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        config = hf_model.config
        vc, tc = config.vision_config, config.text_config
        self.shuffle = round(1 / vc.pixel_shuffle_ratio)
        self.chunk_size = tc.attention_chunk_size if "chunked_attention" in tc.layer_types else None
        self.full_layers = tuple(layer for layer, kind in enumerate(tc.layer_types) if kind == "full_attention")
        vision = VisionConfig.from_encoder(
            vc, d_mlp=vc.intermediate_size, normalization_type="LN", positional_embedding_type="rotary",
            image_size=vc.image_size, patch_size=vc.patch_size, has_cls=True, n_registers=0, has_ln_pre=True,
        )
        k = vc.image_size // vc.patch_size // self.shuffle
        adapter = AdapterConfig(
            kind=f"pixel_shuffle{self.shuffle}_mlp2x_gelu_linear", d_in=vc.hidden_size,
            d_hidden=vc.projector_output_dim,  # hook_hidden: the shuffled patches after the MLP
            d_out=tc.hidden_size, feature_layers=(vision.n_layers,), select_strategy="default",
            n_image_tokens=k * k, token_grid=(k, k),  # per frame (tile or global image)
        )
        return self.assemble_config(hf_model, vision, adapter, self.llm_config(tc))

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        moe = MoEConfig(layers=tuple(tc.moe_layers), n_experts=tc.num_local_experts, top_k=tc.num_experts_per_tok,
                        d_expert=tc.intermediate_size, shared_expert=True) if tc.moe_layers else None
        return replace(Llava.llm_config(tc), d_mlp=tc.intermediate_size_mlp, moe=moe)

    def mask_geometry(self, processor: Any) -> OriginalCanvasGeometry:
        return OriginalCanvasGeometry()

    def use_processor(self, processor: Any) -> None:
        tokenizer, images = getattr(processor, "tokenizer", None), getattr(processor, "image_processor", None)
        if tokenizer is None or images is None:
            return
        names = {START: processor.start_of_img_token, END: processor.end_of_img_token, GLOBAL_TAG: processor.image_token,
                 TILE_SEPARATOR: processor.tile_token, ROW_BREAK: processor.tile_global_token, PATCH: processor.img_patch_token}
        self.token_ids = {kind: tokenizer.convert_tokens_to_ids(token) for kind, token in names.items()}
        self.tiling = (int(images.size["height"]), int(images.max_patches))

    # ------------------------------------------------------------- hooks
    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        tower = self.vision_tower(hf_model)
        handles = instrument_tower(tower, root.vision, self.vision_block, use_result)
        instrument_adapter(tower.vision_adapter, self.projector(hf_model), root.adapter, root.cfg.adapter.n_image_tokens)
        lm, layers, spec = self.language_model(hf_model), self.llm_layers(hf_model), self.llm_block
        handles += instrument_language_model(lm, layers, spec, root, use_result)
        return handles

    # ------------------------------------------------------------- attention
    def image_attention_layers(self, cfg: MLLMConfig) -> tuple[int, ...]:
        """The full-attention (NoPE) layers: a chunked layer cuts images at chunk boundaries, so images
        see each other both ways only where attention is not chunked."""
        return self.full_layers

    def hf_attention_mask(self, edges: Bool[Tensor, "batch seq seq"], dtype: torch.dtype = torch.float32) -> Any:
        """One 4-D mask per layer type, as Llama 4's forward takes them: the chunked layers keep only
        the causal edges within a chunk, chunks counted from each row's first real token (Hugging
        Face's `chunked_overlay` with its left padding; a real token always sees itself, so the
        padding is where the diagonal is blocked)."""
        masks = {"full_attention": additive_mask(edges, dtype)}
        if self.chunk_size is not None:
            seq = edges.shape[-1]
            left = (edges.diagonal(dim1=-2, dim2=-1).long().cumsum(-1) == 0).sum(-1, keepdim=True)
            chunk = torch.div(torch.arange(seq, device=edges.device) - left, self.chunk_size, rounding_mode="floor")
            causal = torch.ones(seq, seq, dtype=torch.bool, device=edges.device).tril()
            masks["chunked_attention"] = additive_mask(edges & causal & (chunk[:, :, None] == chunk[:, None, :]), dtype)
        return masks

    # ------------------------------------------------------------- images -> tokens
    @staticmethod
    def _sizes(inputs: dict[str, Tensor], needed: bool) -> list[tuple[int, int]]:
        return original_sizes(
            inputs, needed, "Llama 4's layout needs each image's original size (image_sizes, [n_images, 2] as (height, "
            "width)) to place its tiles: the tokens give the tile grid but not how far the image fills it")

    # each image's original (height, width), in `pixel_values` order, as InternVL's layout takes them
    layout_inputs = InternVL.layout_inputs

    def _processor_facts(self, cfg: MLLMConfig) -> tuple[dict[str, int], int]:
        if self.token_ids is None or self.tiling is None:
            raise InputError("Llama 4's layout reads the image marker tokens and the tiling from the processor; pass "
                             "processor= to HookedMLLM.from_hf")
        tile, max_tiles = self.tiling
        if tile != cfg.vision.image_size or self.token_ids[PATCH] != cfg.image_token_id:
            raise InputError(f"the processor makes {tile}-px tiles of token {self.token_ids[PATCH]} but the model takes "
                             f"{cfg.vision.image_size}-px tiles of token {cfg.image_token_id}: a processor of another model")
        return self.token_ids, max_tiles

    def _frame_sizes(self, cfg: MLLMConfig) -> FrameSizes:
        side = cfg.vision.image_size // cfg.vision.patch_size
        return FrameSizes(cfg.vision.image_size, cfg.vision.patch_size, side, cfg.adapter.token_grid[0], self.shuffle)

    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        ids_all = input_ids.cpu()
        placeholders = int((ids_all == cfg.image_token_id).sum())
        sizes = self._sizes(inputs, needed=placeholders > 0)
        frame_sizes = self._frame_sizes(cfg)
        rows: list[tuple] = []
        image = frame = covered = 0
        if placeholders:
            token_ids, max_tiles = self._processor_facts(cfg)
        for b, ids in enumerate(ids_all):
            spans = []
            for start in (ids == token_ids[START]).nonzero().flatten().tolist() if placeholders else []:
                if image >= len(sizes):
                    raise LayoutMismatchError(f"batch row {b} has images beyond the {len(sizes)} in image_sizes")
                span, frames = image_span(b, image, start, ids, sizes[image], frame, frame_sizes, token_ids, max_tiles)
                spans.append(span)
                image, frame, covered = image + 1, frame + frames, covered + len(span.positions)
            rows.append(tuple(spans))
        if image != len(sizes) or covered != placeholders:
            raise LayoutMismatchError(f"{len(sizes)} image_sizes and {placeholders} image tokens, but {image} image(s) "
                                      f"wrapped in <|image_start|> ... <|image_end|> cover {covered} of them")
        return ImageTokenLayout(tuple(rows), input_ids.shape[1], (frame, frame_sizes.side ** 2 + 1), (frame, frame_sizes.n))

    def _frames(self, tile: int, sizes: list[tuple[int, int]]) -> tuple[list[tuple[int, tuple[int, int], tuple[int, int]]], int]:
        """Per image its first frame, its (rows, cols) of tiles and where the resized image ends in
        them; and the frames of all the images."""
        if self.tiling is None:
            raise InputError("Llama 4's frames follow the processor's tiling; pass processor= to HookedMLLM.from_hf")
        out, frame = [], 0
        for size in sizes:
            plan = plan_tiles(size, tile, self.tiling[1])
            tiles = plan.rows * plan.cols
            out.append((frame, (plan.rows, plan.cols), plan.content))
            frame += tiles + (tiles > 1)  # the global image only beside several tiles
        return out, frame

    def image_pixels(self, pixel_values: Tensor, image_index: int, **inputs: Tensor) -> Tensor:
        """Image `image_index` as the tower saw it: its tiles put back together and cropped to the
        resized image, [3, h, w] (the padding the processor added left out)."""
        tile = pixel_values.shape[-1]
        first, (rows, cols), (height, width) = self._frames(tile, self._sizes(inputs, needed=True))[0][image_index]
        joined = einops.rearrange(pixel_values[first:first + rows * cols], "(r c) ch h w -> ch (r h) (c w)", r=rows, c=cols)
        return joined[:, :height, :width]

    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        n_tokens = int((input_ids == cfg.image_token_id).sum())
        if pixel_values is None:
            if n_tokens:
                raise InputError("image tokens in input_ids but no pixel_values")
            return
        tile, n = cfg.vision.image_size, cfg.adapter.n_image_tokens
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, tile, tile):
            raise InputError(f"pixel_values have shape {tuple(pixel_values.shape)} but {cfg.architecture} takes "
                             f"[frames, 3, {tile}, {tile}] (every image's tiles and global image); use model.prepare(...)")
        if n_tokens != len(pixel_values) * n:
            raise InputError(f"{len(pixel_values)} frames (tiles and global images) need {len(pixel_values) * n} image "
                             f"tokens but input_ids hold {n_tokens}; the prompts' placeholders and the images must match")
        sizes = self._sizes(inputs, needed=False)
        if sizes:
            total = self._frames(tile, sizes)[1]
            if total != len(pixel_values):
                raise InputError(f"image_sizes {sizes} make {total} frames but pixel_values hold {len(pixel_values)}")

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """Two rows: an image of one tile, and one of 1 x 2 tiles plus its global image (no sizes:
        the model does not need them, only the layout does)."""
        generator = torch.Generator().manual_seed(seed)
        tile, n = cfg.vision.image_size, cfg.adapter.n_image_tokens
        text = [t for t in range(min(cfg.d_vocab, 16)) if t != cfg.image_token_id][:4]
        ids = self.token_ids or {START: text[1], END: text[2], GLOBAL_TAG: text[3], TILE_SEPARATOR: text[1],
                                 ROW_BREAK: text[2]}
        run = [cfg.image_token_id] * n
        rows = [[ids[START], ids[GLOBAL_TAG], *run, ids[END]] + text,
                [ids[START], *run, ids[TILE_SEPARATOR], *run, ids[ROW_BREAK], ids[GLOBAL_TAG], *run, ids[END]] + text]
        length = max(map(len, rows))
        input_ids = torch.tensor([[text[0]] * (length - len(r)) + r for r in rows])
        pixels = torch.randn(4, 3, tile, tile, generator=generator)
        return {"input_ids": input_ids, "pixel_values": pixels, "attention_mask": torch.ones_like(input_ids)}
