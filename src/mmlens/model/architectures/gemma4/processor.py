"""Gemma 4's processor for images alone, which needs no torchvision.

transformers 5.23 cannot build `Gemma4Processor` without torchvision: its check of the video
processor needs torchvision's classes, and it also wants an audio feature extractor. This class
skips both; the image path (soft tokens per image from its size, `image_position_ids`,
`mm_token_type_ids`) is Hugging Face's own.
"""

from __future__ import annotations

from transformers import Gemma4Processor
from transformers.processing_utils import ProcessorMixin


class Gemma4ImageProcessor(Gemma4Processor):
    """Gemma 4's processor for images only (no video processor, no audio feature extractor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length: int = 280, **kwargs):
        self.image_seq_length = image_seq_length
        self.image_token_id = tokenizer.image_token_id
        self.image_token, self.boi_token, self.eoi_token = tokenizer.image_token, tokenizer.boi_token, tokenizer.eoi_token
        # the parent's input check reads the audio markers even when no audio is given
        self.audio_token = getattr(tokenizer, "audio_token", None)
        self.boa_token, self.eoa_token = getattr(tokenizer, "boa_token", None), getattr(tokenizer, "eoa_token", None)
        self.video_token = self.video_token_id = None
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
