"""Results files of a sweep, all recomputed from ``samples.jsonl``: ``summary.csv``, ``pareto.csv``,
``pareto_<task>.png``, ``report.md``, and (if asked) a Weights & Biases run.

A ratio-free method (``scissor``: its count chosen per sample, ``TokenPruner.uses_ratio`` false) is
one run per task: one row with an empty ``ratio`` cell in the CSVs (pandas reads NaN), ``adaptive``
in the tables, one marker labelled ``adaptive`` in the plots, at its measured TFLOPs and tokens kept.
"""
from __future__ import annotations

import csv
import json
import math
import netrc
import os
from collections import defaultdict
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from .categories import COLUMNS as CATEGORY_COLUMNS
from .categories import category_rows, category_section
from .difficult import add_difficult, difficult_section
from .results import ADAPTIVE, ratio_key, ratio_label
from .stats import bootstrap_ci, paired_test, pareto_front

SUMMARY_COLUMNS = [
    "model", "task", "method", "ratio", "n", "n_skipped", "score", "score_ci_low", "score_ci_high", "tflops",
    "tflops_paper", "tflops_vision", "flops_ratio", "prefill_ms", "latency_ms", "visual_tokens_in",
    "visual_tokens_kept", "visual_tokens_avg", "test_vs_none", "p_vs_none",
    # costs measured from outside the model (tokenprune.profiling); empty for rows an older tokenprune wrote
    "decode_ms_per_token", "pruner_ms", "kv_bytes", "cuda_peak_alloc_mb", "cpu_peak_rss_delta_mb",
    # the difficult subset (right unpruned, wrong by `downsample` at the matching ratio): see difficult.py
    "difficult_score", "difficult_ci_low", "difficult_ci_high", "n_difficult",
]

# Columns measured on the machine (wall clock, memory): they differ between two runs of the same sweep;
# every other column is a function of the samples' results.
MEASURED_COLUMNS = frozenset({"prefill_ms", "latency_ms", "decode_ms_per_token", "pruner_ms", "cuda_peak_alloc_mb",
                              "cpu_peak_rss_delta_mb"})


def _mean_of(rows: list[dict], key: str) -> float:
    """Mean of ``key`` over the rows that have a value for it (NaN if none: older rows, another device)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else math.nan


def _max_of(rows: list[dict], key: str) -> float:
    """Largest ``key`` over the rows that have one (a peak over the run's batches), NaN if none."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(max(values)) if values else math.nan


def _sample_metric(task, rows: list[dict]) -> str:
    """The per-sample score used for paired tests: the headline if per-sample, else the first key."""
    keys = list(rows[0]["scores"]) if rows else []
    return task.headline if task.headline in keys else (keys[0] if keys else task.headline)


def _aggregate(task, rows: list[dict]) -> dict[str, float]:
    from .tasks import Sample

    samples = [Sample(r["sample_id"], None, "", r["answers"], r["category"], r["extra"]) for r in rows]
    return task.aggregate([r["scores"] for r in rows], samples)


def summarise(cfg, tasks: dict, rows: list[dict], skipped: dict[str, int]) -> list[dict[str, Any]]:
    """One summary row per (task, method, ratio), in sweep order (ratio ``None``: a ratio-free method's one run)."""
    from .sweep_config import REFERENCE, method_runs

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"], ratio_key(r["ratio"]))].append(r)
    out = []
    for task_name, task in tasks.items():
        ref_rows = {r["sample_id"]: r for r in groups.get((task_name, REFERENCE, 1.0), [])}
        ref_flops = np.mean([r["tflops"] for r in ref_rows.values()]) if ref_rows else math.nan
        for method, ratio in method_runs(cfg):
            g = sorted(groups.get((task_name, method, ratio), []), key=lambda r: r["sample_id"])
            if not g:
                continue
            score = _aggregate(task, g).get(task.headline, math.nan)
            low, high = bootstrap_ci(len(g), lambda idx: _aggregate(task, [g[i] for i in idx]).get(task.headline, math.nan),
                                     n_resamples=cfg.bootstrap, seed=cfg.seed)
            test, p = "", math.nan
            if method != REFERENCE:
                metric = _sample_metric(task, g)
                paired = [(r["scores"][metric], ref_rows[r["sample_id"]]["scores"][metric]) for r in g if r["sample_id"] in ref_rows]
                if paired:
                    test, p = paired_test([a for a, _ in paired], [b for _, b in paired])
            mean = lambda key: float(np.mean([r[key] for r in g]))  # noqa: E731
            out.append({
                "model": cfg.model, "task": task_name, "method": method, "ratio": ratio, "n": len(g),
                "n_skipped": skipped.get(task_name, 0), "score": score, "score_ci_low": low, "score_ci_high": high,
                "tflops": mean("tflops"), "tflops_paper": mean("tflops_paper"), "tflops_vision": mean("tflops_vision"),
                "flops_ratio": mean("tflops") / ref_flops if ref_rows else math.nan,
                "prefill_ms": mean("prefill_ms"), "latency_ms": mean("latency_ms"),
                "visual_tokens_in": mean("visual_tokens_in"), "visual_tokens_kept": mean("visual_tokens_kept"),
                "visual_tokens_avg": mean("visual_tokens_avg") if all("visual_tokens_avg" in r for r in g) else math.nan,
                "test_vs_none": test, "p_vs_none": p,
                "decode_ms_per_token": _mean_of(g, "decode_ms_per_token"), "pruner_ms": _mean_of(g, "pruner_ms"),
                "kv_bytes": _mean_of(g, "kv_bytes"),
                "cuda_peak_alloc_mb": _max_of(g, "cuda_peak_alloc_mb"),
                "cpu_peak_rss_delta_mb": _max_of(g, "cpu_peak_rss_delta_mb"),
            })
    add_difficult(cfg, tasks, rows, out)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else str(v)


def _cell(row: dict[str, Any], column: str) -> str:
    """A table cell for people: a ratio-free run's ratio reads ``adaptive`` (in the CSVs: empty)."""
    if column == "ratio" and "ratio" in row and row["ratio"] is None:
        return ADAPTIVE
    return _fmt(row.get(column, ""))


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """``rows`` under ``columns``; ``None`` (a ratio-free run's ratio) is an empty cell."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in columns})


def pareto_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (task, method, ratio) point with ``on_front`` = not dominated in (TFLOPs down, score up)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in summary):
        pts = [r for r in summary if r["task"] == task]
        flags = pareto_front([(r["tflops"], r["score"]) for r in pts])
        out += [{"task": task, "method": r["method"], "ratio": r["ratio"], "tflops": r["tflops"], "score": r["score"],
                 "score_ci_low": r.get("score_ci_low", math.nan), "score_ci_high": r.get("score_ci_high", math.nan),
                 "visual_tokens_kept": r.get("visual_tokens_kept", math.nan),
                 "on_front": flag} for r, flag in zip(pts, flags)]
    return out


def _ci_bars(pts: list[dict[str, Any]]) -> np.ndarray:
    """``[2, n]`` distances from each score down to its CI's low end and up to its high end (0 if unknown)."""
    low = [p["score"] - p.get("score_ci_low", math.nan) for p in pts]
    high = [p.get("score_ci_high", math.nan) - p["score"] for p in pts]
    return np.nan_to_num(np.clip(np.array([low, high], dtype=float), 0, None))


def plot_pareto(path: Path, task: str, headline: str, points: list[dict[str, Any]]) -> None:
    """Accuracy vs TFLOPs: one line per method over its ratios with 95% CI error bars, a ratio-free
    method (ratio ``None``) as one diamond labelled ``adaptive`` with its mean tokens kept, the
    reference as a star, the front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for p in points:
        by_method[p["method"]].append(p)
    for method, pts in by_method.items():
        pts = sorted(pts, key=lambda p: p["tflops"])
        xs, ys = [p["tflops"] for p in pts], [p["score"] for p in pts]
        if method == "none":
            ax.errorbar(xs, ys, yerr=_ci_bars(pts), fmt="none", ecolor="black", capsize=3, zorder=3)
            ax.scatter(xs, ys, marker="*", s=180, color="black", zorder=4, label="none (unpruned)")
            continue
        if all(p["ratio"] is None for p in pts):  # one run, its count chosen per sample: a point, not a curve
            ax.errorbar(xs, ys, yerr=_ci_bars(pts), marker="D", markersize=7, linestyle="none", capsize=3,
                        label=f"{method} ({ADAPTIVE})")
            for p in pts:
                kept = p.get("visual_tokens_kept", math.nan)
                note = ADAPTIVE if kept is None or math.isnan(kept) else f"{ADAPTIVE}, {kept:.3g} tok"
                ax.annotate(note, (p["tflops"], p["score"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
            continue
        ax.errorbar(xs, ys, yerr=_ci_bars(pts), marker="o", capsize=3, label=method)
        for p in pts:
            ax.annotate(f"{p['ratio']:g}", (p["tflops"], p["score"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["tflops"])
    ax.step([p["tflops"] for p in front], [p["score"] for p in front], where="post", linestyle="--", color="grey",
            zorder=1, label="Pareto front")
    ax.scatter([p["tflops"] for p in front], [p["score"] for p in front], s=110, facecolors="none", edgecolors="black",
               zorder=5)
    ax.set_xlabel("TFLOPs per sample (vision + prefill + decode; 1 multiply-add = 2 FLOPs)")
    ax.set_ylabel(headline)
    either = f" or {ADAPTIVE}" if any(p["ratio"] is None for p in points) else ""  # adaptive: count chosen per sample
    ax.set_title(f"{task}: {headline} vs compute (labels: retention ratio{either}; bars: 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _pinned_note(cfg) -> str:
    """`` (fopru_rank:ratio=0.3 only at 0.3; scissor once, ...)``: the methods whose spec pins their
    ratio, and the ratio-free ones."""
    from .sweep_config import pinned_ratio, ratio_free

    pinned = [f"{m} run once, its count chosen per sample: ratio {ADAPTIVE}" if ratio_free(m) else f"{m} only at {pinned_ratio(m):g}"
              for m in cfg.methods if ratio_free(m) or pinned_ratio(m) is not None]
    return f" ({'; '.join(pinned)})" if pinned else ""


def paired_rows(cfg, tasks, rows: list[dict]) -> list[dict[str, Any]]:
    """Every two methods at the same ratio, per task (ratio-free methods among themselves, ratio
    ``None``): ``task, ratio, a, b, metric, diff, low, high, n, test, p`` -- the mean per-sample
    difference ``a - b`` with its paired bootstrap CI, and the paired test."""
    from .sweep_config import run_ratios

    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        groups[(r["task"], r["method"], ratio_key(r["ratio"]))][r["sample_id"]] = r
    out = []
    for task_name, task in tasks.items():
        for ratio in [*run_ratios(cfg), None]:  # pinned ratios (fopru_rank:ratio=0.3) too, then the ratio-free runs
            methods = [m for m in cfg.methods if (task_name, m, ratio) in groups]
            for i, a in enumerate(methods):
                for b in methods[i + 1:]:
                    ga, gb = groups[(task_name, a, ratio)], groups[(task_name, b, ratio)]
                    ids = sorted(set(ga) & set(gb))
                    if not ids:
                        continue
                    metric = _sample_metric(task, [ga[ids[0]]])
                    sa = np.array([float(ga[i]["scores"][metric]) for i in ids])
                    sb = np.array([float(gb[i]["scores"][metric]) for i in ids])
                    test, p = paired_test(sa.tolist(), sb.tolist())
                    diff, low, high = paired_difference(sa, sb, cfg.bootstrap, cfg.seed)
                    out.append({"task": task_name, "ratio": ratio, "a": a, "b": b, "metric": metric, "diff": diff,
                                "low": low, "high": high, "n": len(ids), "test": test, "p": p})
    return out


def between_methods(pairs: list[dict[str, Any]]) -> list[str]:
    """Markdown: :func:`paired_rows` as one table per task and ratio."""
    lines = []
    for (task_name, ratio), group in groupby(pairs, key=lambda d: (d["task"], d["ratio"])):
        group = list(group)
        where = f"ratio {ratio:g}" if ratio is not None else f"{ADAPTIVE} (count chosen per sample)"
        lines += [f"\n**{task_name}, {where}** (per-sample `{group[0]['metric']}`)\n",
                  "| method A | method B | A - B [95% CI] | n | test | p |", "|---|---|---|---|---|---|",
                  *(f"| {d['a']} | {d['b']} | {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {d['n']} | "
                    f"{d['test']} | {d['p']:.4g} |" for d in group)]
    if lines:
        lines.insert(0, "\nA - B: the mean per-sample difference on the samples both ran, with a 95% *paired* bootstrap "
                        "CI (the same samples resampled for both). Two methods whose own CIs overlap can still differ: "
                        "this interval, not the overlap, says whether they do.")
    return lines


def paired_text(pairs: list[dict[str, Any]], most: int = 6) -> str:
    """The paired differences as plain lines for the table a sweep prints, when there are at most
    ``most`` of them (else a pointer to report.md, where all are)."""
    if not pairs:
        return ""
    if len(pairs) > most:
        return f"\n{len(pairs)} paired differences between methods at the same ratio: report.md"
    lines = ["", "paired, same samples (A - B [95% bootstrap CI], test p):"]
    for d in pairs:
        where = f"r={d['ratio']:g}" if d["ratio"] is not None else ADAPTIVE
        lines.append(f"  {d['task']}  {where}  {d['a']} - {d['b']}  {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                     f"  {d['test']} p={d['p']:.2g}  n={d['n']}")
    return "\n".join(lines)


def paired_difference(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int) -> tuple[float, float, float]:
    """``(mean(a - b), low, high)``: the mean per-sample difference of two methods on the same samples
    (``a``, ``b`` ``[n]``, same order) and its 95% percentile bootstrap CI over samples (paired: one index
    draw for both)."""
    d = a - b
    low, high = bootstrap_ci(len(d), lambda idx: float(d[idx].mean()), n_resamples=n_resamples, seed=seed)
    return float(d.mean()), low, high


def write_reports(cfg, out: Path, tasks: dict, log=print, lvlm=None, gallery: bool = True) -> str:
    """Write every results file from the sweep's results files (see :mod:`.results`); returns the
    final table as text. Skipped samples come from ``skipped.json`` (written by the merge).

    ``gallery``: draw the samples each method flips (right unpruned, wrong pruned) into
    ``gallery/`` and the report; ``lvlm`` (the sweep's model, if loaded) gives the token geometry.
    """
    from .results import SKIPPED, read_all
    from .sweep_config import ratio_free_methods

    rows = [r for r in read_all(out, ratio_free=ratio_free_methods(cfg)) if r["task"] in tasks]
    skipped_path = out / SKIPPED
    skipped_ids: dict[str, list] = json.loads(skipped_path.read_text()) if skipped_path.exists() else {}
    skipped = {k: len(v) for k, v in skipped_ids.items()}

    summary = summarise(cfg, tasks, rows, skipped)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    front = pareto_rows(summary)
    write_csv(out / "pareto.csv", front, ["task", "method", "ratio", "tflops", "score", "on_front"])
    for task_name, task in tasks.items():
        pts = [p for p in front if p["task"] == task_name]
        if pts:
            plot_pareto(out / f"pareto_{task_name}.png", task_name, task.headline, pts)

    shown = ["task", "method", "ratio", "n", "score", "score_ci_low", "score_ci_high", "tflops", "flops_ratio",
             "prefill_ms", "visual_tokens_kept", "visual_tokens_avg", "p_vs_none"]
    report = [
        f"# tokenprune bench: {cfg.model}", "",
        f"Tasks: {', '.join(cfg.tasks)}. Methods: {', '.join(cfg.methods)} (+ `none`, the unpruned reference). "
        f"Ratios: {', '.join(f'{r:g}' for r in cfg.ratios)}{_pinned_note(cfg)}. Seed {cfg.seed}. Resolved config, versions and git "
        "commit: `config.yaml`.", "",
        "Scores: the task's headline metric; CI: 95% percentile bootstrap over samples "
        f"({cfg.bootstrap} resamples). TFLOPs: mean per sample, vision + LLM prefill + decode + LM head, "
        "1 multiply-add = 2 FLOPs (`tflops_paper` in summary.csv: the papers' LLM-prefill convention). "
        "Times: wall clock per sample (batch time / batch size), warm-up excluded. "
        "p_vs_none: paired test against the unpruned model on the same samples (exact McNemar for 0/1 scores, "
        "Wilcoxon signed-rank for graded ones).", "",
        _md_table(summary, shown), "",
    ]
    for task_name in tasks:
        n_skip = skipped.get(task_name, 0)
        report.append(f"## {task_name}\n")
        if n_skip:
            report.append(f"{n_skip} sample(s) skipped (missing or undecodable image; ids in `skipped.json`); "
                          "scores are over the samples evaluated.\n")
        on_front = [p for p in front if p["task"] == task_name and p["on_front"]]
        report.append("Pareto front (TFLOPs down, score up): " +
                      ", ".join(f"{p['method']}@{ratio_label(p['ratio'])} ({p['tflops']:.4g} TFLOPs, {p['score']:.4g})"
                                for p in sorted(on_front, key=lambda p: p["tflops"])) + "\n")
        report.append(f"![{task_name}](pareto_{task_name}.png)\n")
    pairs = paired_rows(cfg, tasks, rows)
    report += ["## Paired tests between methods at the same ratio", *between_methods(pairs), ""]
    by_category = category_rows(cfg, tasks, rows, _aggregate)
    if by_category:
        write_csv(out / "by_category.csv", by_category, CATEGORY_COLUMNS)
    report += category_section(by_category)
    report += costs_section(summary, rows)
    report += difficult_section(cfg, tasks, summary, rows)
    stability = out / "stability.csv"
    if stability.exists():  # `tokenprune stability --output DIR` on this sweep's folder
        from ..stability import stability_section

        report += stability_section(stability)
    pngs: list[Path] = []
    if gallery:
        from ..errors import TokenpruneError
        from ..visualize.gallery import write_galleries

        report.append("## Flipped samples\n\nPer task and ratio, up to three samples the unpruned model answers "
                      "right and a method wrong, each drawn with what every method kept (bright: kept, dim: "
                      "dropped, half: merged).\n")
        # the gallery is laid out by ratio: a ratio-free run (no ratio) is not drawn in it
        by_ratio = [r for r in rows if r["ratio"] is not None]
        if len(by_ratio) < len(rows):
            report.append(f"Ratio-free runs ({', '.join(ratio_free_methods(cfg))}) are not drawn here; "
                          "`tokenprune show --run DIR --sample ID` redraws any sample with what they kept.\n")
        try:
            lines, pngs = write_galleries(cfg, out, tasks, by_ratio, _sample_metric, lvlm=lvlm)
            report += lines or ["No sample was flipped."]
        except TokenpruneError as exc:  # the tables above stand; say why the pictures are missing
            report.append(f"(no gallery: {exc})")
    (out / "report.md").write_text("\n".join(report))

    if cfg.wandb_project:
        log_wandb(cfg, out, summary, front, tasks, pngs)
    table = _text_table(summary, shown)
    return f"\n{table}\n{paired_text(pairs)}\n\nresults: {out}/summary.csv, pareto.csv, report.md, pareto_<task>.png, samples.jsonl"


def _kv_groups_text(rows: list[dict]) -> str:
    """The run's KV cache per layer group, averaged over its samples: ``0-1: 612 tok, 1.2 MB; ...``
    (groups as the first sample's; tokens and bytes are means over the samples with the same groups)."""
    groups = [r["kv_groups"] for r in rows if r.get("kv_groups")]
    if not groups:
        return ""
    shape = [(g[0], g[1]) for g in groups[0]]
    same = [gs for gs in groups if [(g[0], g[1]) for g in gs] == shape]
    parts = []
    for j, (first, last) in enumerate(shape):
        tok = np.mean([gs[j][2] for gs in same])
        mb = np.mean([gs[j][3] for gs in same]) / 2**20
        parts.append(f"{first}" + (f"-{last}" if last != first else "") + f": {tok:.4g} tok, {mb:.3g} MiB")
    note = f" ({len(same)} of {len(groups)} samples)" if len(same) < len(groups) else ""
    return "; ".join(parts) + note


def costs_section(summary: list[dict[str, Any]], rows: list[dict]) -> list[str]:
    """Markdown: per run, the measured costs (prefill, per-token decode, the pruner's own time, the KV
    cache at the end of prefill per layer group, peak memory named by what it is)."""
    if not any(not math.isnan(r.get("kv_bytes", math.nan)) or not math.isnan(r.get("pruner_ms", math.nan))
               for r in summary):
        return []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"], ratio_key(r["ratio"]))].append(r)
    cuda = any(not math.isnan(r.get("cuda_peak_alloc_mb", math.nan)) for r in summary)
    peak_col = "peak CUDA allocated (MiB)" if cuda else "peak RSS increase (MiB, CPU)"
    peak_key = "cuda_peak_alloc_mb" if cuda else "cpu_peak_rss_delta_mb"
    lines = [
        "## Costs\n",
        "Per sample, mean over the run's samples; times are wall clock per sample (batch time / batch size), "
        "warm-up excluded, CUDA-synchronised at their boundaries on a GPU. `prefill_ms`: the LLM's prefill and "
        "first logits (in-LLM pruning included; a pre-LLM pruner's selection is placed before it); "
        "`decode_ms_per_token`: one decode step of the batch / batch size; `pruner_ms`: time inside the "
        "pruner's own calls (scoring and selection; the forwards whose attention it reads are the model's). "
        "KV cache: bytes the layers' caches hold for the sample's real tokens at the end of prefill, read from "
        "the cache tensors (padding of a batch not counted; a decode plan's later cut not included), per "
        "layer group. Peak memory: "
        + ("CUDA's `max_memory_allocated` over the LLM part of a batch (weights included), the largest batch."
           if cuda else "on CPU, the process's peak resident set over the LLM part of a batch minus its resident "
           "set at the start (Linux VmHWM, reset per batch), the largest batch: what the batch needed beyond "
           "what the process held; not comparable with CUDA's allocated figure.") + "\n",
        f"| task | method | ratio | prefill_ms | decode_ms_per_token | pruner_ms | KV cache (MiB) | {peak_col} "
        "| KV per layer group |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        kv = r.get("kv_bytes", math.nan)
        lines.append(f"| {r['task']} | {r['method']} | {_cell(r, 'ratio')} | {_fmt(r['prefill_ms'])} | "
                     f"{_fmt(r.get('decode_ms_per_token', math.nan))} | {_fmt(r.get('pruner_ms', math.nan))} | "
                     f"{_fmt(kv / 2**20 if not math.isnan(kv) else kv)} | {_fmt(r.get(peak_key, math.nan))} | "
                     f"{_kv_groups_text(groups[(r['task'], r['method'], ratio_key(r['ratio']))])} |")
    return [*lines, ""]


def _text_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def wandb_mode(requested: str | None) -> str:
    """``requested``, else ``online`` if an API key is configured, else ``offline``."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def log_wandb(cfg, out: Path, summary: list[dict], front: list[dict], tasks: dict, gallery: list[Path] = ()) -> None:
    """One W&B run per sweep: config, the summary table, accuracy-vs-TFLOPs per task, the PNGs
    (Pareto plots and the flipped-sample gallery)."""
    import wandb
    import yaml

    from .sweep_config import provenance

    mode = wandb_mode(cfg.wandb_mode)
    if mode == "disabled":
        return
    run = wandb.init(project=cfg.wandb_project, mode=mode, dir=str(out), config=provenance(cfg),
                     name=f"{Path(cfg.model).name}-{'-'.join(cfg.tasks)}", reinit=True)
    try:
        table = wandb.Table(columns=SUMMARY_COLUMNS, data=[[r[c] for c in SUMMARY_COLUMNS] for r in summary])
        payload: dict[str, Any] = {"summary": table}
        for task_name, task in tasks.items():
            pts = [p for p in front if p["task"] == task_name]
            methods = list(dict.fromkeys(p["method"] for p in pts))
            xs = [[p["tflops"] for p in sorted(pts, key=lambda p: p["tflops"]) if p["method"] == m] for m in methods]
            ys = [[p["score"] for p in sorted(pts, key=lambda p: p["tflops"]) if p["method"] == m] for m in methods]
            payload[f"{task_name}/accuracy_vs_tflops"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=methods, title=f"{task_name}: {task.headline} vs TFLOPs", xname="TFLOPs")
            png = out / f"pareto_{task_name}.png"
            if png.exists():
                payload[f"{task_name}/pareto"] = wandb.Image(str(png))
            flipped = [wandb.Image(str(p), caption=p.stem) for p in gallery if p.name.startswith(f"{task_name}_r")]
            if flipped:
                payload[f"{task_name}/flipped"] = flipped
        run.log(payload)
        (out / "wandb_run.yaml").write_text(yaml.safe_dump({"mode": mode, "id": run.id, "dir": str(run.dir)}))
    finally:
        run.finish()
