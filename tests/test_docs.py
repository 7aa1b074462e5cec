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


def test_in_llm_plugin_example_in_docs_runs():
    """The docs' in-LLM example: registered, given the hidden states entering its layer, really prunes there."""
    import numpy as np
    from PIL import Image

    import tokenprune as tp

    text = (DOCS / "pruners.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "OutlierPruner" in b)
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102 - our own docs
    assert "outliers" in tp.list_pruners()
    lvlm = tp.load("tiny-llava")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = lvlm.generate([image], ["what is in the image ?"], pruner=tp.create_pruner("outliers", ratio=0.25), max_new_tokens=1)
    assert out.stats[0].visual_per_layer == [64, 64, 64, 16]


def test_lmms_eval_task_example_in_docs_is_the_tested_fixture():
    """docs/lmms_eval.md's local task is the one tests/test_lmms_eval.py runs through lmms-eval."""
    text = (DOCS / "lmms_eval.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    fixture = (Path(__file__).parent / "fixtures" / "lmms_eval" / "easy_vqa_tp.yaml").read_text()
    assert block == "".join(line for line in fixture.splitlines(keepends=True) if not line.startswith("#"))


def test_in_vision_plugin_example_in_docs_runs():
    """The docs' in-vision example: it cuts inside the tower to the budget, by block 1's CLS attention."""
    import numpy as np
    import torch
    from PIL import Image

    import tokenprune as tp
    from tokenprune.adapters.common import eager_vision_attention

    text = (DOCS / "pruners.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "ClsCut" in b)
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102 - our own docs
    lvlm = tp.load("tiny-llava")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    pruner = tp.create_pruner("cls_cut", ratio=0.25)
    out = lvlm.generate([image], ["what is in the image ?"], pruner=pruner, max_new_tokens=1)
    st = out.stats[0]
    # 3-block tower, LLaVA reads block 1's output: block 1 (the last run) cuts after its MLP
    assert st.vision_blocks == [((65, 65), (65, 65))] and st.visual_tokens_kept == 16
    (view,) = lvlm.encode([image], ["what is in the image ?"], lvlm.vision_needs(pruner)).views
    cls = eager_vision_attention(lvlm.model.model.vision_tower, lvlm.prepare([image], ["?"])["pixel_values"], 1)[0, 0, 1:]
    assert view.vision_origin.tolist() == torch.sort(torch.topk(cls, 16).indices).values.tolist()
