"""BLIP-2 and InstructBLIP: a Q-Former adapter (learned queries) between BLIP's tower and the LLM (OPT or
Llama; Flan-T5 as an encoder-decoder LLM stage, `t5.py`)."""

from .family import Blip2
from .instructblip import InstructBlip
from .processor import Blip2PromptProcessor, InstructBlipPromptProcessor
from .t5 import Blip2T5, InstructBlipT5

__all__ = ["Blip2", "Blip2PromptProcessor", "Blip2T5", "InstructBlip", "InstructBlipPromptProcessor", "InstructBlipT5"]
