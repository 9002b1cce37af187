"""``python -m funtrain``: see ``funtrain.cli``."""

import sys

from funtrain.cli import main

sys.exit(main())
