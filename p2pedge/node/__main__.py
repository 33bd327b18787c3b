"""Entry point: ``python -m p2pedge.node``."""

import sys

from p2pedge.node.cli import main

sys.exit(main())
