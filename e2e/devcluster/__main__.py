"""`python -m e2e.devcluster up`: the emulated cluster, from a clone of the repository."""

import sys

from .cluster import main

sys.exit(main())
