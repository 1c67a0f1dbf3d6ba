"""`mmlens.model.layout`, the import path scripts used before `model/` had wings; the module is
`mmlens.model.images.layout`."""

from .images.layout import *  # noqa: F401,F403
