"""`python3 -m kvmlet` is the `kvmlet` command."""

import sys

from kvmlet.cli import main

sys.exit(main())
