"""tokenprune bench: outputs, resume after SIGKILL, refusal of a changed sweep, W&B offline, bad input."""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from datasets import Features, Image as ImageFeature, Value
from PIL import Image

import tokenprune as tp
from tokenprune.benchmarks.report import MEASURED_COLUMNS, SUMMARY_COLUMNS
from tokenprune.benchmarks.sweep import load_config, read_rows, row_key, run_sweep

N_SAMPLES = 12


@pytest.fixture(scope="module")
def pope_dir(tmp_path_factory):
    """A local POPE copy (real schema) with 12 random images."""
    root = tmp_path_factory.mktemp("pope")
    rng = np.random.default_rng(0)

    def png():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    feats = Features({"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
                      "answer": Value("string"), "image_source": Value("string"), "image": ImageFeature(),
                      "category": Value("string")})
    (root / "data").mkdir()
    datasets.Dataset.from_dict({
        "id": [str(i) for i in range(N_SAMPLES)], "question_id": [str(100 + i) for i in range(N_SAMPLES)],
        "question": ["Is there a dog in the image?"] * N_SAMPLES, "answer": ["yes", "no"] * (N_SAMPLES // 2),
        "image_source": ["x"] * N_SAMPLES, "image": [png() for _ in range(N_SAMPLES)],
        "category": ["adversarial", "popular", "random"] * (N_SAMPLES // 3),
    }, features=feats).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def bench_args(pope_dir, out, **extra):
    args = {"model": "tiny-llava", "tasks": "pope", "batch_size": 2, "data_dir": str(pope_dir), "methods": "fopru_rank,random,fastv", "ratios": "0.5,0.25",
            "limit": 6, "output": str(out), "bootstrap": 200, "max_new_tokens": 3}
    args.update(extra)
    return args


def read_summary(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_sweep_writes_every_output(pope_dir, tmp_path):
    out = run_sweep(load_config(None, bench_args(pope_dir, tmp_path / "run")), log=lambda *_: None)
    for name in ["samples.jsonl", "summary.csv", "pareto.csv", "pareto_pope.png", "report.md", "config.yaml"]:
        assert (out / name).exists(), name
    rows = read_rows(out / "samples.jsonl")
    assert len(rows) == 6 * 7 and len({row_key(r) for r in rows}) == len(rows)  # 1 reference + 3 methods x 2 ratios
    from tokenprune.visualize.record import Kept

    for r in rows:  # what each run kept, per view: as many tokens as the model received
        if r["method"] == "none":
            assert r["kept"] is None
        else:
            kept = Kept.from_json(r["kept"])
            assert sum(kept.views) == r["visual_tokens_in"] and kept.stages[-1].sum() == r["visual_tokens_kept"]
    summary = read_summary(out / "summary.csv")
    assert list(summary[0]) == SUMMARY_COLUMNS
    assert [(r["method"], r["ratio"]) for r in summary][:3] == [("none", "1"), ("fopru_rank", "0.5"), ("fopru_rank", "0.25")]
    by = {(r["method"], float(r["ratio"])): r for r in summary}
    assert float(by[("none", 1.0)]["visual_tokens_kept"]) == 64
    assert float(by[("fopru_rank", 0.25)]["visual_tokens_kept"]) == 16
    assert float(by[("fastv", 0.25)]["visual_tokens_kept"]) == 16  # counted inside the LLM, after layer K
    assert float(by[("fopru_rank", 0.25)]["flops_ratio"]) < float(by[("fopru_rank", 0.5)]["flops_ratio"]) < 1
    for r in summary:
        assert float(r["score_ci_low"]) <= float(r["score"]) <= float(r["score_ci_high"])
    prov = yaml.safe_load((out / "config.yaml").read_text())
    assert prov["config"]["methods"] == ["fopru_rank", "random", "fastv"] and prov["seed"] == 0
    assert set(prov["versions"]) >= {"tokenprune", "torch", "transformers"} and prov["git_commit"]
    front = list(csv.DictReader((out / "pareto.csv").open()))
    assert any(r["on_front"] == "True" for r in front)
    report = (out / "report.md").read_text()
    assert "Pareto front" in report and "pareto_pope.png" in report and "mcnemar" in report


def test_vision_pass_is_shared_between_runs(pope_dir, tmp_path, monkeypatch):
    """Each batch is encoded once per distinct vision need, not once per (method, ratio)."""
    from tokenprune.adapters import PrunableLVLM

    calls = []
    encode = PrunableLVLM.encode
    monkeypatch.setattr(PrunableLVLM, "encode", lambda self, *a, **k: calls.append(a[2] if len(a) > 2 else None) or encode(self, *a, **k))
    run_sweep(load_config(None, bench_args(pope_dir, tmp_path / "run")), log=lambda *_: None)
    # 6 samples in batches of 2 = 3 batches; {none, random x2, fastv x2} share one pass, fopru_rank x2
    # another; + 1 for the warm-up.
    assert len(calls) == 3 * 2 + 1
    assert sum(1 for n in calls if n is not None and n.vision_attention_layer is not None) == 3


def test_rerun_computes_nothing_and_changed_sweep_is_refused(pope_dir, tmp_path):
    args = bench_args(pope_dir, tmp_path / "run", methods="pool", ratios="0.25")
    out = run_sweep(load_config(None, args), log=lambda *_: None)
    before = (out / "samples.jsonl").read_text()
    run_sweep(load_config(None, args), log=lambda *_: None)
    assert (out / "samples.jsonl").read_text() == before
    with pytest.raises(tp.TokenpruneError, match="holds a different sweep .*ratios"):
        run_sweep(load_config(None, {**args, "ratios": "0.5"}), log=lambda *_: None)


def test_truncated_last_line_is_dropped(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"a": 2, "b"')
    assert read_rows(path) == [{"a": 1}]
    assert path.read_text() == json.dumps({"a": 1}) + "\n"


def _default_sigint():
    # A shell running pytest in the background starts it with SIGINT ignored, and children inherit
    # that (Python then installs no KeyboardInterrupt handler): give the child the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "tokenprune", "bench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=_default_sigint, **kw)


def flags(pope_dir, out):
    return ["--model", "tiny-llava", "--batch-size", "1", "--tasks", "pope", "--data-dir", str(pope_dir), "--methods", "fopru_rank,pool", "--ratios", "0.5,0.25",
            "--limit", str(N_SAMPLES), "--output", str(out), "--bootstrap", "200", "--max-new-tokens", "3"]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(pope_dir, tmp_path):
    full = cli(*flags(pope_dir, tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.stderr.read()

    out = tmp_path / "killed"
    proc = cli(*flags(pope_dir, out))
    samples = out / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once some, but not all, rows are on disk
        if samples.exists() and samples.read_text().count("\n") >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = samples.read_text().count("\n")
    total = N_SAMPLES * 5
    assert 20 <= partial < total, f"kill came too late ({partial} rows): the test did not interrupt the run"

    resumed = cli(*flags(pope_dir, out))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"{total} sample-runs, {partial} already in" in stdout

    rows = read_rows(samples)
    assert len(rows) == total and len({row_key(r) for r in rows}) == total  # no duplicates, nothing missing
    timing = MEASURED_COLUMNS  # wall clock and memory differ between runs; everything else must match
    a, b = read_summary(tmp_path / "full" / "summary.csv"), read_summary(out / "summary.csv")
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in b]


def test_ctrl_c_is_one_line_and_resumable(pope_dir, tmp_path):
    out = tmp_path / "int"
    proc = cli(*flags(pope_dir, out))
    samples = out / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (samples.exists() and samples.read_text().count("\n") >= 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted; finished samples are saved" in stderr and "Traceback" not in stderr
    assert len(read_rows(samples)) >= 5


def test_wandb_offline_table(pope_dir, tmp_path):
    args = bench_args(pope_dir, tmp_path / "run", methods="fopru_row", ratios="0.5", wandb_project="tp-test",
                      wandb_mode="offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    out = run_sweep(load_config(None, args), log=lambda *_: None)
    tables = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "table" / "summary_*.table.json"))
    assert len(tables) == 1
    table = json.loads(Path(tables[0]).read_text())
    assert table["columns"] == SUMMARY_COLUMNS
    summary = read_summary(out / "summary.csv")
    assert [(r[2], r[3]) for r in table["data"]] == [(s["method"], float(s["ratio"])) for s in summary]
    assert [round(r[SUMMARY_COLUMNS.index("tflops")], 9) for r in table["data"]] == \
           [round(float(s["tflops"]), 9) for s in summary]
    images = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "images" / "**" / "*.png"), recursive=True)
    assert images, "the Pareto PNG is logged as an image"


@pytest.mark.parametrize("argv, expected", [
    (["--limit", "0"], "--limit must be a positive integer or 'all'"),
    (["--limit", "many"], "--limit must be a positive integer or 'all'"),
    (["--methods", ""], "no methods given"),
    (["--methods", "fopru_rnk"], "unknown pruner 'fopru_rnk'"),
    (["--methods", "fastv:k=0"], "k must be >= 1"),
    (["--ratios", "0.5,1.5"], "each ratio must be a number in (0, 1]"),
    (["--ratios", "0"], "each ratio must be a number in (0, 1]"),
    (["--tasks", "popee"], "unknown task 'popee'"),
    (["--dtype", "float8"], "--dtype must be one of"),
    (["--device", "gpu0"], "--device must be auto, cpu, cuda, cuda:N"),
    (["--wandb-mode", "sometimes"], "--wandb-mode must be one of"),
    (["--config", "nope.yaml"], "config file nope.yaml does not exist; shipped configs: configs/ablations"),
    (["--shard", "2/2"], "--shard must be I/N with 0 <= I < N"),
    (["--device-map", "cuda:99"], "bad device_map: cuda:99, but this machine has"),
    (["--device-map", "gpus"], "bad device_map: 'gpus'; use auto, balanced"),
    (["--methods", "fopru_rank:ratio=abc"], "ratio must be a number in (0, 1], got 'abc'"),
    (["--methods", "fopru_rank:ratio=2,fastv"], "for a sweep over ratios use --ratios"),
    (["--methods", "fastv,fastv"], "method 'fastv' is listed twice"),
])
def test_bad_input_is_one_line_exit_2(argv, expected):
    proc = subprocess.run([sys.executable, "-m", "tokenprune", "bench", *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in proc.stderr


def test_bad_yaml_is_one_line(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("methods: [fopru_rank]\nratio: 0.5\n")
    with pytest.raises(tp.OptionError, match="unknown key.*ratio.*valid keys: .*ratios"):
        load_config(bad_key, {})
    broken = tmp_path / "b.yaml"
    broken.write_text("methods: [fopru_rank\nratios: 0.5\n")
    with pytest.raises(tp.OptionError, match="not valid YAML"):
        load_config(broken, {})


@pytest.mark.parametrize("name", ["configs/default.yaml", "configs/ablations/fopru_rank_vs_row.yaml",
                                  "configs/ablations/fopru_vision_layer.yaml", "configs/ablations/fopru_score_axis.yaml",
                                  "configs/ablations/fastv_k_r_grid.yaml", "configs/ablations/position_policy.yaml",
                                  "configs/demo_shapes_scene.yaml", "configs/demo_shapes_video.yaml",
                                  "configs/demo_difficult.yaml", "configs/evidence_tiny_qwen2_vl.yaml",
                                  "configs/evidence_tiny_llava_onevision.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_config(name, {})
    assert cfg.methods and cfg.ratios and cfg.tasks


def test_defaults_are_the_demo_run(monkeypatch):
    import tokenprune.zoo as zoo

    cfg = load_config(None, {})
    assert (cfg.model, cfg.tasks, cfg.limit, cfg.ratios) == ("tokenprune-demo", ["shapes_scene"], 200, [0.25, 0.1])
    assert load_config(None, {"limit": "all"}).limit is None
    # --dtype auto: the demo in bfloat16 where the device computes it natively, float32 elsewhere; a
    # model without a zoo dtype keeps "auto" (its checkpoint's own); an explicit dtype is never replaced
    assert cfg.dtype == ("bfloat16" if zoo.native_bfloat16("auto") else "float32")
    monkeypatch.setattr(zoo, "native_bfloat16", lambda device: device == "cpu")
    assert load_config(None, {"device": "cpu"}).dtype == "bfloat16"
    assert load_config(None, {"device": "cuda"}).dtype == "float32"
    assert load_config(None, {"device": "cpu", "dtype": "float32"}).dtype == "float32"
    assert load_config(None, {"device": "cpu", "model": "tiny-llava"}).dtype == "auto"
    monkeypatch.undo()
    assert not zoo.native_bfloat16("nonsense")  # left to the run's own one-line device check


def test_flags_override_config(tmp_path):
    cfg = load_config("configs/ablations/fastv_k_r_grid.yaml", {"ratios": "0.1", "limit": 5})
    assert cfg.ratios == [0.1] and cfg.limit == 5 and cfg.methods[0] == "fastv:k=2"


def test_methods_none_runs_only_the_unpruned_model():
    from tokenprune.benchmarks.sweep import method_runs

    cfg = load_config(None, {"methods": "none"})
    assert cfg.methods == [] and method_runs(cfg) == [("none", 1.0)]


def test_method_with_a_fixed_position_policy(tmp_path):
    """``name@keep`` / ``name@compact``: the same method under both policies in one sweep (the ablation)."""
    from tokenprune.benchmarks.sweep import run_policy, split_policy

    cfg = load_config("configs/ablations/position_policy.yaml", {})
    assert "visionzip@keep" in cfg.methods and "visionzip@compact" in cfg.methods
    assert split_policy("visionzip@keep") == ("visionzip", "keep") and split_policy("fastv:k=3") == ("fastv:k=3", None)
    assert run_policy(cfg, "divprune@keep") == "keep" and run_policy(cfg, "divprune") is None
    with pytest.raises(tp.OptionError, match="keep or compact"):
        load_config(None, {"methods": "divprune@shuffle"})


def test_a_ratio_in_a_method_spec_pins_its_runs():
    """``name:ratio=R``: that method runs once, at R; the others at every --ratios value (hand-checked)."""
    from tokenprune.benchmarks.sweep import method_runs, run_ratios

    cfg = load_config(None, {"methods": "fopru_rank:ratio=0.3,fastv", "ratios": "0.5,0.25"})
    assert method_runs(cfg) == [("none", 1.0), ("fopru_rank:ratio=0.3", 0.3), ("fastv", 0.5), ("fastv", 0.25)]
    assert run_ratios(cfg) == [0.5, 0.25, 0.3]
    cfg = load_config(None, {"methods": "fopru_rank:ratio=0.5@keep,pdrop:layers=2,8,16,fopru_rank", "ratios": "0.5,0.1"})
    assert method_runs(cfg) == [("none", 1.0), ("fopru_rank:ratio=0.5@keep", 0.5), ("pdrop:layers=2,8,16", 0.5),
                                ("pdrop:layers=2,8,16", 0.1), ("fopru_rank", 0.5), ("fopru_rank", 0.1)]
    assert run_ratios(cfg) == [0.5, 0.1]
    cfg = load_config(None, {"methods": [{"name": "pool", "ratio": 1}], "ratios": "0.5"})  # a YAML mapping too
    assert method_runs(cfg) == [("none", 1.0), ("pool:ratio=1", 1.0)]


@pytest.mark.parametrize("overrides, expected", [
    ({"methods": "fopru_rank:ratio=abc"}, "method 'fopru_rank:ratio=abc': ratio must be a number in (0, 1], got 'abc'"),
    ({"methods": "fopru_rank:ratio=2"}, "got 2 (a ratio in a method spec runs that method once, at it; for a sweep over ratios use --ratios)"),
    ({"methods": "fopru_rank:ratio=0"}, "ratio must be a number in"),
    ({"methods": "random:ratio=true"}, "ratio must be a number in"),
    ({"methods": "fopru_rank@keep:ratio=0.3"}, "put options before it: fopru_rank:ratio=0.3@keep"),
    ({"methods": "none:ratio=0.3"}, "the unpruned reference 'none' takes no options"),
    ({"methods": "none@keep"}, "the unpruned reference 'none' takes no options"),
    ({"methods": "fastv:k=3,fastv:k=3"}, "listed twice"),
    ({"tasks": "pope,pope"}, "task 'pope' is listed twice"),
    ({"tasks": "videomme:frames=2", "task_options": {"videomme": {"frames": 4}}},
     "task videomme: option frames is given twice, 2 in the task spec and 4 in task_options"),
    ({"tasks": "pope", "task_options": {"popee": {}}}, "task_options names unknown task 'popee'"),
    ({"tasks": "pope", "data_dir": {"popee": "/data"}}, "data_dir names unknown task 'popee'"),
    ({"tasks": "pope:dataset_path=me/pope", "data_dir": "/data"}, "dataset_path='me/pope' names a Hub dataset, but"),
    ({"seed": "abc"}, "--seed must be an integer"),
    ({"max_new_tokens": True}, "max_new_tokens must be a positive integer"),
])
def test_nothing_is_silently_overridden(overrides, expected):
    with pytest.raises(tp.TokenpruneError) as err:
        load_config(None, overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_task_options_flags_win_over_the_yaml(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("tasks: [videomme]\ntask_options: {videomme: {frames: 4, sampler: uniform}}\n")
    assert load_config(path, {}).task_options == {"videomme": {"frames": 4, "sampler": "uniform"}}
    cfg = load_config(path, {"tasks": "videomme:frames=2"})  # the flag replaces the file's frames, keeps the rest
    assert cfg.tasks == ["videomme"] and cfg.task_options == {"videomme": {"frames": 2, "sampler": "uniform"}}
    path.write_text("tasks: ['videomme:frames=2']\ntask_options: {videomme: {frames: 4}}\n")  # one file, two values
    with pytest.raises(tp.OptionError, match="frames is given twice"):
        load_config(path, {})


def test_sweep_seed_reaches_seeded_pruners_unless_the_spec_sets_one():
    from tokenprune.benchmarks.sweep import make_pruner

    assert make_pruner("random", 0.5, seed=7).seed == 7 and make_pruner("random:seed=4", 0.5, seed=7).seed == 4
    assert make_pruner("random@keep", 0.5).seed == 0 and make_pruner("none", 1.0, seed=7) is None
    assert make_pruner("pool", 0.25, seed=7).ratio == 0.25  # no seed option: nothing passed


def test_pinned_ratio_end_to_end(pope_dir, tmp_path):
    """``fopru_rank:ratio=0.3,fastv`` over ``--ratios 0.5,0.25``: fopru_rank once at 0.3, in every output, resumable."""
    args = bench_args(pope_dir, tmp_path / "run", methods="fopru_rank:ratio=0.3,fastv", limit=4)
    out = run_sweep(load_config(None, args), log=lambda *_: None)
    summary = read_summary(out / "summary.csv")
    assert [(r["method"], float(r["ratio"])) for r in summary] == [
        ("none", 1.0), ("fopru_rank:ratio=0.3", 0.3), ("fastv", 0.5), ("fastv", 0.25)]
    by = {(r["method"], float(r["ratio"])): r for r in summary}
    assert float(by[("fopru_rank:ratio=0.3", 0.3)]["visual_tokens_kept"]) == 19  # round(0.3 * 64)
    assert all(int(r["n"]) == 4 for r in summary)
    rows = read_rows(out / "samples.jsonl")
    assert len(rows) == 4 * 4 and {float(r["ratio"]) for r in rows if r["method"].startswith("fopru_rank")} == {0.3}
    assert "fopru_rank:ratio=0.3 only at 0.3" in (out / "report.md").read_text()
    before = (out / "samples.jsonl").read_text()
    run_sweep(load_config(None, args), log=lambda *_: None)  # resumed: nothing left to compute
    assert (out / "samples.jsonl").read_text() == before


# -- ratio-free (adaptive) methods: run once per task, not once per ratio ------------------------------
RATIO_FREE = "test_ratio_free"


@pytest.fixture
def ratio_free_pruner():
    """A pruner whose count is chosen per sample (tokens at or above their mean norm) and which ignores
    ``ratio`` (``uses_ratio`` false), registered for the test; ``calls`` lists the sample ids it pruned."""
    import torch

    from tokenprune.pruner import PRUNERS, Reduction, TokenPruner, register_pruner, topk_indices, validate_ratio

    class RatioFree(TokenPruner):
        views, scopes, quantised, adaptive = "global", ("clip",), True, True
        calls: list = []

        @property
        def uses_ratio(self) -> bool:
            return False

        def __init__(self, ratio: float = 0.5):
            self.ratio = validate_ratio(ratio)

        def num_kept(self, n_tokens, grid):
            return n_tokens

        def select(self, inputs):
            RatioFree.calls.extend(inputs.sample_ids)
            norms = inputs.tokens.float().norm(dim=-1)
            k = int((norms[0] >= norms[0].mean()).sum().clamp(min=1))  # adaptive: one clip per call
            return Reduction(indices=topk_indices(norms, k).to(torch.long))

    register_pruner(RATIO_FREE)(RatioFree)
    yield RatioFree
    PRUNERS._entries.pop(RATIO_FREE, None)


def test_ratio_free_methods_run_once_ratio_steered_per_ratio(ratio_free_pruner):
    """``uses_ratio`` false (scissor): one run, ratio ``None``; fastvid (adaptive, ratio steers it): per ratio."""
    from tokenprune.benchmarks.sweep import method_runs, run_ratios

    cfg = load_config(None, {"methods": f"scissor,fastvid,{RATIO_FREE}@keep,fastv", "ratios": "0.5,0.25,0.1"})
    assert method_runs(cfg) == [("none", 1.0), ("scissor", None), ("fastvid", 0.5), ("fastvid", 0.25), ("fastvid", 0.1),
                                (f"{RATIO_FREE}@keep", None), ("fastv", 0.5), ("fastv", 0.25), ("fastv", 0.1)]
    assert run_ratios(cfg) == [0.5, 0.25, 0.1]
    for spec in ("scissor:ratio=0.3", f"{RATIO_FREE}:ratio=0.3@keep"):  # a pinned ratio would mean nothing: refused
        with pytest.raises(tp.OptionError, match="chooses its count per sample and ratio has no meaning") as err:
            load_config(None, {"methods": spec})
        assert "\n" not in str(err.value)


def test_ratio_free_method_end_to_end(pope_dir, tmp_path, ratio_free_pruner, monkeypatch):
    """Over 3 ratios the ratio-free method runs once per sample, has one row per sample (ratio null, an empty
    cell in the CSVs, ``adaptive`` in the tables), one marker in the plot; a resume reruns none of it."""
    import matplotlib.figure

    figures = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or savefig(fig, *a, **k))
    calls, logged = ratio_free_pruner.calls, []
    args = bench_args(pope_dir, tmp_path / "run", methods=f"{RATIO_FREE},random", ratios="0.5,0.25,0.1", limit=4)
    out = run_sweep(load_config(None, args), log=logged.append)
    ids = sorted({r["sample_id"] for r in read_rows(out / "samples.jsonl")})
    assert sorted(calls) == ids  # once per sample, not once per ratio
    note = f"{RATIO_FREE}: count chosen per sample, ratio has no meaning; run once"
    assert sum(note in line for line in logged) == 1

    rows = read_rows(out / "samples.jsonl")
    assert len(rows) == 4 * (1 + 1 + 3)
    mine = [r for r in rows if r["method"] == RATIO_FREE]
    assert len(mine) == 4 and all(r["ratio"] is None for r in mine)
    summary = read_summary(out / "summary.csv")
    assert list(summary[0]) == SUMMARY_COLUMNS
    assert [(r["method"], r["ratio"]) for r in summary] == [
        ("none", "1"), (RATIO_FREE, ""), ("random", "0.5"), ("random", "0.25"), ("random", "0.1")]
    adaptive = summary[1]  # measured, as for any run: tokens kept (chosen per sample) and FLOPs
    assert float(adaptive["visual_tokens_kept"]) == pytest.approx(np.mean([r["visual_tokens_kept"] for r in mine]), rel=1e-5)
    assert 0 < float(adaptive["visual_tokens_kept"]) < 64 and 0 < float(adaptive["flops_ratio"]) < 1
    pareto = [r for r in csv.DictReader((out / "pareto.csv").open()) if r["method"] == RATIO_FREE]
    assert len(pareto) == 1 and pareto[0]["ratio"] == ""
    report = (out / "report.md").read_text()
    assert report.split("## Costs")[0].count(f"| pope | {RATIO_FREE} | adaptive |") == 1  # one row in the main table
    assert report.split("## Costs")[1].count(f"| pope | {RATIO_FREE} | adaptive |") == 1  # and one in the costs
    assert f"{RATIO_FREE} run once, its count chosen per sample: ratio adaptive" in report

    (fig,) = figures  # the Pareto plot: the method as one labelled marker, not a curve over ratios
    ax = fig.axes[0]
    assert f"{RATIO_FREE} (adaptive)" in ax.get_legend_handles_labels()[1]
    assert sum(t.get_text().startswith("adaptive") for t in ax.texts) == 1
    assert sorted(t.get_text() for t in ax.texts if not t.get_text().startswith("adaptive")) == ["0.1", "0.25", "0.5"]

    calls.clear()  # resume: nothing to compute
    before = (out / "samples.jsonl").read_text()
    run_sweep(load_config(None, args), log=lambda *_: None)
    assert calls == [] and (out / "samples.jsonl").read_text() == before

    # interrupted: two of its samples missing -> only those rerun, once each (+ at most the untimed warm-up)
    lost = set(ids[:2])
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                               if not (r["method"] == RATIO_FREE and r["sample_id"] in lost)))
    run_sweep(load_config(None, args), log=lambda *_: None)
    assert set(calls) == lost and len(calls) <= len(lost) + 1
    timing = MEASURED_COLUMNS  # wall clock and memory differ between runs; everything else must match
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_summary(out / "summary.csv")] == \
           [{k: v for k, v in r.items() if k not in timing} for r in summary]

    # rows an older tokenprune wrote once per ratio (all alike) are read as the one run: nothing reruns
    calls.clear()
    legacy = [{**r, "ratio": ratio} for r in read_rows(out / "samples.jsonl") for ratio in
              ([0.5, 0.25, 0.1] if r["method"] == RATIO_FREE else [r["ratio"]])]
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in legacy))
    run_sweep(load_config(None, args), log=lambda *_: None)
    assert calls == []
    assert [(r["method"], r["ratio"]) for r in read_summary(out / "summary.csv")][1] == (RATIO_FREE, "")
