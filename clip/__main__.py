"""``python -m clip``: the command line."""

import sys

from clip.cli import main

sys.exit(main())
