"""GLM-4V's processor for images alone, which needs no torchvision (public: with a real checkpoint
and no torchvision, give it to `HookedMLLM.from_hf`; GLM-4.6V's processor is the same but for video).

transformers 5.23 cannot build `Glm4vProcessor` without torchvision: its check of the video
processor needs torchvision's classes. This class skips the video processor; the image path
(`<|image|>` placeholders expanded per image grid, `mm_token_type_ids`) is Hugging Face's own.
"""

from __future__ import annotations

from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
from transformers.processing_utils import ProcessorMixin


class GlmImageProcessor(Glm4vProcessor):
    """GLM-4V's processor for images only: its video processor needs torchvision, which mmlens does
    not require. The video start/end ids stay read, since `mm_token_type_ids` consults them."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image|>", "<|video|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.video_start_id = tokenizer.convert_tokens_to_ids("<|begin_of_video|>")
        self.video_end_id = tokenizer.convert_tokens_to_ids("<|end_of_video|>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
