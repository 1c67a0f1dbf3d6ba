"""Dimensions of a multimodal model, stage by stage, read from its Hugging Face config.

`MLLMConfig` describes the vision encoder, the adapter and the LLM separately and also exposes
the LLM's dimensions under the classic TransformerLens names (`n_layers`, `d_model`, ...) so that
`ActivationCache` helpers such as `accumulated_resid` work on the LLM stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

LINEAR_ATTENTION = "linear_attention"  # Hugging Face's layer type of a gated-delta-rule block
# a block whose attention reads the images' features as keys and values, not the sequence (Mllama)
CROSS_ATTENTION = "cross_attention"


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts blocks of a stack: which layers route (the others keep a dense MLP),
    among how many experts, how many each token takes, each expert's width, and whether a shared
    expert runs beside them on every token."""

    layers: tuple[int, ...]
    n_experts: int
    top_k: int
    d_expert: int
    shared_expert: bool = False


@dataclass(frozen=True)
class StageConfig:
    """One transformer stack (vision encoder or LLM)."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    n_key_value_heads: int
    normalization_type: str  # "LN" or "RMS"
    positional_embedding_type: str  # "learned" or "rotary"
    gated_mlp: bool = False  # act(gate(x)) * up(x) (Llama) rather than act(fc1(x))
    # TL's names: sandwich norms on the attention and MLP outputs (Gemma 2/3), per-head q/k RMSNorms
    use_normalization_before_and_after: bool = False
    use_qk_norm: bool = False
    # each block's token mixer as Hugging Face's `layer_types` names it ("full_attention", or
    # LINEAR_ATTENTION: Qwen3.5's gated delta rule, which has no attention pattern); empty: all attend
    layer_types: tuple[str, ...] = ()
    # the blocks whose MLP is a sparse mixture of experts (None: every MLP is dense)
    moe: MoEConfig | None = None
    # TL's name: attention and MLP read the same normalised input and add to the residual together,
    # x + attn(ln1(x)) + mlp(ln1(x)) (Cohere2), so a block has no resid_mid and its MLP reads resid_pre
    parallel_attn_mlp: bool = False

    @property
    def linear_attention_layers(self) -> tuple[int, ...]:
        """The blocks whose token mixer is a linear attention (no pattern, no heads to knock out)."""
        return tuple(layer for layer, kind in enumerate(self.layer_types) if kind == LINEAR_ATTENTION)

    @property
    def cross_attention_layers(self) -> tuple[int, ...]:
        """The blocks whose attention reads image features, not the sequence (no self-attention pattern)."""
        return tuple(layer for layer, kind in enumerate(self.layer_types) if kind == CROSS_ATTENTION)


@dataclass(frozen=True)
class VisionConfig(StageConfig):
    image_size: int = 0
    patch_size: int = 0
    has_cls: bool = False
    n_registers: int = 0  # register tokens after the CLS token (DINOv2 with registers)
    has_ln_pre: bool = False  # a LayerNorm between embeddings and the first block (CLIP)
    has_ln_post: bool = True  # a norm after the last block (`vision.ln_post`); InternViT has none

    @classmethod
    def from_encoder(cls, vc, **fields) -> "VisionConfig":
        """The stack's sizes read from a Hugging Face vision config with the usual names
        (`num_hidden_layers`, `num_attention_heads`, `hidden_size`; every head its own key/value
        head), and the rest from `fields`."""
        return cls(n_layers=vc.num_hidden_layers, n_heads=vc.num_attention_heads, d_model=vc.hidden_size,
                   d_head=vc.hidden_size // vc.num_attention_heads, n_key_value_heads=vc.num_attention_heads, **fields)

    @property
    def patch_grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def n_patches(self) -> int:
        rows, cols = self.patch_grid
        return rows * cols


@dataclass(frozen=True)
class AdapterConfig:
    """The projector between vision and LLM: which vision layer it reads and how."""

    kind: str  # e.g. "mlp2x_gelu"
    d_in: int
    d_hidden: int | None
    d_out: int
    feature_layers: tuple[int, ...]  # resolved, non-negative indices of vision blocks it reads
    select_strategy: str  # "default" drops the CLS token, "full" keeps it
    n_image_tokens: int  # LLM tokens per image
    token_grid: tuple[int, int]  # LLM token grid per image


@dataclass(frozen=True)
class MLLMConfig:
    """Vision, adapter and LLM dimensions; the LLM's are also at top level, TransformerLens style."""

    architecture: str
    vision: VisionConfig
    adapter: AdapterConfig
    llm: StageConfig
    d_vocab: int
    image_token_id: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    attn_only: bool = False
    layers_block_type: None = None
    use_attn_result: bool = False
    # TransformerLens's meanings, for the LLM: its context length (`max_position_embeddings`; None
    # if the config has none), its MLP activation (Hugging Face's name), whether `to_tokens`
    # prepends BOS by default, and whether the tokenizer adds BOS by itself (None: no tokenizer).
    n_ctx: int | None = None
    act_fn: str | None = None
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool | None = None

    # Classic TransformerLens names refer to the LLM, as in HookedTransformer.
    @property
    def n_layers(self) -> int:
        return self.llm.n_layers

    @property
    def n_heads(self) -> int:
        return self.llm.n_heads

    @property
    def d_model(self) -> int:
        return self.llm.d_model

    @property
    def d_head(self) -> int:
        return self.llm.d_head

    @property
    def d_mlp(self) -> int:
        return self.llm.d_mlp

    @property
    def n_key_value_heads(self) -> int:
        return self.llm.n_key_value_heads

    @property
    def normalization_type(self) -> str:
        return self.llm.normalization_type

    @property
    def positional_embedding_type(self) -> str:
        return self.llm.positional_embedding_type

    @property
    def parallel_attn_mlp(self) -> bool:
        return self.llm.parallel_attn_mlp

    @property
    def n_image_tokens(self) -> int:
        return self.adapter.n_image_tokens

    @staticmethod
    def tl_fields(text_config: Any, tokenizer: Any) -> dict[str, Any]:
        """`n_ctx`, `act_fn`, `default_prepend_bos`, `tokenizer_prepends_bos` read from the LLM's
        Hugging Face config and the tokenizer (None where there is none)."""
        n_ctx = getattr(text_config, "max_position_embeddings", None)
        act_fn = getattr(text_config, "hidden_act", None) or getattr(text_config, "hidden_activation", None)
        fields: dict[str, Any] = {"n_ctx": n_ctx if isinstance(n_ctx, int) else None,
                                  "act_fn": act_fn if isinstance(act_fn, str) else None}
        if tokenizer is not None:
            bos = tokenizer.bos_token_id
            fields["default_prepend_bos"] = bos is not None
            fields["tokenizer_prepends_bos"] = bos is not None and tokenizer("")["input_ids"][:1] == [bos]
        return fields

    def summary(self) -> str:
        v, a, l = self.vision, self.adapter, self.llm
        if v.image_size:
            patches = (f"{v.image_size}px / {v.patch_size}px patches ({v.patch_grid[0]}x{v.patch_grid[1]}"
                       f"{' + CLS' if v.has_cls else ''}{f' + {v.n_registers} registers' if v.n_registers else ''})")
            tokens = f"{a.n_image_tokens} image tokens ({a.token_grid[0]}x{a.token_grid[1]})"
        else:  # every image at its own resolution (Qwen2-VL)
            patches, tokens = f"native resolution, {v.patch_size}px patches", "a token grid per image"
        return (
            f"{self.architecture}: vision {v.n_layers} layers x {v.n_heads} heads, d_model {v.d_model}, "
            f"{patches} -> adapter {a.kind} reads vision layer(s) {list(a.feature_layers)} -> {tokens} "
            f"-> LLM {l.n_layers} layers x {l.n_heads} heads "
            f"({l.n_key_value_heads} kv), d_model {l.d_model}, vocab {self.d_vocab}"
        )
