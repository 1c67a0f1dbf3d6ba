"""Tiny random-weight LLaVA models for tests, benchmarks and offline scripts (no hub needed)."""

from .zoo.build import DEFAULT_WORDS, build_llava as tiny_llava, build_word_tokenizer

__all__ = ["DEFAULT_WORDS", "build_word_tokenizer", "tiny_llava"]
