"""Qwen2-VL's processor for images alone, which needs no torchvision (public: with a real
checkpoint and no torchvision, give it to `HookedMLLM.from_hf`; Qwen2.5-VL and Qwen3-VL use it too).

transformers 5.23 cannot build `Qwen2_5_VLProcessor` without torchvision: its check of the video
processor needs torchvision's classes. This class skips the video processor; the image path,
`mm_token_type_ids` included, is Hugging Face's own.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin


class QwenImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2-VL's processor for images only: its video processor needs torchvision, which mmlens
    does not require (the image path, `mm_token_type_ids` included, is Hugging Face's own)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
