"""``python -m monquant`` runs the command-line interface."""

import sys

from monquant.cli import main

sys.exit(main())
