"""Input checks remembered by the values they passed on, so a forward on the same batch skips them.

Some families refuse prompts and images that disagree by walking the placeholders image by image,
which builds most of a layout and cost more than the hooks (up to a tenth of a small model's
forward, Cohere2-Vision). A patching sweep or a benchmark runs the same batch hundreds of times,
and the walk reads nothing but the token ids and a few small per-image tensors: a digest of those
values names a batch that passed, and the walk runs again only for values it has not seen, so a
wrong batch is refused exactly as before.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor

# batches remembered per model; a sweep cycles through far fewer distinct batches than this
_REMEMBERED = 64


def values_digest(*values: Tensor | Any) -> bytes:
    """A digest of tensors' dtypes, shapes and values (and of other values' reprs), in order."""
    digest = hashlib.blake2b(digest_size=16)
    for value in values:
        if isinstance(value, Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        else:
            digest.update(repr(value).encode())
        digest.update(b"|")
    return digest.digest()


class PassedChecks:
    """The digests of the values a check passed on (the most recent `_REMEMBERED`)."""

    def __init__(self) -> None:
        self._passed: OrderedDict[bytes, None] = OrderedDict()

    def run(self, check: Callable[[], Any], *values: Tensor | Any) -> None:
        """Run `check` (which raises on bad input) unless it passed before on these `values`: every
        value the check reads, beyond the model's fixed config."""
        key = values_digest(*values)
        if key in self._passed:
            self._passed.move_to_end(key)
            return
        check()
        self._passed[key] = None
        if len(self._passed) > _REMEMBERED:
            self._passed.popitem(last=False)


def passed_checks(owner: object) -> PassedChecks:
    """`owner`'s memory of passed checks (a family instance: one per loaded model), made on first use."""
    memory = owner.__dict__.get("_passed_checks")
    if memory is None:
        memory = owner.__dict__["_passed_checks"] = PassedChecks()
    return memory
