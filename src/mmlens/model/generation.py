"""TransformerLens's `generate` on a multimodal model: text, token ids or image inputs.

Tokens are chosen as TL chooses them (greedy, or sampled after `temperature`, `top_k` and
`top_p`), and hooks active in `model.hooks()` apply at every step. Where the family's attention
rule fits a 2-D mask, Hugging Face's cached decoding runs (with TL's settings in place of the
checkpoint's own generation config); otherwise every step is a full forward of the grown batch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import GenerationConfig

from ..errors import InputError
from .inputs import MultimodalInputs

GenerateReturn = Literal["input", "str", "tokens"]


def sample_next_tokens(
    logits: Float[Tensor, "batch d_vocab"],
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Int[Tensor, "batch"]:
    """TL's `sample_logits`: argmax, or a draw from softmax(logits / temperature) restricted to
    the `top_k` likeliest tokens and to the smallest set whose probability reaches `top_p`."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        beyond = cumulative > top_p
        beyond[..., 1:] = beyond[..., :-1].clone()  # keep the token that crosses top_p
        beyond[..., 0] = False
        logits = logits.masked_fill(beyond.scatter(-1, order, beyond), -torch.inf)
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


class Generation:
    """`generate` (mixin of HookedMLLM)."""

    @torch.no_grad()
    def generate(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"] | MultimodalInputs = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | None = None,
        do_sample: bool | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        return_type: GenerateReturn = "input",
        verbose: bool = True,
    ) -> str | list[str] | Int[Tensor, "batch pos"]:
        """Continue text, token ids or image inputs by `max_new_tokens`, with TL's arguments.

        Text (a string or a list, left-padded) and ids sample by default, as TL does; image inputs
        (`MultimodalInputs` from `prepare`) decode greedily unless `do_sample=True`, so answers
        are reproducible. `temperature`, `top_k` or `top_p` without sampling is an error. Rows
        stop at `eos_token_id` (the tokenizer's EOS) unless `stop_at_eos=False`.

        `return_type="input"` gives what TL gives for the input's type (a string for a string,
        strings for a list, ids for ids) and, for image inputs, the answers: the decoded text after
        each prompt. `"str"`: the whole sequences decoded (special tokens, image placeholders
        included, skipped); `"tokens"`: the ids `[batch, pos + new]`. `use_past_kv_cache=False`
        runs a full forward per step; `verbose` is accepted and shows nothing.
        """
        if return_type not in ("input", "str", "tokens"):
            raise InputError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        kind, keywords = self._generation_inputs(input, prepend_bos, padding_side)
        if do_sample is None:
            do_sample = kind != "images"
        _check_sampling(do_sample, temperature, top_k, top_p)
        temperature = 1.0 if temperature is None else float(temperature)
        tokenizer = self.tokenizer
        stop = (tokenizer.eos_token_id if eos_token_id is None else eos_token_id) if stop_at_eos else None
        prompt = keywords["input_ids"]
        self._check_context(prompt.shape[1], max_new_tokens)
        own_rule = self._with_image_attention(keywords)
        rule_mask = own_rule["attention_mask"]
        cached = use_past_kv_cache and stop is not None and isinstance(rule_mask, Tensor) and rule_mask.ndim == 2
        if max_new_tokens == 0:
            new_tokens = prompt[:, :0]
        elif cached:  # Hugging Face's cached decoding applies the family's rule itself
            # TL's settings only: the checkpoint's own (a repetition penalty, Hugging Face's default top_k=50) are overridden
            sampling = dict(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p) if do_sample else {}
            settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, repetition_penalty=1.0,
                                        no_repeat_ngram_size=0, min_new_tokens=0, eos_token_id=stop,
                                        pad_token_id=_pad_id(tokenizer, stop), **sampling)
            out = self.hf_model.generate(**self.architecture.hf_keywords(own_rule), generation_config=settings)
            # an encoder-decoder returns its decoder's ids, not the prompt continued: the family says which are new
            answer = getattr(self.architecture, "generated_tokens", None)
            new_tokens = out[:, prompt.shape[1]:] if answer is None else answer(out, own_rule)
        else:
            new_tokens = self._generate_step_by_step(keywords, max_new_tokens, stop, do_sample, temperature, top_k, top_p)
        if stop is not None:  # a finished row continues with EOS, as in TL (Hugging Face pads it)
            new_tokens = new_tokens.masked_fill((new_tokens == stop).cumsum(1) > 0, stop)
        full = torch.cat([prompt, new_tokens], dim=1)
        if return_type == "tokens" or (return_type == "input" and kind == "tokens"):
            return full
        if return_type == "input" and kind == "images":
            return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        decoded = tokenizer.batch_decode(full, skip_special_tokens=True)
        return decoded[0] if kind == "str" else decoded

    def _generation_inputs(self, input: Any, prepend_bos: bool | None, padding_side: str | None) -> tuple[str, dict[str, Tensor]]:
        """The input's kind ("str", "list", "tokens", "images") and the keywords of its forward."""
        if isinstance(input, (str, list)):
            if isinstance(input, list) and len(input) > 1:
                padding_side = "left"  # as TL: every row's last real token is the last position
            ids, mask = self.text_batch(input, prepend_bos, padding_side)
            kind = "str" if isinstance(input, str) else "list"
            return kind, {"input_ids": ids.to(self.cfg.device), "attention_mask": mask.to(self.cfg.device)}
        if prepend_bos is not None or padding_side is not None:
            raise InputError("prepend_bos and padding_side apply to text inputs; these inputs are already tokenised")
        if isinstance(input, MultimodalInputs):
            return "images", self._coerce_inputs(input, None, None, None)
        if isinstance(input, Tensor) and not input.is_floating_point():
            ids = input[None] if input.ndim == 1 else input
            return "tokens", self._coerce_inputs(ids.to(self.cfg.device), None, None, torch.ones_like(ids, device=self.cfg.device))
        raise InputError(f"generate takes a string, a list of strings, token ids or MultimodalInputs (from model.prepare); "
                         f"got {type(input).__name__}")

    def _generate_step_by_step(self, keywords: dict[str, Tensor], max_new_tokens: int, stop: int | None,
                               do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
        """Decode with a full forward per new token (a 4-D image mask, which Hugging Face's cached
        decoding cannot carry, or no cache asked for); finished rows are filled with EOS, as TL."""
        keywords = dict(keywords)
        prompt_length = keywords["input_ids"].shape[1]
        done = torch.zeros(len(keywords["input_ids"]), dtype=torch.bool, device=keywords["input_ids"].device)
        for _ in range(max_new_tokens):
            logits = self(keywords)[:, -1]
            next_token = sample_next_tokens(logits, do_sample, temperature, top_k, top_p)
            if stop is not None:
                next_token = torch.where(done, torch.full_like(next_token, stop), next_token)
                done |= next_token == stop
            keywords["input_ids"] = torch.cat([keywords["input_ids"], next_token[:, None]], dim=1)
            mask = keywords["attention_mask"]
            keywords["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            keywords.update(self.architecture.extend_by_one_token(
                {k: v for k, v in keywords.items() if k in self.architecture.extra_input_names}))
            if done.all():
                break
        return keywords["input_ids"][:, prompt_length:]


def _check_sampling(do_sample: bool, temperature: float | None, top_k: int | None, top_p: float | None) -> None:
    if not do_sample:
        given = [name for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)) if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} only apply when sampling; pass do_sample=True (image inputs decode "
                             "greedily by default)")
        return
    if temperature is not None and not temperature > 0:
        raise InputError(f"temperature must be above 0, got {temperature}; for greedy decoding pass do_sample=False")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be an int of at least 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")


def _pad_id(tokenizer: Any, eos: int) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
