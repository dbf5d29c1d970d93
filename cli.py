"""Entry point: ``python cli.py search --budget-ms 30`` (see README.md)."""

import sys

from search.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
