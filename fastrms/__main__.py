"""`python -m fastrms`: the command line (`fastrms.cli`). Importing this module runs
nothing."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
