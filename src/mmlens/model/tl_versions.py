"""What differs between the TransformerLens releases mmlens runs on, detected from TL itself.

mmlens supports transformer-lens 3.9 (the newest that sae-lens 6 allows: `transformer-lens<4`)
through 4.3, so that it installs beside sae-lens. What TL 4 added and mmlens relies on:
`ActivationCache.remove_batch_dim(batch_size)` (the true batch, which inference from the entries'
leading dims gets wrong); a caching hook that drops only a size-1 batch dim (TL 3.9's indexes `[0]`
and then slices positions by the rank the entry had before, an IndexError on a `[1, 1]` pooled
norm scale); result contribution scales its own ActivationCache reads; and `_uses_ln_centering`,
which `MultimodalActivationCache` defines itself. Each is told from TL's code, not its version.
"""

from __future__ import annotations

import importlib
import inspect

from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache

# the module, not the class of the same name that `transformer_lens` re-exports
_root_module = importlib.import_module("transformer_lens.HookedRootModule")

# TL 4's fix imports this helper into HookedRootModule and drops only a size-1 leading dim there.
CACHING_HOOKS_DROP_BATCH_DIM_SAFELY: bool = hasattr(_root_module, "drop_batch_dim")

REMOVE_BATCH_DIM_TAKES_A_SIZE: bool = "batch_size" in inspect.signature(ActivationCache.remove_batch_dim).parameters

# TL 4's own ActivationCache scales head and neuron results by these scalars, which mmlens's blocks
# refuse to give where a post-norm or layer scale acts (`weights.py`); TL 3.9's reads neither, so
# over a post-norm model it stacks un-normalised results and only mmlens's own cache is exact.
ACTIVATION_CACHE_READS_CONTRIBUTION_SCALES: bool = "_result_contribution_scale" in inspect.getsource(ActivationCache)


def drop_batch_dim(tensor: Tensor) -> Tensor:
    """TL 4's `remove_batch_dim` of one entry: the leading dim goes only where it is one row."""
    return tensor[0] if tensor.ndim > 0 and tensor.size(0) == 1 else tensor
