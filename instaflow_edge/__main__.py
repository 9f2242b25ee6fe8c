"""`python -m instaflow_edge` runs the command line."""

import sys

from instaflow_edge.cli import main

sys.exit(main())
