"""`python -m jetnas ...` is the `jetnas` command."""

import sys

from jetnas.cli import main

sys.exit(main())
