"""Costs measured from outside the model (tokenprune.profiling) and their columns in a sweep.

1. KV cache at the end of prefill == layers x kept tokens x kv heads x head dim x 2 x bytes, counted
   independently (prompt lengths from the processor's mask, visual tokens from the image token ids,
   ``keep_count``), for ``none``, a pre-LLM method (fopru_rank) and an in-LLM one (fastv: per-layer
   sums, full length before layer K); a batch of two prompts of different lengths (padding not
   counted); bfloat16 halves the bytes.
2. The pruner's own time: every entry point timed once (nested calls not twice), the pruner left as it
   was, composing with record_kept.
3. Peak memory on CPU: a block that allocates 64 MiB reports at least that; memory held before the block
   is not counted.
4. A sweep writes the new columns (per-sample rows and summary), and report.md's Costs and
   Difficult-subset sections.
"""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.profiling import kv_probe, peak_memory, time_pruner
from tokenprune.pruner import create_pruner, keep_count
from tokenprune.zoo import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Is there a dog?", "What colour is the big square in the upper left corner of the picture?"]


@pytest.fixture(scope="module")
def lvlm():
    model, processor = tiny.tiny_llava()
    return tp.wrap(model, processor)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in PROMPTS]


def _independent_counts(lvlm, images, prompts):
    """Per row: real prompt tokens and visual tokens, from the processor output alone."""
    batch = lvlm.prepare(images, prompts)
    image_id = lvlm.model.config.image_token_id
    lengths = batch["attention_mask"].sum(1).tolist()
    visual = (batch["input_ids"] == image_id).sum(1).tolist()
    return lengths, visual


def _bytes_per_token(lvlm, dtype_bytes):
    cfg = lvlm.model.config.text_config
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return kv_heads * head_dim * 2 * dtype_bytes  # keys and values


@pytest.mark.parametrize("method", [None, "fopru_rank", "fastv"])
def test_kv_bytes_at_prefill_end_equal_the_analytic_count(lvlm, images, method):
    ratio = 0.25
    pruner = create_pruner(method, ratio=ratio) if method else None
    layers = lvlm.model.config.text_config.num_hidden_layers
    lengths, visual = _independent_counts(lvlm, images, PROMPTS)
    assert lengths[0] != lengths[1]  # the batch is padded: padding must not be counted
    per_tok = _bytes_per_token(lvlm, 4)
    expected = []
    for n, v in zip(lengths, visual):
        kept = n - v + keep_count(ratio, v)
        if method is None:
            per_layer = [n] * layers
        elif method == "fopru_rank":
            per_layer = [kept] * layers
        else:  # fastv: every token through layers < K, the kept ones from K on
            k = pruner.k
            per_layer = [n] * k + [kept] * (layers - k)
        expected.append(sum(per_layer) * per_tok)
    with kv_probe(lvlm.runner.layers) as kv:
        lvlm.generate(images, PROMPTS, pruner=pruner, max_new_tokens=3)
    assert [kv.bytes(i) for i in range(2)] == expected
    assert kv.token_bytes == [per_tok] * layers
    if method == "fastv":  # two layer groups: the full prefix, then the cut
        assert [g[:3] for g in kv.groups(0)] == [[0, pruner.k - 1, lengths[0]],
                                                 [pruner.k, layers - 1, lengths[0] - visual[0] + keep_count(ratio, visual[0])]]
    # alone == in the batch (the padding of the other row is not counted)
    with kv_probe(lvlm.runner.layers) as alone:
        lvlm.generate(images[:1], PROMPTS[:1], pruner=pruner, max_new_tokens=3)
    assert alone.bytes(0) == expected[0]


def test_kv_bytes_follow_the_cache_dtype(images):
    model, processor = tiny.tiny_llava()
    lvlm = tp.wrap(model.to(torch.bfloat16), processor)
    lengths, _ = _independent_counts(lvlm, images[:1], PROMPTS[:1])
    with kv_probe(lvlm.runner.layers) as kv:
        lvlm.generate(images[:1], PROMPTS[:1], max_new_tokens=2)
    layers = lvlm.model.config.text_config.num_hidden_layers
    assert kv.bytes(0) == layers * lengths[0] * _bytes_per_token(lvlm, 2)


def test_no_cache_no_figure(lvlm, images):
    with kv_probe(lvlm.runner.layers) as kv:
        lvlm.generate(images[:1], PROMPTS[:1], max_new_tokens=2, use_cache=False)
    assert kv.tokens == [] and kv.bytes(0) == 0


class _Nested:
    """A stand-in pruner whose select calls token_scores (nested entry points)."""

    def __init__(self):
        self.log = []

    def token_scores(self, x):
        self.log.append("scores")
        return x

    def select(self, x):
        self.log.append("select")
        return self.token_scores(x)


def test_pruner_time_counts_outer_calls_once_and_restores():
    p = _Nested()
    with time_pruner(p) as t:
        p.select(1)
        p.token_scores(2)
    assert t.calls == 2 and t.seconds > 0 and p.log == ["select", "scores", "scores"]
    assert "select" not in p.__dict__ and "token_scores" not in p.__dict__


def test_pruner_time_inside_a_real_generate_with_record_kept(lvlm, images):
    from tokenprune.visualize.record import record_kept

    pruner = create_pruner("fopru_rank", ratio=0.25)
    with record_kept(pruner) as rec, time_pruner(pruner) as t:
        lvlm.generate(images, PROMPTS, pruner=pruner, max_new_tokens=2, sample_ids=["a", "b"])
    assert t.calls >= 1 and t.seconds > 0
    assert rec.kept("a", [64]).stages[-1].sum() == keep_count(0.25, 64)
    assert not {"select", "token_scores", "view_scores"} & set(pruner.__dict__)


def test_peak_memory_on_cpu_counts_the_block_only():
    held = torch.ones(16 * 2**20)  # 64 MiB live before the block: not the block's
    with peak_memory("cpu") as quiet:
        pass
    with peak_memory("cpu") as busy:
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        x += 1
        del x
    assert quiet.cuda_mb is None and busy.cuda_mb is None
    assert quiet.cpu_rss_delta_mb < 16
    assert busy.cpu_rss_delta_mb >= 60
    del held


@pytest.fixture(scope="module")
def pope_dir(tmp_path_factory):
    import datasets
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    root = tmp_path_factory.mktemp("pope")
    rng = np.random.default_rng(0)

    def png():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    n = 4
    feats = Features({"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
                      "answer": Value("string"), "image_source": Value("string"), "image": ImageFeature(),
                      "category": Value("string")})
    (root / "data").mkdir()
    datasets.Dataset.from_dict({
        "id": [str(i) for i in range(n)], "question_id": [str(100 + i) for i in range(n)],
        "question": ["Is there a dog in the image?"] * n, "answer": ["yes", "no"] * (n // 2),
        "image_source": ["x"] * n, "image": [png() for _ in range(n)], "category": ["random"] * n,
    }, features=feats).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def test_sweep_writes_the_cost_columns(pope_dir, tmp_path):
    import json

    from tokenprune.benchmarks.report import SUMMARY_COLUMNS
    from tokenprune.benchmarks.sweep import load_config, run_sweep

    args = {"model": "tiny-llava", "tasks": "pope", "batch_size": 2, "data_dir": str(pope_dir), "methods": "fastv",
            "ratios": "0.5", "limit": 4, "output": str(tmp_path / "run"), "bootstrap": 50, "max_new_tokens": 3}
    out = run_sweep(load_config(None, args), log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    lvlm = tp.load("tiny-llava")
    per_tok = _bytes_per_token(lvlm, 4)
    for r in rows:
        # the KV cache holds what each layer processed at prefill (no decode plan cuts it here)
        assert r["kv_bytes"] == r["prefill_tokens"] * per_tok
        assert sum(g[3] for g in r["kv_groups"]) == r["kv_bytes"]
        assert r["cuda_peak_alloc_mb"] is None and r["cpu_peak_rss_delta_mb"] >= 0
        assert r["pruner_ms"] == 0 if r["method"] == "none" else r["pruner_ms"] > 0
        assert r["decode_ms_per_token"] is None or r["decode_ms_per_token"] > 0
    with (out / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert list(summary[0]) == SUMMARY_COLUMNS
    for s in summary:
        mine = [r["kv_bytes"] for r in rows if r["method"] == s["method"]]
        assert float(s["kv_bytes"]) == pytest.approx(np.mean(mine), rel=1e-5)
        assert s["cuda_peak_alloc_mb"] == "nan" and float(s["cpu_peak_rss_delta_mb"]) >= 0
    report = (out / "report.md").read_text()
    assert "## Costs" in report and "peak RSS increase (MiB, CPU)" in report
    assert "No `downsample` run in this sweep" in report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_on_cuda_is_the_allocators_peak():
    dev = torch.device("cuda")
    base = torch.cuda.memory_allocated(dev)
    with peak_memory([dev, torch.device("cpu")]) as peak:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
        del x
    assert peak.cpu_rss_delta_mb is None
    assert peak.cuda_mb == pytest.approx((base + 64 * 2**20) / 2**20, abs=2)
