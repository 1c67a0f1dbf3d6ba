"""InstructBLIP (InstructBlipForConditionalGeneration): BLIP-2's geometry with an instruction-aware
Q-Former and a Vicuna (Llama) LLM.

The Q-Former reads the prompt too: its sequence is the learned queries then the instruction's tokens
(`qformer_input_ids`, embedded with learned positions; the Q-Former's own tokenizer and padding mask,
`qformer_attention_mask`). Queries and text attend to each other; only the queries cross-attend to
the image and reach the LLM. The text rows have their own MLP (`mlp_text`, `ln2_text`). The LLM is
Llama's block (LLaVA's spec); the layout is BLIP-2's learned queries. Over an OPT LLM (Hugging Face's
own test configuration; the released checkpoints are Vicuna and Flan-T5), the same Q-Former feeds
BLIP-2's OPT stage (`InstructBlipOpt`).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ...config import StageConfig
from ...runtime.instrument import instrument_language_model
from ..base import Architecture
from ..bridge_aliases import LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES
from ..llava.family import LLM_BLOCK, Llava
from ..module_paths import ModulePaths
from .family import Blip2
from .processor import InstructBlipPromptProcessor

QFORMER_INPUTS = ("qformer_input_ids", "qformer_attention_mask")


class InstructBlip(Blip2):
    hf_class_names = ("InstructBlipForConditionalGeneration",)
    module_paths = ModulePaths(vision_tower="vision_model", vision_layers="encoder.layers",
                               projector="language_projection", llm="language_model.model",
                               unembed="language_model.lm_head")
    llm_type, llm_block = "llama", LLM_BLOCK
    qformer_input_norm, qformer_reads_text = "embeddings.layernorm", True
    extra_input_names = QFORMER_INPUTS
    bridge_aliases = (*LLM_ALIASES, *LLM_BRANCH_OUTPUT_ALIASES)
    # Llama's positions follow from the sequence, not from the padding mask: no keywords, no 4D-mask extras
    llm_keywords = Architecture.llm_keywords
    attention_kwargs = Architecture.attention_kwargs

    supported_llms = ("llama", "opt", "t5")

    @classmethod
    def for_checkpoint(cls, hf_model: nn.Module) -> "Blip2":
        """This family, its OPT variant (BLIP-2's LLM stage) or its Flan-T5 variant, by the text config."""
        if hf_model.config.text_config.model_type == Blip2.llm_type:
            return InstructBlipOpt()
        return super().for_checkpoint(hf_model)

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        return Llava.llm_config(tc)

    def use_processor(self, processor: Any) -> None:
        InstructBlipPromptProcessor.adopt(processor)

    def instrument_llm(self, hf_model: nn.Module, root: Any, use_result: Callable[[], bool]) -> list[Any]:
        return instrument_language_model(self.language_model(hf_model), self.llm_layers(hf_model), self.llm_block, root,
                                         use_result)

    def probe_inputs(self, cfg, seed: int = 0) -> dict[str, Tensor]:
        """BLIP-2's probe batch with a two-token instruction for the Q-Former on each row."""
        probe = super().probe_inputs(cfg, seed)
        ids = probe["input_ids"][:, -2:].clone()
        return {**probe, "qformer_input_ids": ids, "qformer_attention_mask": ids.new_ones(ids.shape)}


class InstructBlipOpt(InstructBlip):
    """InstructBLIP's instruction-reading Q-Former before BLIP-2's OPT stage: OPT's block spec, its
    positions read off the padding mask, its final norm and TransformerLens's OPT names."""

    hf_class_names = ()  # registered through InstructBlip.for_checkpoint: one Hugging Face class, three LLMs
    module_paths = Blip2.module_paths
    llm_type, llm_block = Blip2.llm_type, Blip2.llm_block
    bridge_aliases = Blip2.bridge_aliases
    llm_keywords = Blip2.llm_keywords
    attention_kwargs = Blip2.attention_kwargs
    instrument_llm = Blip2.instrument_llm
    llm_config = staticmethod(Blip2.llm_config)
