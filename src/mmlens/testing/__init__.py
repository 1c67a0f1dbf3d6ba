"""Tiny random-weight models for tests, benchmarks and offline scripts (no hub needed).

`tiny_llava` is the embedded model's recipe with random weights; `mmlens.testing.families` has one
tiny builder per supported family (`families/<family>.py`), `mmlens.testing.browser` checks that a
report's figures render in a real browser.
"""

from ..zoo.build import DEFAULT_WORDS, build_llava as tiny_llava, build_word_tokenizer

__all__ = ["DEFAULT_WORDS", "build_word_tokenizer", "tiny_llava"]
