"""InternVL's processor for images alone, which needs no torchvision (public: with a real
checkpoint and no torchvision, give it to `HookedMLLM.from_hf`)."""

from __future__ import annotations

from transformers import InternVLProcessor


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVLProcessor without its video processor, which needs torchvision (not installed
    here); the image path (GotOcr2 tiling, `<img>` + `<IMG_CONTEXT>` run + `</img>`) is Hugging Face's own."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, **kwargs)
