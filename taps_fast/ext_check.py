"""``python -m taps_fast.ext_check [SO]``: the same as ``python -m taps_fast.checks ext [SO]``."""
import sys

from .checks.ext_sass import *  # noqa: F401,F403
from .checks.ext_sass import main

if __name__ == "__main__":
    sys.exit(main())
