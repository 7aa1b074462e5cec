"""Sweeps over several processes: torchrun ranks (gloo on CPU), --shard job arrays, `tokenprune report`.

Every multi-process result is compared with a one-process run of the same sweep: equal in every
summary column but the wall-clock ones, the same rows in samples.jsonl, nothing duplicated.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed import HashStore

from test_bench import N_SAMPLES, pope_dir, read_summary  # noqa: F401 -- pope_dir is a fixture
from tokenprune import TokenpruneError
from tokenprune.benchmarks import results
from tokenprune.benchmarks.distributed import Shard, Workers, balanced_split
from tokenprune.benchmarks.sweep import load_config, plan_work, run_sweep
from tokenprune.cli import main

from tokenprune.benchmarks.report import MEASURED_COLUMNS as WALL_CLOCK  # wall clock and memory


def flags(pope_dir, out, batch_size=2, methods="fopru_rank,random,fastv"):
    return ["--model", "tiny-llava", "--tasks", "pope", "--data-dir", str(pope_dir), "--methods", methods,
            "--ratios", "0.5,0.25", "--limit", str(N_SAMPLES), "--batch-size", str(batch_size), "--output", str(out),
            "--bootstrap", "200", "--max-new-tokens", "3"]


def as_config(args: list[str]) -> dict:
    """``--batch-size 2`` flags -> ``{"batch_size": 2}`` (as the CLI parses them)."""
    ints = {"batch_size", "bootstrap", "max_new_tokens"}
    pairs = ((a[2:].replace("-", "_"), v) for a, v in zip(args[::2], args[1::2]))
    return {k: int(v) if k in ints else v for k, v in pairs}


def torchrun(nproc: int, *args, wait=True, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "tokenprune", "bench", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, stderr


def same_results(a: Path, b: Path) -> None:
    """Summaries equal but for wall clock; samples.jsonl: the same keys and answers, no duplicates."""
    strip = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]  # noqa: E731
    assert strip(read_summary(a / "summary.csv")) == strip(read_summary(b / "summary.csv"))
    ra, rb = results.read_rows(a / "samples.jsonl"), results.read_rows(b / "samples.jsonl")
    assert len({results.row_key(r) for r in rb}) == len(rb)  # nothing duplicated
    assert {results.row_key(r): r["prediction"] for r in ra} == {results.row_key(r): r["prediction"] for r in rb}
    assert set(ra[0]) == set(rb[0])


@pytest.fixture(scope="module")
def one_process(pope_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    run_sweep(load_config(None, as_config(flags(pope_dir, out))), log=lambda *_: None)
    return out


# -- units -----------------------------------------------------------------------------------------
def test_balanced_split_is_deterministic_and_even():
    assert balanced_split([1, 1, 1, 1, 1], 2) == [0, 1, 0, 1, 0]  # equal weights: round-robin
    # heaviest first to the lightest part: 5 -> p0; 4 -> p1; 3 -> p1 (4 < 5); 1, 1 -> p0 (5 < 7), p0 (6 < 7)
    assert balanced_split([1, 4, 5, 1, 3], 2) == [0, 1, 0, 0, 1]
    assert balanced_split([2, 2], 3) == [0, 1]


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/3", "0/0"])
def test_bad_shard_is_one_clear_error(text):
    with pytest.raises(TokenpruneError, match="--shard must be I/N"):
        Shard.parse(text)


def test_plan_covers_missing_work_once_under_any_split(pope_dir, tmp_path):
    """Shards take fixed items; ranks split what is missing; together every missing item exactly once."""
    cfg = load_config(None, as_config(flags(pope_dir, tmp_path / "x")))
    ids = {"pope": [str(i) for i in range(10)]}
    runs = [("none", 1.0)] + [(m, r) for m in cfg.methods for r in cfg.ratios]
    done = {("pope", m, r, sid) for m, r in runs for sid in ["0", "1", "2"]} | {("pope", "none", 1.0, "5")}
    for shards in (None, Shard(0, 2), Shard(1, 2)):
        plans = [plan_work(cfg, ids, done, Workers(rank=r, world=3, shard=shards)) for r in range(3)]
        mine = [sid for p in plans for sid in p.mine["pope"]]
        scope = [sid for i, sid in enumerate(ids["pope"]) if shards is None or shards.owns(i)]
        assert sorted(mine, key=int) == [s for s in scope if s not in {"0", "1", "2"}]  # each missing item once
        assert plans[0].total == len(scope) * len(runs)
        assert plans[0].done_in_scope == sum(k[3] in scope for k in done)
    assert [p.mine["pope"] for p in [plan_work(cfg, ids, done, Workers(rank=r, world=2)) for r in range(2)]] == \
        [["3", "5", "6", "8"], ["4", "7", "9"]]  # 3,4,6,7,8,9 (7 runs missing each) dealt in turn, then "5" (6)


def test_results_union_dedups_and_repairs_only_its_own_file(tmp_path):
    row = lambda sid, m="none": {"task": "t", "method": m, "ratio": 1.0, "sample_id": sid}  # noqa: E731
    (tmp_path / "samples.jsonl").write_text(json.dumps(row("1")) + "\n")
    (tmp_path / "samples.rank0.jsonl").write_text(json.dumps(row("1")) + "\n" + json.dumps(row("2")) + "\n" + '{"task": "t", "me')
    (tmp_path / "samples.shard1-of-2.jsonl").write_text(json.dumps(row("3")) + "\n" + json.dumps(row("4")))  # no newline yet
    rows = results.read_all(tmp_path, own=tmp_path / "samples.rank0.jsonl")
    assert [r["sample_id"] for r in rows] == ["1", "2", "3"]  # "4" is still being written: not a row yet
    assert (tmp_path / "samples.rank0.jsonl").read_text().endswith("}\n")  # own file repaired
    assert (tmp_path / "samples.shard1-of-2.jsonl").read_text().endswith('"4"}')  # another writer's: untouched
    merged, parts = results.merge(tmp_path, ["t"], [("none", 1.0)], remove_ranks=True)
    assert [r["sample_id"] for r in merged] == ["1", "2", "3"] and len(parts) == 2
    assert not (tmp_path / "samples.rank0.jsonl").exists() and (tmp_path / "samples.shard1-of-2.jsonl").exists()
    assert len(results.read_rows(tmp_path / "samples.jsonl")) == 3


def test_rank_0_waits_for_every_rank_and_reports_a_failed_one():
    store = HashStore()
    seen = []
    w0, w1 = Workers(rank=0, world=2, store=store), Workers(rank=1, world=2, store=store)
    w1.add_done(5)
    w1.wait_for_others(seen.append)  # rank 1: marks itself finished, does not wait
    w0.add_done(3)
    w0.wait_for_others(seen.append, poll_s=0)
    assert seen == [8]
    store2 = HashStore()
    w0, w1 = Workers(rank=0, world=2, store=store2), Workers(rank=1, world=2, store=store2)
    w1.report_failure("RuntimeError: CUDA out of memory")
    with pytest.raises(TokenpruneError, match="rank 1 of 2: RuntimeError: CUDA out of memory"):
        w0.wait_for_others(seen.append, poll_s=0)


def test_a_failing_rank_is_one_line_with_its_rank(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.chdir(tmp_path)
    import tokenprune.cli as cli

    def boom(args):
        raise RuntimeError("CUDA out of memory\nmore details")

    monkeypatch.setattr(cli, "cmd_list", boom)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), boom))
    assert main(["list"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokenprune: error (rank 1 of 2): RuntimeError: CUDA out of memory")
    assert "Traceback" in (tmp_path / "tokenprune-error-rank-1-of-2.log").read_text()


def _with_func(parser, func):
    parser._subparsers._group_actions[0].choices["list"].set_defaults(func=func)
    return parser


# -- real processes --------------------------------------------------------------------------------
def test_torchrun_two_ranks_equal_one_process(pope_dir, one_process, tmp_path):
    out = tmp_path / "two"
    stdout, stderr = torchrun(2, *flags(pope_dir, out))
    same_results(one_process, out)
    assert not list(out.glob("samples.rank*")) and (out / "report.md").exists()
    assert stdout.count("tokenprune bench:") == 1 and "2 ranks" in stdout  # rank 1 is quiet


def test_sigkill_a_rank_then_rerun_with_one_rank(pope_dir, one_process, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun(2, *flags(pope_dir, out, batch_size=1), wait=False)
    rank1 = out / "samples.rank1.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (rank1.exists() and rank1.read_text().count("\n") >= 8):
        time.sleep(0.02)
    victim = _rank_pid(proc.pid, 1)
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    partial = sum(len(results.read_rows(p, repair=False)) for p in results.part_files(out))
    total = N_SAMPLES * 7
    assert 8 <= partial < total, f"the kill came too late ({partial} rows)"

    stdout, _ = torchrun(1, *flags(pope_dir, out))
    assert f"{total} sample-runs, {partial} already in" in stdout
    same_results(one_process, out)
    assert not list(out.glob("samples.rank*"))


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker with ``RANK=rank`` (from /proc)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if f"RANK={rank}".encode() in env and _descends(ppid, launcher):
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank}")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return False


def test_shards_then_report_equal_one_process(pope_dir, one_process, tmp_path):
    out = tmp_path / "shards"
    for i in range(2):
        proc = subprocess.run([sys.executable, "-m", "tokenprune", "bench", *flags(pope_dir, out), "--shard", f"{i}/2"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"shard {i}/2 done" in proc.stdout and not (out / "summary.csv").exists()
    # results copied from two machines: each shard wrote its own file
    assert sorted(p.name for p in results.part_files(out)) == ["samples.shard0-of-2.jsonl", "samples.shard1-of-2.jsonl"]
    report = subprocess.run([sys.executable, "-m", "tokenprune", "report", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    assert "from samples.shard0-of-2.jsonl, samples.shard1-of-2.jsonl" in report.stdout
    same_results(one_process, out)
    # a third of the work missing: report says so
    half = tmp_path / "half"
    half.mkdir()
    for name in ("config.yaml", "samples.shard0-of-2.jsonl"):
        shutil.copy(out / name, half / name)
    assert main(["report", str(half)]) == 0
    assert len(read_summary(half / "summary.csv")) == 7


def test_report_on_a_folder_without_a_sweep_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a sweep's output folder" in capsys.readouterr().err


def test_a_methods_none_sweep_reloads(tmp_path):
    """`--methods none` stores an empty method list (the reference always runs); `tokenprune report` reads it back."""
    import yaml

    from tokenprune.benchmarks.sweep import load_sweep_config
    from tokenprune.benchmarks.sweep_config import method_runs

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"config": {"model": "tokenprune-demo", "tasks": ["pope"],
                                                                     "methods": [], "ratios": [0.5]}}))
    assert method_runs(load_sweep_config(tmp_path)) == [("none", 1.0)]
