"""`python -m apbv ...`: see apbv.cli."""

import sys

from apbv.cli import main

sys.exit(main())
