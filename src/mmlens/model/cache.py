"""TransformerLens's `ActivationCache` over all three stages, with alias names and the layout."""

from __future__ import annotations

from typing import Any

from transformer_lens.ActivationCache import ActivationCache

from .layout import ImageTokenLayout


class MultimodalActivationCache(ActivationCache):
    """An `ActivationCache` that also accepts TransformerBridge names and carries the layout."""

    layout: ImageTokenLayout | None = None

    def __getitem__(self, key: Any):
        if isinstance(key, str) and key not in self.cache_dict:
            base, grad = (key[: -len("_grad")], "_grad") if key.endswith("_grad") else (key, "")
            canonical = self.model.resolve_hook_name(base) + grad
            if canonical in self.cache_dict:
                return self.cache_dict[canonical]
        return super().__getitem__(key)
