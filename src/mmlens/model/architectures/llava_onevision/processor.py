"""LLaVA-OneVision's processor for images alone, which needs no torchvision (public: with a real
checkpoint and no torchvision, give it to `HookedMLLM.from_hf`)."""

from __future__ import annotations

from transformers import LlavaOnevisionProcessor


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without its video processor, which needs torchvision (not installed
    here); images only. Its own signature leaves `video_processor` out of the processor's parts."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, **kwargs)
        self.video_token = self.video_token_id = None  # the word tokenizer has no <video>: unknown words are not videos
