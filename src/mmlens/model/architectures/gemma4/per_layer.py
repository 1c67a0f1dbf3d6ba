"""Gemma 4's per-layer inputs (E2B, E4B) for runs that start inside the LLM.

Hugging Face computes every block's per-layer input before the first block, from two things: the
ids (image placeholders read as the pad token) and a projection of the LLM's input embeddings,
image features in place. A run that starts from a residual (`start_at_layer`, patching's copies,
`llm_inputs_embeds`) hands the LLM something else as its input embeddings, and Hugging Face would
project that (or, without ids, try to invert the embedding, which image features are not rows of).
So such runs recompute the prompt's and images' own per-layer inputs, with the tower's and the
adapter's hook points quiet, and the LLM takes them as given: the per-layer inputs of a run are
always those of its prompt and images, whatever residual it starts from (patch
`blocks.{l}.hook_per_layer_input` to change them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ....errors import InputError
from ...runtime.layer_runs import silenced

# the keyword that carries them from `llm_keywords` to the forward, which takes it out again
PER_LAYER_INPUTS = "mmlens_per_layer_inputs"


def per_layer_ids(config: Any, input_ids: Tensor) -> Tensor:
    """The ids Hugging Face reads the per-layer embeddings by: image, video and audio placeholders
    become the pad token (`Gemma4Model.forward`'s `llm_input_ids`)."""
    placeholders = [getattr(config, f, None) for f in ("image_token_id", "video_token_id", "audio_token_id")]
    swapped = torch.isin(input_ids, torch.tensor([p for p in placeholders if p is not None], device=input_ids.device))
    return torch.where(swapped, config.text_config.pad_token_id, input_ids)


def prompt_per_layer_inputs(hf_model: nn.Module, inputs: dict[str, Tensor], quiet: Iterable[nn.Module]) -> Tensor:
    """Every block's per-layer input `[batch, seq, n_layers, d_per_layer]` for these ids and images,
    as Hugging Face's forward computes it, with the `quiet` hook points silent."""
    model, ids = hf_model.model, inputs["input_ids"]
    llm_ids = per_layer_ids(hf_model.config, ids)
    embeds = model.get_input_embeddings()(llm_ids)
    image = ids == hf_model.config.image_token_id
    if image.any():
        if inputs.get("pixel_values") is None:
            raise InputError("Gemma 4's per-layer inputs project the images' features, so a run that starts inside the "
                             "LLM needs the images too: pass the MultimodalInputs from model.prepare")
        with silenced(*quiet):
            features = model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"], return_dict=True)
        features = torch.cat(features.pooler_output).to(embeds)
        embeds = embeds.masked_scatter(image[..., None].expand_as(embeds), features)
    lm = model.language_model
    return lm.project_per_layer_inputs(embeds, lm.get_per_layer_inputs(llm_ids))


@contextmanager
def given_per_layer_inputs(lm: nn.Module, per_layer_inputs: Tensor) -> Iterator[None]:
    """The LLM takes `per_layer_inputs` as they are instead of projecting its input embeddings."""
    lm.project_per_layer_inputs = lambda _embeds, _token_part=None: per_layer_inputs
    try:
        yield
    finally:
        del lm.project_per_layer_inputs
