"""TransformerLens's token helpers on a multimodal model, with image tokens named by image and cell.

Text goes through the processor's tokenizer as TL's `to_tokens` does (BOS prepended unless told
not to, padding on the tokenizer's side). In `to_str_tokens`, each image token is written
`<img{i} r{row}c{col}>` (image `i` of the batch, its grid cell) rather than sixty-four identical
`<image>`s, so a plot axis or a printed row shows where in the image a position sits.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import InputError, LayoutMismatchError
from .inputs import MultimodalInputs

# How `to_str_tokens` names an image token: `<img0 r1c2>`, `<img0 tiles r0c1>`, `<img1 cls>`.
IMAGE_TOKEN_NAME = re.compile(r"<img\d+ [^<>]+>")


class TokenHelpers:
    """`tokenizer`, `to_tokens`, `to_single_token`, `to_string`, `to_str_tokens` (mixin of HookedMLLM)."""

    @property
    def tokenizer(self) -> Any:
        return self._require_processor().tokenizer

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids `[batch, pos]` of text (no images: build image inputs with `model.prepare`).

        `prepend_bos` defaults to True when the tokenizer has a BOS token; padding goes on
        `padding_side` (default: the tokenizer's), BOS after left padding, as in TL.
        """
        tokens, _ = self.text_batch(input, prepend_bos, padding_side)
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def text_batch(
        self, input: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """`to_tokens` and its attention mask (0 at padding), on the CPU."""
        tokenizer = self.tokenizer
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError(f"to_tokens takes a string or a non-empty list of strings, got {type(input).__name__}")
        if prepend_bos is None:
            prepend_bos = self.cfg.default_prepend_bos
        if prepend_bos and tokenizer.bos_token_id is None:
            raise InputError("prepend_bos=True but this tokenizer has no BOS token")
        side = padding_side or tokenizer.padding_side
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos:
            rows = [[tokenizer.bos_token_id, *row] for row in rows]
        width = max(len(row) for row in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            tokens[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return tokens, mask

    def to_single_token(self, string: str) -> int:
        """The id of `string`, which must be exactly one token (no BOS)."""
        ids = self.to_tokens(string, prepend_bos=False, move_to_device=False)[0]
        if ids.numel() != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids.tolist())
            raise InputError(f"{string!r} is {ids.numel()} tokens ({pieces}), not one")
        return int(ids.item())

    def get_token_position(
        self,
        single_token: str | int | Tensor,
        input: str | Tensor | MultimodalInputs,
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> int:
        """The position of `single_token` in one sequence (TL's `get_token_position`).

        `input` is a string (tokenised by `to_tokens`), ids `[pos]` or `[1, pos]`, or a one-row
        `MultimodalInputs`. `single_token` is an id or a one-token string; an image token is
        addressed by its `to_str_tokens` name (`"<img0 r1c2>"`: image 0, grid row 1, column 2),
        and the placeholder itself (`"<image>"`, `cfg.image_token_id`) finds the image tokens.
        `mode` picks the first or last match; a token that does not occur is an error.
        """
        if mode not in ("first", "last"):
            raise InputError(f"mode must be 'first' or 'last', got {mode!r}")
        layout = None
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side, move_to_device=False)
        elif prepend_bos is not None or padding_side is not None:
            raise InputError("prepend_bos and padding_side apply to text; these tokens are already tokenised")
        elif isinstance(input, MultimodalInputs):
            tokens, layout = input.input_ids, input.layout
        else:
            tokens = torch.as_tensor(input)
        tokens = tokens.cpu()
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise InputError(f"get_token_position searches one sequence: ids [pos] or [1, pos] (or one-row inputs), "
                             f"got shape {tuple(tokens.shape)}; index the row first (inputs.input_ids[i])")
        if isinstance(single_token, str) and IMAGE_TOKEN_NAME.fullmatch(single_token):
            names = self._str_rows(tokens[None], layout)[0]
            matches = [i for i, name in enumerate(names) if name == single_token]
        else:
            if isinstance(single_token, str):
                single_token = self.to_single_token(single_token)
            single_token = int(torch.as_tensor(single_token).item())
            matches = (tokens == single_token).nonzero().flatten().tolist()
        if not matches:
            hint = " (image tokens are named from the layout: pass the MultimodalInputs, not its ids)" if layout is None else ""
            raise InputError(f"token {single_token!r} does not occur in these inputs; model.to_str_tokens shows them{hint}")
        return matches[0] if mode == "first" else matches[-1]

    def to_string(self, tokens: int | Tensor | list) -> str | list[str]:
        """Decode ids: one string for a 0-d/1-d input, a list of strings for `[batch, pos]`."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 0:
            tokens = tokens[None]
        if tokens.ndim == 1:
            return self.tokenizer.decode(tokens.tolist())
        if tokens.ndim == 2:
            return [self.tokenizer.decode(row.tolist()) for row in tokens]
        raise InputError(f"to_string takes ids of shape [pos] or [batch, pos], got {tuple(tokens.shape)}")

    def to_str_tokens(
        self, input: str | list[str] | Tensor | MultimodalInputs, prepend_bos: bool | None = None
    ) -> list[str] | list[list[str]]:
        """Token strings per position, as TransformerLens gives them (one list for a text, a token, or
        ids of shape `[pos]` or `[1, pos]`); a batch of several rows, a list of texts or image inputs
        give one list per row (TL refuses a batch).

        Image tokens read `<img{i} r{row}c{col}>`: image `i` in `pixel_values` order and its
        grid cell (`<img{i} tiles r{row}c{col}>` in an image of several segments, named by kind); an
        image's special tokens read by kind: `<img{i} cls>`, `<img{i} newline>`.
        """
        if isinstance(input, (str, list)):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, move_to_device=False)
            return self._str_rows(ids)[0] if isinstance(input, str) else self._str_rows(ids)
        if prepend_bos is not None:
            raise InputError("prepend_bos applies to text; these tokens are already tokenised")
        if isinstance(input, MultimodalInputs):
            return self._str_rows(input.input_ids, input.layout)
        ids = torch.as_tensor(input)
        if ids.ndim == 0 or (ids.ndim == 2 and len(ids) == 1):  # TL squeezes a single token or row
            ids = ids.reshape(-1)
        if ids.ndim == 1:
            return self._str_rows(ids[None])[0]
        if ids.ndim != 2:
            raise InputError(f"to_str_tokens takes ids of shape [pos] or [batch, pos], got {tuple(ids.shape)}")
        return self._str_rows(ids)

    def _str_rows(self, ids: Tensor, layout: Any = None) -> list[list[str]]:
        ids = ids.cpu()
        rows = [self.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
        if not bool((ids == self.cfg.image_token_id).any()):
            return rows
        if layout is None:
            try:
                layout = self.layout(ids)
            except LayoutMismatchError:  # the family needs more than ids (LLaVA-NeXT: image_sizes): plain names
                return rows
        for span in layout.spans:
            names = rows[span.row]
            one = len(span.segments) == 1  # a fixed grid: no segment name needed
            for segment in span.segments:
                where = "" if one else f"{segment.kind} "
                for position, (r, c) in zip(segment.positions.tolist(), segment.tokens.cells.tolist()):
                    names[position] = f"<img{span.image_index} {where}r{r}c{c}>"
            for kind, positions in span.special.items():
                if kind != "register":  # registers keep their placeholder name
                    for position in positions.tolist():
                        names[position] = f"<img{span.image_index} {kind}>"
        return rows
