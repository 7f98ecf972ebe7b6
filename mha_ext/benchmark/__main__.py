"""``python -m mha_ext.benchmark``: see cli.py and benchmarks/README.md."""

import sys

from .cli import main

sys.exit(main())
