"""python -m sbp_kernels.bench: the sbp-bench CLI."""
import sys

from .cli import main

sys.exit(main())
