"""`python -m e2e.chaos`: the chaos runner, from a clone of the repository."""

import sys

from .runner import main

sys.exit(main())
