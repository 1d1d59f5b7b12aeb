"""`python -m tools.qmpsim QEMU-ARGS...`: one simulated VM (see tools/qmpsim/__init__.py)."""

import sys

from .main import main

sys.exit(main(sys.argv[1:]))
