"""``python -m tokenprune`` runs the CLI."""
import sys

from .cli import main

sys.exit(main())
