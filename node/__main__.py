"""``python -m node``: see ``node/cli.py``."""

import sys

from node.cli import main

sys.exit(main())
