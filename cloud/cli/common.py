"""What every `diredi` command shares and imports from here, never from `main` (which imports them)."""

import sys

from rich.console import Console

# Off a terminal rich would wrap the tables at 80 columns; the sim table needs more.
console = Console(width=None if sys.stdout.isatty() else 150)
