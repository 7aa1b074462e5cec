"""The docs' plugin example is the plugin the test suite installs, so the docs cannot rot."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import PLUGIN_DIR

DOCS = Path(__file__).parents[1] / "docs"


def test_plugin_example_in_docs_is_the_tested_fixture():
    text = (DOCS / "pruners.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    fixture = (PLUGIN_DIR / "tp_example_plugin" / "__init__.py").read_text()
    assert fixture in blocks
    entry_points = (PLUGIN_DIR / "tp_example_plugin-0.3.1.dist-info" / "entry_points.txt").read_text()
    assert 'l2norm = "tp_example_plugin:NormPruner"' in text and "l2norm = tp_example_plugin:NormPruner" in entry_points
