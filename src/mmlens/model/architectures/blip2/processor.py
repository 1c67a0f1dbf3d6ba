"""BLIP-2's and InstructBLIP's prompts as mmlens writes them: one image placeholder per image.

Hugging Face's `Blip2Processor` and `InstructBlipProcessor` put an image's `num_query_tokens`
placeholders in front of each tokenized prompt by themselves (before the prompt's BOS and padding),
and keep the placeholder as an `AddedToken`, so a prompt that names its image would get one
placeholder too many. These processors take the prompt's leading placeholder as that image's place
and write the queries' tokens where Hugging Face does; `image_token` is the placeholder's text, as
every family's processor has it. They add no state, so a loaded processor is adopted (`adopt`).
"""

from __future__ import annotations

from typing import Any

from transformers import BatchFeature, Blip2Processor, InstructBlipProcessor

from ....errors import InputError


class LeadingQueryPrompts:
    """What both processors share: prompts with one leading placeholder, queries' tokens first."""

    @classmethod
    def adopt(cls, processor: Any) -> Any:
        """`processor` itself, now taking placeholders (a subclass with no state of its own)."""
        hf_class = cls.__mro__[2]  # the Hugging Face processor this one extends
        if type(processor) is hf_class:
            processor.__class__ = cls
        return processor

    @property
    def image_token(self) -> str:
        token = self.__dict__["image_token"]  # where Hugging Face's __init__ keeps it
        return getattr(token, "content", token)

    @image_token.setter
    def image_token(self, token: Any) -> None:
        self.__dict__["image_token"] = token

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> BatchFeature:
        if images is None or text is None:
            return super().__call__(images=images, text=text, **kwargs)
        token, return_tensors = self.image_token, kwargs.pop("return_tensors", None)
        texts = [text] if isinstance(text, str) else list(text)
        for i, prompt in enumerate(texts):
            if not prompt.startswith(token) or prompt.count(token) != 1:
                raise InputError(f"prompt {i} ({prompt!r:.60}) must start with one {token} placeholder and hold no "
                                 "other: this model reads one image per prompt, its query tokens first")
        # Hugging Face's own text encoding (InstructBLIP's Q-Former ids too), then its queries' tokens in front
        encoding = dict(super().__call__(text=[prompt[len(token):].lstrip("\n") for prompt in texts], **kwargs))
        queries = [self.tokenizer.convert_tokens_to_ids(token)] * self.num_query_tokens
        encoding["input_ids"] = [queries + list(ids) for ids in encoding["input_ids"]]
        encoding["attention_mask"] = [[1] * len(queries) + list(mask) for mask in encoding["attention_mask"]]
        return BatchFeature({**encoding, **self.image_processor(images)}, tensor_type=return_tensors)


class Blip2PromptProcessor(LeadingQueryPrompts, Blip2Processor):
    """`Blip2Processor` taking one `image_token` placeholder at the start of each prompt."""


class InstructBlipPromptProcessor(LeadingQueryPrompts, InstructBlipProcessor):
    """`InstructBlipProcessor` taking one `image_token` placeholder at the start of each prompt; the
    prompt without it is also the Q-Former's instruction (`qformer_input_ids`)."""
