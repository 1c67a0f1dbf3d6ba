"""BLIP-2 and InstructBLIP: a Q-Former adapter (learned queries) between BLIP's tower and the LLM."""

from .family import Blip2
from .instructblip import InstructBlip
from .processor import Blip2PromptProcessor, InstructBlipPromptProcessor

__all__ = ["Blip2", "Blip2PromptProcessor", "InstructBlip", "InstructBlipPromptProcessor"]
