"""``python -m zerocon_core ...``: see ``zerocon_core.diffusers_host.cli``."""

import sys

from .diffusers_host.cli import main

if __name__ == "__main__":
    sys.exit(main())
