"""`python -m bench [list | quick [NAME ...] | NAME [--quick] [ARGS ...]]`: see bench/README.md."""

import sys

from bench.suite import main

sys.exit(main())
