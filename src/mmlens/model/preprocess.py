"""`mmlens.model.preprocess`, the import path scripts used before `model/` had wings; the module is
`mmlens.model.images.preprocess`."""

from .images.preprocess import *  # noqa: F401,F403
