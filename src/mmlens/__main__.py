"""`python -m mmlens ...` (what `torchrun -m mmlens study CONFIG.yaml` runs): the `mmlens` command."""

import sys

from .cli import main

sys.exit(main())
