"""Mistral 3's processor without torchvision: Hugging Face's `PixtralProcessor` prompt expansion on
the PIL image processor (public: give it to `HookedMLLM.from_hf` with a real checkpoint).

transformers marks `PixtralProcessor` as needing torchvision (its module imports the torchvision
image processor), so without torchvision it cannot even be imported. Its work is small and is
replayed here on `ProcessorMixin`'s own `__call__`: images go through `PixtralImageProcessorPil`
with patches of `patch_size x spatial_merge_size` pixels (each image resized on its own, longest
edge at most `size["longest_edge"]`, both sides rounded up to that multiple, then zero-padded at
the bottom and right to the batch's largest image, with `image_sizes` the real sizes), and each
`[IMG]` in a prompt becomes, per row of LLM tokens, `cols` x `[IMG]` then `[IMG_BREAK]`, the last
row's break being `[IMG_END]`. The methods below restate `PixtralProcessor`'s.
"""

from __future__ import annotations

from typing import Any

from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
from transformers.processing_utils import ProcessorMixin


class Mistral3Processor(ProcessorMixin):
    """`PixtralProcessor` (transformers 5.23) for a PIL image processor; takes the same arguments."""

    attributes = ["image_processor", "tokenizer"]

    def __init__(
        self,
        image_processor: PixtralImageProcessorPil | None = None,
        tokenizer: Any = None,
        patch_size: int = 16,
        spatial_merge_size: int = 1,
        chat_template: str | None = None,
        image_token: str = "[IMG]",
        image_break_token: str = "[IMG_BREAK]",
        image_end_token: str = "[IMG_END]",
        **kwargs: Any,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    def _process_images(self, images: Any, **images_kwargs: Any):
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        patch_size = self.patch_size * self.spatial_merge_size
        height, width = image_inputs["image_sizes"][image_idx]
        rows = [[self.image_token] * (int(width) // patch_size) + [self.image_break_token]] * (int(height) // patch_size)
        tokens = [token for row in rows for token in row]
        tokens[-1] = self.image_end_token
        return "".join(tokens)

    @property
    def model_input_names(self) -> list[str]:
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]
