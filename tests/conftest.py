"""Test configuration.

The example plugin in tests/fixtures/plugin_ok is a real distribution (a ``.dist-info`` with an
``entry_points.txt``) put on ``sys.path`` before collection, so ``importlib.metadata`` discovers it
exactly as it would an installed package, and every contract test parametrised over
``list_pruners()`` runs on it too.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
PLUGIN_DIR = FIXTURES / "plugin_ok"
BROKEN_PLUGIN_DIR = FIXTURES / "plugin_broken"

if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests, restored after.

    Tiny models are per-call overhead: one thread is as fast on an idle machine and many times faster on
    a shared one (a second thread waiting for a busy core stalls every op). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
