"""`python -m lmforge.cli` = the `lmforge` command."""

import sys

from lmforge.cli.entrypoint import main

sys.exit(main())
