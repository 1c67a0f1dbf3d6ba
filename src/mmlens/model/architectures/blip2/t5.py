"""BLIP-2 and InstructBLIP with a Flan-T5 LLM: an encoder-decoder LLM stage.

The Q-Former's projected queries replace the image placeholders in T5's ENCODER input, beside the
prompt, so the encoder's blocks are the LLM stage's `blocks.{l}` (the queries are the image tokens
the layout, probes and knockouts address, as in the OPT variant); its attention is full
(bidirectional, padding keys masked), which is the one attention mode. The answer goes through the
DECODER, hooked as `decoder.blocks.{l}` (self-attention, cross-attention to the encoder's output,
MLP; `t5_blocks.py`) after `decoder.hook_embed`; the decoder's final norm is the model's `ln_final`,
whose weight, and the tied head's d_model**-0.5 rescale, `W_U` carries. The logits are the decoder's,
one row per decoder input token: `decoder_input_ids` (default: the decoder's start token alone, so
the logits are the first answer token's). `encoder_attention_mask` ([batch, encoder seq], 1 = read)
is the decoder's cross-attention mask where it differs from the encoder's padding mask (the
cross-attention knockout's edit).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from jaxtyping import Bool, Int
from torch import Tensor, nn

from ....errors import InputError, UnsupportedModelError
from ...config import StageConfig
from ...hook_tree import NormHooks, fire
from ...images.layout import ImageTokenLayout
from ...runtime.instrument import instrument_language_model
from ...runtime.layer_runs import SKIPPED_BLOCK
from ...runtime.norms import instrument_norm
from ..base import Architecture, StageModules
from ..bridge_aliases import alias
from ..module_paths import ModulePaths
from .family import Blip2
from .instructblip import InstructBlip
from .t5_blocks import T5DecoderHooks, instrument_t5_block, skipped_t5_block

DECODER_INPUTS = ("decoder_input_ids", "decoder_attention_mask", "encoder_attention_mask")
T5_PATHS = ModulePaths(vision_tower="vision_model", vision_layers="encoder.layers", projector="language_projection",
                       llm="language_model.encoder", llm_layers="block", unembed="language_model.lm_head",
                       llm_attention="layer.0.SelfAttention")

_E, _D = "blocks.{layer}.", "decoder.blocks.{layer}."
# TransformerLens's names for T5: HookedEncoderDecoder's (`encoder.{l}`, `decoder.{l}`, `encoder_final_ln`,
# `decoder_final_ln`) and the bridge's (`encoder_blocks`, `decoder_blocks` with `self_attn`)
T5_ALIASES = (
    alias(_E + "hook_resid_pre", "encoder_blocks.{layer}.hook_in"),
    alias(_E + "hook_resid_post", "encoder_blocks.{layer}.hook_out"),
    alias(_E + "hook_{point}", "encoder.{layer}.hook_{point}"),
    *(alias(_E + f"{part}.hook_{{point}}", f"encoder.{{layer}}.{part}.hook_{{point}}",
            f"encoder_blocks.{{layer}}.{part}.hook_{{point}}") for part in ("attn", "ln1", "ln2", "mlp")),
    alias(_D + "hook_resid_pre", "decoder_blocks.{layer}.hook_in"),
    alias(_D + "hook_resid_post", "decoder_blocks.{layer}.hook_out"),
    alias(_D + "hook_{point}", "decoder.{layer}.hook_{point}"),
    alias(_D + "attn.hook_{point}", "decoder.{layer}.attn.hook_{point}", "decoder_blocks.{layer}.self_attn.hook_{point}"),
    *(alias(_D + f"{part}.hook_{{point}}", f"decoder.{{layer}}.{part}.hook_{{point}}",
            f"decoder_blocks.{{layer}}.{part}.hook_{{point}}") for part in ("cross_attn", "ln1", "ln2", "ln3", "mlp")),
    alias("encoder_ln_final.hook_{point}", "encoder_final_ln.hook_{point}"),
    alias("ln_final.hook_{point}", "decoder_final_ln.hook_{point}"),
)


class RescaledHead:
    """A tied T5 head as the unembedding reads it: `lm_head(x * factor)` (`factor` = d_model**-0.5),
    with the factor folded into `weight` (a new tensor on each read)."""

    bias = None

    def __init__(self, head: nn.Linear, factor: float):
        self.head, self.factor = head, factor

    weight = property(lambda self: self.head.weight * self.factor)
    out_features = property(lambda self: self.head.out_features)

    def __call__(self, x: Tensor) -> Tensor:
        return self.head(x * self.factor)


class Blip2T5(Blip2):
    """BLIP-2 with Flan-T5 (`Blip2ForConditionalGeneration` whose text config is T5's; `Blip2` picks it)."""

    hf_class_names = ()  # registered through Blip2.for_checkpoint: one Hugging Face class, two LLMs
    module_paths = T5_PATHS
    llm_type, llm_block = "t5", None
    extra_input_names = DECODER_INPUTS
    llm_input_names = DECODER_INPUTS
    attention_modes = ("full",)
    bridge_aliases = T5_ALIASES
    llm_keywords = Architecture.llm_keywords  # relative positions follow from the sequence alone
    # the final norm and head read the decoder, not the blocks: no logit lens of the encoder's residual
    unembeds_a_decoder = True

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        return StageConfig(n_layers=tc.num_layers, n_heads=tc.num_heads, d_model=tc.d_model, d_head=tc.d_kv,
                           d_mlp=tc.d_ff, n_key_value_heads=tc.num_heads, normalization_type="RMS",
                           positional_embedding_type="relative_positional_bias", gated_mlp=tc.is_gated_act)

    def probe_inputs(self, cfg: Any, seed: int = 0) -> dict[str, Tensor]:
        """The family's probe batch with three decoder tokens per row, so spec verification sees the
        decoder's causal self-attention at work."""
        probe = super().probe_inputs(cfg, seed)
        answer = torch.arange(3) % cfg.d_vocab
        return {**probe, "decoder_input_ids": answer.expand(len(probe["input_ids"]), -1).clone()}

    def check_supported(self, hf_model: nn.Module) -> None:
        super().check_supported(hf_model)
        text = hf_model.config.text_config
        if text.num_decoder_layers < 1:
            raise UnsupportedModelError(f"{type(hf_model).__name__}: its T5 has no decoder layers, so there are no "
                                        "logits to read; mmlens hooks T5 as an encoder and a decoder")

    # ------------------------------------------------------------- hooks
    def instrument_llm(self, hf_model: nn.Module, root: Any, use_result: Callable[[], bool]) -> list[Any]:
        """The encoder's blocks as `blocks.{l}` (and its embedding points), its final norm as
        `encoder_ln_final`; the decoder's blocks as `decoder.blocks.{l}`, its final norm as `ln_final`."""
        t5 = hf_model.language_model
        gated = t5.config.is_gated_act

        def encoder_block(layer: nn.Module, hooks: Any, *_spec: Any, **_linear: Any) -> None:
            instrument_t5_block(layer, hooks, gated, use_result)
            setattr(layer, SKIPPED_BLOCK, skipped_t5_block(layer))

        handles = instrument_language_model(t5.encoder, t5.encoder.block, None, root, use_result, final_norm=None,
                                            instrument_layer=encoder_block)
        root.encoder_ln_final = NormHooks()
        instrument_norm(t5.encoder.final_layer_norm, root.encoder_ln_final, "RMS")
        root.decoder = decoder = T5DecoderHooks(len(t5.decoder.block), gated)
        for layer, hooks in zip(t5.decoder.block, decoder.blocks):
            instrument_t5_block(layer, hooks, gated, use_result)
        instrument_norm(t5.decoder.final_layer_norm, root.ln_final, "RMS")

        def answer_embedding(stack: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            ids = kwargs.get("input_ids")
            if ids is not None and kwargs.get("inputs_embeds") is None and decoder.any_hooked():
                kwargs = {**kwargs, "input_ids": None, "inputs_embeds": fire(decoder.hook_embed, stack.embed_tokens(ids))}
            return args, kwargs

        return handles + [t5.decoder.register_forward_pre_hook(answer_embedding, with_kwargs=True)]

    def blocks(self, hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The tower's, the Q-Former's and the encoder's blocks, then the decoder's (`decoder.blocks.{l}`)."""
        decoder = [(f"decoder.blocks.{l}", m) for l, m in enumerate(hf_model.language_model.decoder.block)]
        return super().blocks(hf_model) + decoder

    def stage_modules(self, hf_model: nn.Module) -> dict[str, StageModules]:
        """The LLM's unembedding is the decoder's head, with the tied rescale where the config asks for it."""
        stages = super().stage_modules(hf_model)
        t5 = hf_model.language_model
        if t5.config.scale_decoder_outputs:
            llm = stages["llm"]
            stages["llm"] = StageModules(layers=llm.layers, embed=llm.embed,
                                         unembed=RescaledHead(t5.lm_head, t5.model_dim ** -0.5))
        return stages

    # ------------------------------------------------------------- the forward
    def forward(self, hf_model: nn.Module, **inputs: Tensor) -> Any:
        """Blip2's forward with the decoder's inputs (its start token when none is given) and any
        edited cross-attention mask in force."""
        reference = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if inputs.get("decoder_input_ids") is None:
            start = hf_model.config.text_config.decoder_start_token_id
            inputs["decoder_input_ids"] = torch.full((reference.shape[0], 1), start, device=reference.device)
        with cross_attention_mask(hf_model.language_model.decoder, inputs.pop("encoder_attention_mask", None)):
            return super().forward(hf_model, **inputs)

    # ------------------------------------------------------------- attention rules
    def attention_edges(self, mode: str, layout: ImageTokenLayout, attention_mask: Int[Tensor, "batch seq"] | None,
                        extra: dict[str, Tensor]) -> Bool[Tensor, "batch seq seq"]:
        """T5's encoder attends both ways: every query reads every real key (padding queries too)."""
        if attention_mask is None:
            raise InputError("T5's encoder edges follow from the padding mask: pass attention_mask")
        keys = attention_mask.bool().cpu()
        return keys[:, None, :].expand(-1, keys.shape[1], -1).clone()

    def attention_kwargs(self, mode: str, kwargs: dict[str, Tensor], layout: Callable[[], ImageTokenLayout],
                         dtype: torch.dtype) -> dict[str, Tensor]:
        return kwargs  # "full" is Hugging Face's own rule

    def encoder_keys_blocked(self, extra: dict[str, Tensor], attention_mask: Tensor,
                             keys: Bool[Tensor, "batch seq"]) -> dict[str, Tensor]:
        """The family's keywords with the decoder's cross-attention closed to the encoder positions `keys`."""
        reads = extra.get("encoder_attention_mask", attention_mask)
        return {**extra, "encoder_attention_mask": reads * ~keys.to(reads.device)}

    @staticmethod
    def generated_tokens(out: Int[Tensor, "batch answer"], keywords: dict[str, Tensor]) -> Int[Tensor, "batch new"]:
        """What Hugging Face's generation added: its output is the decoder's ids, after the given ones (the start token)."""
        given = keywords.get("decoder_input_ids")
        return out[:, 1 if given is None else given.shape[1]:]

    def extend_by_one_token(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        raise UnsupportedModelError(
            "T5 answers in its decoder: a generated token extends decoder_input_ids, not the prompt, which mmlens's "
            "step-by-step generation does not do. It runs when use_past_kv_cache=False or stop_at_eos=False is "
            "given (or under a 4-D attention rule): call model.generate with the defaults (Hugging Face's "
            "encoder-decoder generation, which stops at the EOS token)")


@contextmanager
def cross_attention_mask(decoder: nn.Module, mask: Tensor | None) -> Iterator[None]:
    """While the block runs, T5's decoder reads the encoder positions `mask` holds (None: as given)."""
    if mask is None:
        yield
        return

    def replace(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "encoder_attention_mask": mask}

    handle = decoder.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class InstructBlipT5(Blip2T5, InstructBlip):
    """InstructBLIP with Flan-T5: InstructBLIP's instruction-reading Q-Former, BLIP-2 T5's LLM stage."""

    extra_input_names = (*InstructBlip.extra_input_names, *DECODER_INPUTS)


T5_VARIANTS: dict[type[Blip2], type[Blip2]] = {Blip2: Blip2T5, InstructBlip: InstructBlipT5}
