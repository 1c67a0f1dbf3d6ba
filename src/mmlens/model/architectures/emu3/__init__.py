"""Emu3: a VQ tokenizer's encoder hooked as the vision stage, its codes written into a Llama-style
LLM's sequence as token ids (a lookup adapter), on a code-grid layout."""

from .family import Emu3

__all__ = ["Emu3"]
