"""``tokenprune bench``: a model x task x method x ratio sweep, resumable and loss-free.

Every sample's result is appended to ``samples.jsonl`` and flushed to disk as soon as its batch
is done; a rerun of the same command skips what is there (a line cut by a crash is dropped), so
an interrupted sweep resumes where it stopped. The output directory's ``config.yaml`` pins the
sweep: a different sweep in the same directory is refused instead of mixing results. The tables,
plots and report are recomputed from ``samples.jsonl`` at the end of every run.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from collections import defaultdict
from typing import Any, Iterable, Iterator

import yaml
from PIL import Image

from ..errors import TokenpruneError
from .distributed import Shard, Workers
from .results import ADAPTIVE, ratio_key, read_rows, row_key  # noqa: F401 -- re-exported: the results-file API users know
from ..visualize.record import record_kept, view_sizes
from . import results

from .sweep_config import (  # noqa: F401 -- re-exported: the sweep API users and tests import from here
    DEFAULT_MODEL,
    DEFAULT_LIMIT,
    REFERENCE,
    IDENTITY,
    SweepConfig,
    FIELDS,
    _as_list,
    split_methods,
    normalise,
    _spec_from_mapping,
    CONFIG_DIR,
    resolve_config_path,
    load_config,
    _refuse_task_option_clash,
    provenance,
    check_output_dir,
    method_runs,
    method_ratios,
    run_ratios,
    ratio_free_methods,
    ratio_free,
    _ratio_free,
    pinned_ratio,
    split_policy,
    make_pruner,
    run_policy,
    _data_dir,
)


def batches_from(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter) from any iterable, lazily."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _jsonable(extra: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in extra.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def _load_model(cfg: SweepConfig, workers: Workers):
    """The model on this rank's device, or spread over its GPUs (``device_map``)."""
    import torch

    from ..adapters import load as load_model

    kwargs: dict[str, Any] = {}
    if cfg.dtype != "auto":
        kwargs["dtype"] = getattr(torch, cfg.dtype)
    if cfg.device_map is None:
        lvlm = load_model(cfg.model, **kwargs)
        lvlm.model.to(workers.device(cfg.device))
        return lvlm
    kwargs["device_map"] = cfg.device_map
    gpus = workers.gpu_group()
    if gpus and workers.distributed and isinstance(cfg.device_map, str):
        from accelerate.utils import get_max_memory

        available = get_max_memory()  # this rank's GPUs, and the CPU for whatever does not fit
        kwargs["max_memory"] = {k: v for k, v in available.items() if k in gpus or not isinstance(k, int)}
    return load_model(cfg.model, **kwargs)


@dataclass
class _Work:
    """This process's share of a sweep: the samples it computes per task, and what is done."""

    mine: dict[str, list[str]]  # task -> sample ids, in data order
    done: set[tuple]  # row keys already on disk (any writer)
    total: int  # sample-runs in this run's scope (the whole sweep, or the shard)
    done_in_scope: int


def plan_work(cfg: SweepConfig, ids: dict[str, list[str]], done: set[tuple], workers: Workers) -> _Work:
    """Split the missing work: ``--shard`` takes every N-th (task, sample) item of the fixed order
    (no coordination needed); torchrun ranks split what is *missing* of that, balanced by missing
    runs (so a rerun under any world size computes only what is missing, and evenly)."""
    runs = method_runs(cfg)
    items, weights, total, done_in_scope = [], [], 0, 0
    position = 0
    for task, task_ids in ids.items():
        for sid in task_ids:
            position += 1
            if workers.shard is not None and not workers.shard.owns(position - 1):
                continue
            missing = sum((task, m, ratio_key(r), sid) not in done for m, r in runs)
            total += len(runs)
            done_in_scope += len(runs) - missing
            if missing:
                items.append((task, sid))
                weights.append(missing)
    mine: dict[str, list[str]] = {task: [] for task in ids}
    for task, sid in workers.split(items, weights):
        mine[task].append(sid)
    return _Work(mine, done, total, done_in_scope)


def run_sweep(cfg: SweepConfig, log=print) -> Path:
    """Run (or resume) the sweep; returns the output directory with every result file in it.

    Under ``torchrun`` / ``accelerate launch`` each rank computes its share and rank 0 writes the
    results files once every rank is done; with ``cfg.shard`` only that shard is computed (the
    results files come from ``tokenprune report``).
    """
    workers = Workers.start(Shard.parse(cfg.shard))
    try:
        return _run(cfg, workers, log if workers.is_main else (lambda *_: None))
    except BaseException as exc:
        workers.report_failure(f"{type(exc).__name__}: {exc}" if not isinstance(exc, TokenpruneError) else str(exc))
        raise
    finally:
        workers.close()


def _run(cfg: SweepConfig, workers: Workers, log) -> Path:
    from tqdm import tqdm

    from .. import cost
    from ..adapters.devices import model_devices
    from ..profiling import kv_probe, peak_memory, time_pruner
    from .report import write_reports
    from .tasks import get_task

    out = Path(cfg.output)
    check_output_dir(cfg, out, write=False)
    suffix = results.part_suffix(workers.rank, workers.world, (workers.shard.index, workers.shard.count) if workers.shard else None)
    own = results.samples_path(out, suffix)
    adaptive = ratio_free_methods(cfg)
    previous = results.read_all(out, own=own, ratio_free=adaptive)
    by_run: dict[tuple, list[dict]] = defaultdict(list)  # rows per (task, method, ratio), for the one-liners
    for r in previous:
        by_run[(r["task"], r["method"], ratio_key(r["ratio"]))].append(r)

    tasks = {name: get_task(name, **cfg.task_options.get(name, {})) for name in cfg.tasks}
    data = {name: task.load(data_dir=_data_dir(cfg, name), limit=cfg.limit, seed=cfg.seed if cfg.limit else None)
            for name, task in tasks.items()}
    work = plan_work(cfg, {name: d.ids() for name, d in data.items()}, {row_key(r) for r in previous}, workers)
    workers.barrier()  # every rank has read the results before any rank writes
    if workers.is_main:
        check_output_dir(cfg, out)
    runs = method_runs(cfg)
    scope = f" ({workers.describe()})" if workers.shard is not None else ""
    log(f"tokenprune bench: {cfg.model}{'' if cfg.dtype == 'auto' else f' in {cfg.dtype}'} | tasks {', '.join(cfg.tasks)} | {len(runs)} method x ratio runs | "
        f"{work.total} sample-runs{scope}, {work.done_in_scope} already in {out}"
        + (f" | {workers.world} ranks" if workers.distributed else ""))
    if cfg.limit is not None:
        log(f"  a seeded subset of {cfg.limit} samples per task (seed {cfg.seed}); --limit all for whole splits")
    for spec in adaptive:
        log(f"  {spec}: count chosen per sample, ratio has no meaning; run once")

    done = work.done
    skipped: dict[str, list] = {}
    with tqdm(total=work.total, initial=work.done_in_scope, desc="bench", unit="sample", dynamic_ncols=True,
              disable=not workers.is_main) as bar:
        def show(all_ranks_done: int) -> None:  # rank 0's bar counts every rank's rows
            target = work.done_in_scope + all_ranks_done
            if target > bar.n:
                bar.update(target - bar.n)

        lvlm = None
        if any(work.mine.values()):
            lvlm = _load_model(cfg, workers)
            spec = lvlm.vision_spec()
            sync = lvlm._synchronizer()  # CUDA: wait at the pruner's timing boundaries; elsewhere a no-op
            devices = model_devices(lvlm.model)  # where peak memory is read (CUDA: each GPU of the model)
            warmed = False
            with own.open("a") as sink:
                for task_name, task in tasks.items():
                    mine = work.mine[task_name]
                    if not mine:
                        continue
                    new_tokens = cfg.max_new_tokens or task.max_new_tokens
                    finished = {run: {k[3] for k in done if k[:3] == (task_name, *run)} for run in runs}
                    pending = [run for run in runs if any(sid not in finished[run] for sid in mine)]
                    pruners = {run: make_pruner(*run, seed=cfg.seed) for run in pending}
                    # Runs whose pruners need the same vision pass share it: in-LLM pruners and the
                    # unpruned model need none of the vision attention, FoPru variants one layer's.
                    groups: dict[Any, list[tuple[str, float]]] = defaultdict(list)
                    for run in pending:
                        groups[lvlm.vision_needs(pruners[run])].append(run)
                    # Batch-major: each batch of samples is encoded once per group, then run through
                    # every pending (method, ratio); samples every pending run has are skipped.
                    todo = data[task_name].samples(only=set(mine))
                    for chunk in batches_from(todo, cfg.batch_size):
                        chunk = _fitting(lvlm, chunk, task, data[task_name].skipped)
                        if not chunk:
                            continue
                        images, prompts, ids = [s.image for s in chunk], [task.prompt(s) for s in chunk], [s.id for s in chunk]
                        if not warmed:  # warm-up (allocations, kernels): not timed, not recorded
                            lvlm.generate(images[:1], prompts[:1], pruner=pruners[pending[0]], max_new_tokens=2,
                                          sample_ids=ids[:1])
                            warmed = True
                        n_new = 0
                        for needs, group in groups.items():
                            encoded = None
                            for run in group:
                                missing = [i for i, s in enumerate(chunk) if s.id not in finished[run]]
                                if not missing:
                                    continue
                                # measured from outside: the pruner's own calls (in-vision ones run in the
                                # encode), the KV cache each layer wrote at prefill, peak memory of the LLM part
                                with record_kept(pruners[run]) as kept, time_pruner(pruners[run], sync) as own_time:
                                    encoded = encoded or lvlm.encode(images, prompts, needs)
                                    with peak_memory(devices) as peak, kv_probe(lvlm.runner.layers) as kv:
                                        gen = lvlm.generate(images, prompts, pruner=pruners[run], max_new_tokens=new_tokens,
                                                            position_policy=run_policy(cfg, run[0]), sample_ids=ids,
                                                            encoded=encoded)
                                measured = _Measured(own_time, kv, peak)
                                for i in missing:  # a resumed batch may be partly done for this run
                                    row = _row(cfg, task, task_name, run, chunk[i], gen, i, len(chunk), lvlm, spec, cost,
                                               measured)
                                    row["kept"] = _kept_json(kept, chunk[i].id, view_sizes(encoded.views, i))
                                    sink.write(json.dumps(row) + "\n")
                                    by_run[(task_name, *run)].append(row)
                                    finished[run].add(chunk[i].id)
                                sink.flush()
                                os.fsync(sink.fileno())  # on disk before the next batch: a crash loses at most one batch
                                n_new += len(missing)
                        if workers.distributed:
                            if (line := workers.failed()) is not None:
                                raise TokenpruneError(f"stopping: {line}")
                            show(workers.add_done(n_new))
                        else:
                            bar.update(n_new)
                    if not workers.distributed and workers.shard is None:
                        for run in pending:
                            bar.write(_one_line(task, task_name, run[0], run[1], by_run[(task_name, *run)]))
                    if data[task_name].skipped:
                        skipped[task_name] = data[task_name].skipped
                        bar.write(data[task_name].report())
        if skipped:
            results.write_skipped(results.skipped_path(out, suffix), skipped)
        workers.wait_for_others(show)
    if not workers.is_main:
        return out
    if workers.shard is not None and workers.shard.count > 1:
        log(f"{workers.describe()} done: its rows are in {out}/samples.{results.part_suffix(0, 1, (workers.shard.index, workers.shard.count))}*.jsonl; "
            f"when every shard is done, `tokenprune report {out}` writes the results files")
        return out
    results.merge(out, cfg.tasks, runs, remove_ranks=True)
    summary = write_reports(cfg, out, tasks, log=log, lvlm=lvlm)
    log(summary)
    return out


def _kept_json(recorder, sample_id: str, views: list[int]) -> dict | None:
    """What the run kept of the sample's visual tokens, per view (compact bitmasks; ``None``: everything)."""
    if recorder is None:
        return None
    try:
        return recorder.kept(sample_id, views).to_json()
    except KeyError:  # the pruner never ran on it (no visual tokens)
        return None


@dataclass
class _Measured:
    """What :mod:`tokenprune.profiling` measured around one run's batch: ``PrunerTime``, ``KVCache``,
    ``PeakMemory``."""

    pruner: Any
    kv: Any
    peak: Any


def _row(cfg, task, task_name, run, sample, gen, i, batch, lvlm, spec, cost, measured: _Measured | None = None) -> dict[str, Any]:
    """One line of ``samples.jsonl``: the sample's answer, scores, token counts, FLOPs, times and memory."""
    text, st, t = task.cut(gen.texts[i]), gen.stats[i], gen.timings
    c = cost.sample_cost(lvlm.model.config, spec, st)
    # decode forwards of the batch: its longest answer's tokens after the first (which prefill's logits give)
    steps = max(s.new_tokens for s in gen.stats) - 1
    m = measured
    return {
        "model": cfg.model, "task": task_name, "method": run[0], "ratio": run[1],
        "sample_id": sample.id, "prediction": text, "answers": sample.answers[:10], "scores": task.score(text, sample),
        "category": sample.category, "extra": _jsonable(sample.extra),
        "visual_tokens_in": st.visual_tokens_in, "visual_tokens_kept": st.visual_tokens_kept,
        "visual_tokens_avg": st.visual_tokens_avg,
        "text_tokens": st.text_tokens, "prefill_tokens": sum(st.tokens_per_layer),
        "new_tokens": st.new_tokens, "tflops": c.total / 1e12, "tflops_vision": c.vision / 1e12,
        "tflops_prefill": c.prefill / 1e12, "tflops_decode": (c.decode + c.lm_head) / 1e12,
        "tflops_paper": c.paper / 1e12,
        # per-sample share of the batch's wall clock; the vision pass is counted in full for
        # every run that uses it (its real cost per run)
        "prefill_ms": 1e3 * t["prefill"] / batch,
        "latency_ms": 1e3 * (t["vision"] + t["llm"]) / batch,
        # per-sample share of one decode step of the batch (the batch's step latency is `batch` times it)
        "decode_ms_per_token": 1e3 * t["decode"] / steps / batch if steps > 0 and "decode" in t else None,
        "batch": batch,
        "pruner_ms": 1e3 * m.pruner.seconds / batch if m is not None else None,
        "kv_bytes": m.kv.bytes(i) if m is not None and m.kv.tokens else None,
        "kv_groups": m.kv.groups(i) if m is not None and m.kv.tokens else None,
        # the batch's peak (shared by its rows): CUDA's absolute peak allocated, or on CPU the peak RSS increase
        "cuda_peak_alloc_mb": m.peak.cuda_mb if m is not None else None,
        "cpu_peak_rss_delta_mb": m.peak.cpu_rss_delta_mb if m is not None else None,
    }


def _one_line(task, task_name: str, method: str, ratio: float | None, rows: list[dict]) -> str:
    from .tasks import Sample

    samples = [Sample(r["sample_id"], None, "", r["answers"], r["category"], r["extra"]) for r in rows]
    value = task.aggregate([r["scores"] for r in rows], samples).get(task.headline, math.nan) if rows else math.nan
    tflops = sum(r["tflops"] for r in rows) / max(len(rows), 1)
    kept = sum(r["visual_tokens_kept"] for r in rows) / max(len(rows), 1)
    return (f"  {task_name:<14} {method:<20} r={(ADAPTIVE if ratio is None else ratio):<5} {task.headline}={value:.4f}  "
            f"TFLOPs={tflops:.4g}  visual tokens kept={kept:.1f}  n={len(rows)}")



def _fitting(lvlm, chunk: list, task, skipped: list) -> list:
    """The samples of ``chunk`` whose prompt fits the model's context; the others are recorded in
    ``skipped`` (with the one-line reason) and left out, so one over-long video costs only itself.
    Only batches with videos or several images per sample are checked (a processor pass each)."""
    from ..errors import ContextOverflowError
    from .tasks.base import Skipped

    if all(isinstance(s.image, Image.Image) for s in chunk):
        return chunk
    try:
        lvlm.check_context(lvlm.prepare([s.image for s in chunk], [task.prompt(s) for s in chunk]))
    except ContextOverflowError as err:
        limit = lvlm.context_length()
        for i in err.rows:
            skipped.append(Skipped(chunk[i].id, f"longer than the model's context of {limit} tokens: {err}"))
        return [s for i, s in enumerate(chunk) if i not in set(err.rows)]
    return chunk


def load_sweep_config(run_dir: str | Path) -> SweepConfig:
    """The :class:`SweepConfig` a finished or interrupted sweep stored in ``run_dir/config.yaml``
    (its ``output`` pointed at ``run_dir``, wherever the folder has been moved since)."""
    out = Path(run_dir)
    path = out / "config.yaml"
    if not path.exists():
        raise TokenpruneError(f"{out} is not a sweep's output folder (no config.yaml); give the --output of a "
                              "`tokenprune bench` run")
    try:
        stored = (yaml.safe_load(path.read_text()) or {}).get("config", {})
        if stored.get("methods") == []:  # a `--methods none` sweep: the resolved list drops the reference
            stored["methods"] = [REFERENCE]
        cfg = normalise(SweepConfig(**{k: v for k, v in stored.items() if k in FIELDS}))
    except (yaml.YAMLError, TypeError) as exc:
        raise TokenpruneError(f"{path} is not a readable sweep config ({exc}); rerun the sweep to rewrite it") from None
    cfg.output = str(out)
    return cfg


def rebuild_reports(run_dir: str | Path, log=lambda *_: None) -> str:
    """``tokenprune report``: fold every results file of ``run_dir`` (shards, ranks, copied from
    other machines) into ``samples.jsonl`` and rewrite summary, Pareto, report and W&B from it.

    Shard files are kept (a shard may still be running); the sweep is read from ``config.yaml``.
    Returns the summary table, preceded by what was merged.
    """
    from .report import write_reports
    from .tasks import get_task

    out = Path(run_dir)
    cfg = load_sweep_config(out)
    tasks = {name: get_task(name, **cfg.task_options.get(name, {})) for name in cfg.tasks}
    rows, parts = results.merge(out, cfg.tasks, method_runs(cfg), remove_ranks=False)
    counts = defaultdict(int)
    for r in rows:
        counts[(r["task"], r["method"], ratio_key(r["ratio"]))] += 1
    merged = ", ".join(p.name for p in parts) or "samples.jsonl only"
    head = [f"tokenprune report: {len(rows)} sample-runs from {merged}"]
    for task in cfg.tasks:
        n = [counts[(task, m, r)] for m, r in method_runs(cfg)]
        if len(set(n)) > 1 or not n[0]:
            head.append(f"  {task}: runs have {min(n)}..{max(n)} samples: some shards are missing or unfinished "
                        "(their rows are what the tables cover)")
    return "\n".join(head) + "\n" + write_reports(cfg, out, tasks, log=log)
