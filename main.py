"""Entry point: ``python main.py --help``. All logic lives in pocketflow.cli."""

import sys

from pocketflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
