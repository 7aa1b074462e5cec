"""Test configuration.

The example plugin in tests/fixtures/plugin_ok is a real distribution (a ``.dist-info`` with an
``entry_points.txt``) put on ``sys.path`` before collection, so ``importlib.metadata`` discovers it
exactly as it would an installed package, and every contract test parametrised over
``list_pruners()`` runs on it too.
"""
from __future__ import annotations

import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
PLUGIN_DIR = FIXTURES / "plugin_ok"
BROKEN_PLUGIN_DIR = FIXTURES / "plugin_broken"

if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))
