"""``tokenprune stability``: how much a method's kept set moves under a perturbation that should not matter.

On flat-background images near-ties decide which tokens a score-ranking method keeps, so numerics
that differ by about 1e-5 (HF's eager against SDPA attention) can change the choice. Per method and
ratio this runs the prefill (``generate`` with one new token: the pruner, the LLM's prefill, no
decoding; for a method that chooses before the LLM, only the vision pass and the adapter's placing of
the pruned sequence, whose kept set the LLM cannot change; for an in-LLM method, the layers up to its last
prune point) on a task's samples as configured, then again under each perturbation, and reports the
Jaccard overlap ``|A & B| / |A | B|`` of the kept sets (the tokens kept through the method's last
prune point; merged-away tokens are not kept; two empty sets overlap fully), averaged over samples,
with a 95% bootstrap CI and the share of samples whose set did not change at all.

Perturbations (each against the run as configured):

* ``attention``: every attention module of the model (vision tower and LLM) switched between eager and
  SDPA (to whichever the model does not use); the LLM's eager gets its mask in eager's additive format
  (:func:`_eager_with_boolean_mask`). The attention rows a pruner reads are computed by tokenprune's
  recorder the same way under both: what moves is every layer's output that feeds them.
* ``dtype``: the model loaded a second time in bfloat16 (float32 if it runs in bfloat16), same inputs.
* ``noise``: seeded Gaussian noise, ``1e-5`` times each tensor's RMS, on every floating tensor the
  vision pass hands on (visual tokens, and the vision attention, features, keys and queries a pruner
  reads), seeded per batch by its sample ids. In-vision pruners (ToMe, FlowCut) choose inside the
  tower, before those tensors: the noise cannot reach their choice and their row says ``n/a``.

``feature_drift`` in the output: the relative RMS difference ``||a - b|| / ||a||`` of the visual tokens
the unpruned vision pass produced with and without the perturbation: how large a perturbation it was.
"""
from __future__ import annotations

import contextlib
import csv
import math
import zlib
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import OptionError

PERTURBATIONS = ("attention", "dtype", "noise")
NOISE = 1e-5
COLUMNS = ["model", "task", "method", "ratio", "perturbation", "n", "mean_jaccard", "ci_low", "ci_high",
           "identical", "min_jaccard", "feature_drift", "note"]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """``|A & B| / |A | B|`` of two boolean masks over the same tokens; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        return 0.0  # a different token count: nothing is comparable token by token
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _attn_impl(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


EAGER_BOOL = "tokenprune_eager_bool_mask"


def _eager_with_boolean_mask(module, query, key, value, attention_mask, *args, **kwargs):
    """The modeling file's own ``eager_attention_forward``, given the additive mask eager expects.

    tokenprune's decoder hands every layer a 4-D *boolean* mask (SDPA's format); Hugging Face's eager
    function adds the mask to the scores, so a boolean one would add 0 / 1 and mask nothing. Here it becomes
    ``0`` where attended and the dtype's minimum elsewhere, as Hugging Face's own mask builder makes it for eager.
    """
    import sys

    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask.to(query.device), torch.finfo(query.dtype).min)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return eager(module, query, key, value, attention_mask, *args, **kwargs)


def _register_eager() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(EAGER_BOOL, _eager_with_boolean_mask)


@contextlib.contextmanager
def attention_swapped(lvlm) -> Iterator[str]:
    """Every attention module of ``lvlm.model`` on the other implementation (eager <-> SDPA) inside the
    block; yields the one in force. The LLM's eager is :func:`_eager_with_boolean_mask` (the modeling file's
    eager function with the mask in eager's additive format: tokenprune's decoder passes boolean masks)."""
    configs = [m.config for m in lvlm.model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    configs = list({id(c): c for c in configs}.values())
    text = {id(m.config) for m in lvlm.runner.model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    old = [c._attn_implementation for c in configs]
    other = "sdpa" if _attn_impl(lvlm.model) == "eager" else "eager"
    if other == "eager":
        _register_eager()
    for c in configs:
        c._attn_implementation = EAGER_BOOL if other == "eager" and id(c) in text else other
    try:
        yield other
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o


def _noisy(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``x + 1e-5 * rms(x) * N(0, 1)`` (noise drawn on the CPU from ``gen``: the same on any device)."""
    rms = x.float().pow(2).mean().sqrt()
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float32)
    return (x.float() + NOISE * rms * eps.to(x.device)).to(x.dtype)


@contextlib.contextmanager
def feature_noise(lvlm, seed: int) -> Iterator[None]:
    """``lvlm.encode_images`` returning views whose floating tensors carry the seeded noise (see the
    module docstring); the batch's sample ids are read from ``lvlm._stability_ids``."""
    encode_images = lvlm.encode_images

    def noisy(batch, needs):
        views = encode_images(batch, needs)
        ids = getattr(lvlm, "_stability_ids", ())
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32("|".join(ids).encode()))
        out = []
        for v in views:
            moved = {f.name: _noisy(getattr(v, f.name), gen) for f in fields(v)
                     if torch.is_tensor(getattr(v, f.name)) and getattr(v, f.name).is_floating_point()}
            out.append(replace(v, **moved))
        return out

    lvlm.encode_images = noisy
    try:
        yield
    finally:
        del lvlm.encode_images


@dataclass
class _Run:
    spec: str
    ratio: float | None
    pruner: Any
    policy: str | None


def _before_llm_only(pruner) -> bool:
    """Whether ``pruner`` makes its whole prefill choice before the LLM (in the tower or on the projected
    tokens; a decode-time selection, DyCoke's, is not a kept set): then the LLM's prefill cannot change
    its kept set and is not run."""
    from .pruner import Stage

    return pruner is not None and not pruner.acts_in(Stage.IN_LLM)


class _StopPrefill(Exception):
    """Raised after an in-LLM pruner's last stage has chosen: the layers after it cannot change the kept set."""


@contextlib.contextmanager
def _stop_after_last_stage(lvlm, pruner) -> Iterator[None]:
    """Inside the block, ``pruner``'s in-LLM ``select`` of its last stage raises :class:`_StopPrefill` once
    it has returned (and been recorded: enter after ``record_kept``); ``select`` is restored on exit."""
    stages = lvlm.runner.schedule(pruner)
    if not stages:
        yield
        return
    last = len(stages) - 1
    saved = pruner.__dict__.get("select", _MISSING)
    select = pruner.select

    def stopping(inputs):
        red = select(inputs)
        if getattr(inputs, "num_layers", 0) and getattr(inputs, "stage", None) == last:  # in-LLM calls name the depth
            raise _StopPrefill
        return red

    pruner.select = stopping
    try:
        yield
    finally:
        if saved is _MISSING:
            del pruner.select
        else:
            pruner.select = saved


_MISSING = object()


@torch.no_grad()
def _kept_sets(lvlm, runs: list[_Run], images, prompts, ids, shortcut: bool = True) -> tuple[dict, torch.Tensor | None]:
    """``{(spec, ratio): {sample id: [N] bool}}`` of one prefill per run on this batch, and the unpruned
    vision pass's visual tokens (concatenated) for the drift figure."""
    from .visualize.record import record_kept, view_sizes

    lvlm._stability_ids = list(ids)
    groups: dict[Any, list[_Run]] = defaultdict(list)
    for run in runs:
        groups[lvlm.vision_needs(run.pruner)].append(run)
    out: dict = {}
    plain = lvlm.encode(images, prompts, lvlm.vision_needs(None))
    feats = torch.cat([v.tokens.float().flatten() for v in plain.views if v.prunable]) if plain.views else None
    for needs, group in groups.items():
        encoded = plain if needs == plain.needs else None
        for run in group:
            with record_kept(run.pruner) as rec:
                encoded = encoded or lvlm.encode(images, prompts, needs)
                if shortcut and _before_llm_only(run.pruner):
                    # the choice is made before the LLM: place the pruned sequence as generate does and stop there
                    # (the adapter's own assembly: the same pruner call, positions and text inputs)
                    policy = lvlm._assembly_policy(run.pruner, lvlm._position_policy(run.policy, run.pruner, images))
                    lvlm._assemble(encoded.batch, encoded.views, run.pruner, policy, list(ids), list(prompts))
                else:
                    try:  # the prefill up to the last prune point (no later layer changes what was kept)
                        with (_stop_after_last_stage(lvlm, run.pruner) if shortcut and run.pruner is not None
                              else contextlib.nullcontext()):
                            lvlm.generate(images, prompts, pruner=run.pruner, max_new_tokens=1,
                                          position_policy=run.policy, sample_ids=ids, encoded=encoded)
                    except _StopPrefill:
                        pass
            sets = {}
            for i, sid in enumerate(ids):
                try:
                    k = rec.kept(sid, view_sizes(encoded.views, i))
                except KeyError:  # the pruner never ran on it (no visual tokens)
                    continue
                sets[sid] = k.stages[-1] if k.stages else np.ones(sum(k.views), dtype=bool)
            out[(run.spec, run.ratio)] = sets
    return out, feats


def measure(model: str, task: str, methods: Sequence[str], ratios: Sequence[float], perturbations: Sequence[str],
            limit: int | None = 100, seed: int = 0, batch_size: int = 8, data_dir: str | None = None,
            device: str = "auto", bootstrap: int = 1000, log=print,
            progress: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Mean Jaccard overlap of kept sets, per method, ratio and perturbation (rows of :data:`COLUMNS`).

    ``methods``: pruner specs (``fopru_rank``, ``fastv:k=3``, ``name@keep``); a ratio-free method runs
    once (ratio ``None``). A method the model refuses (``OptionError``) gets one row with the reason.
    ``progress``: called with the table so far after every batch.
    """
    from .adapters import load
    from .benchmarks.stats import bootstrap_ci
    from .benchmarks.sweep import batches_from
    from .benchmarks.sweep_config import make_pruner, method_ratios, normalise, SweepConfig, split_policy
    from .benchmarks.tasks import get_task
    from .pruner import Stage

    bad = [p for p in perturbations if p not in PERTURBATIONS]
    if bad or not perturbations:
        raise OptionError(f"--perturb takes a comma list of {', '.join(PERTURBATIONS)}; got {','.join(perturbations) or 'nothing'}")
    cfg = normalise(SweepConfig(model=model, tasks=[task], methods=list(methods), ratios=list(ratios), seed=seed,
                                limit=limit, batch_size=batch_size))
    specs = [(m, r) for m in cfg.methods for r in method_ratios(cfg, m)]
    runs = []
    for spec, r in specs:
        runs.append(_Run(spec, r, make_pruner(spec, r, seed=seed), split_policy(spec)[1]))
    t = get_task(task)
    data = t.load(data_dir=data_dir, limit=limit, seed=seed if limit else None)
    base = load(model)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    base.model.to(dev)
    other = None
    if "dtype" in perturbations:
        flip = torch.float32 if next(base.model.parameters()).dtype == torch.bfloat16 else torch.bfloat16
        other = load(model, dtype=flip)
        other.model.to(dev)
    log(f"tokenprune stability: {model} | {task} | {len(runs)} method x ratio runs | {len(data)} samples | "
        f"perturbations {', '.join(perturbations)} (attention: {_attn_impl(base.model)} vs the other)")

    # refuse early, per method, what this model cannot run (one row each, the rest go on)
    refused: dict[tuple, str] = {}
    samples = list(data.samples())
    probe = samples[:1]
    for run in runs:
        try:
            _kept_sets(base, [run], [s.image for s in probe], [t.prompt(s) for s in probe], [s.id for s in probe])
        except OptionError as exc:
            refused[(run.spec, run.ratio)] = f"refused: {str(exc).splitlines()[0]}"
            log(f"  {run.spec}: {refused[(run.spec, run.ratio)]}")
        except Exception as exc:  # noqa: BLE001 -- a method that fails here gets its row (named), the others go on
            refused[(run.spec, run.ratio)] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"  {run.spec}: {refused[(run.spec, run.ratio)]}")
    live = [r for r in runs if (r.spec, r.ratio) not in refused]

    scores: dict[tuple, list[float]] = defaultdict(list)
    drift: dict[str, list[float]] = defaultdict(list)
    done = 0

    def table_rows() -> list[dict[str, Any]]:
        rows = []
        for run in runs:
            key = (run.spec, run.ratio)
            for pert in perturbations:
                row = {"model": model, "task": task, "method": run.spec, "ratio": run.ratio, "perturbation": pert,
                       "feature_drift": float(np.mean(drift[pert])) if drift[pert] else math.nan, "note": ""}
                if key in refused:
                    rows.append({**row, "n": 0, "note": refused[key]})
                    continue
                if pert == "noise" and run.pruner is not None and run.pruner.acts_in(Stage.IN_VISION):
                    rows.append({**row, "n": 0, "note": "n/a: chooses inside the vision tower, before the noised features"})
                    continue
                j = np.array(scores.get((*key, pert), []), dtype=float)
                if not len(j):
                    rows.append({**row, "n": 0, "note": "no visual tokens pruned"})
                    continue
                low, high = bootstrap_ci(len(j), lambda idx: float(j[idx].mean()), n_resamples=bootstrap, seed=seed)
                rows.append({**row, "n": int(len(j)), "mean_jaccard": float(j.mean()), "ci_low": low, "ci_high": high,
                             "identical": float((j == 1.0).mean()), "min_jaccard": float(j.min())})
        return rows

    for chunk in batches_from(samples, batch_size):
        images, prompts, ids = [s.image for s in chunk], [t.prompt(s) for s in chunk], [s.id for s in chunk]
        ref, ref_feats = _kept_sets(base, live, images, prompts, ids)
        for pert in perturbations:
            if pert == "attention":
                with attention_swapped(base):
                    got, feats = _kept_sets(base, live, images, prompts, ids)
            elif pert == "dtype":
                got, feats = _kept_sets(other, live, images, prompts, ids)
            else:
                with feature_noise(base, seed):
                    got, feats = _kept_sets(base, live, images, prompts, ids)
            if ref_feats is not None and feats is not None and feats.shape == ref_feats.shape:
                drift[pert].append(float((feats - ref_feats).norm() / ref_feats.norm().clamp_min(1e-30)))
            for key, sets in ref.items():
                for sid, a in sets.items():
                    if sid in got.get(key, {}):
                        scores[(*key, pert)].append(jaccard(a, got[key][sid]))
        done += len(chunk)
        log(f"  {done} of {len(samples)} samples done")
        if progress is not None:  # the table so far (n says how far): an interrupted run still leaves its figures
            progress(table_rows())

    return table_rows()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")))
                        for k in COLUMNS})


def read_csv(path: Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))


def _num(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: one row per method and ratio, one column per perturbation: mean Jaccard [CI], share of
    samples unchanged, n."""
    perts = list(dict.fromkeys(r["perturbation"] for r in rows))
    drift = {p: next((_num(r["feature_drift"]) for r in rows if r["perturbation"] == p
                      and not math.isnan(_num(r["feature_drift"]))), math.nan) for p in perts}
    head = [f"{p} (features differ by {drift[p]:.1e})" if not math.isnan(drift[p]) else p for p in perts]
    lines = ["| method | ratio | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(perts)]
    runs = list(dict.fromkeys((r["method"], str(r["ratio"])) for r in rows))
    for method, ratio in runs:
        cells = []
        for p in perts:
            r = next((x for x in rows if x["method"] == method and str(x["ratio"]) == ratio and x["perturbation"] == p), None)
            if r is None:
                cells.append("")
            elif not int(_num(r["n"]) if not math.isnan(_num(r["n"])) else 0):
                cells.append(str(r.get("note", "")))
            else:
                cells.append(f"{_num(r['mean_jaccard']):.3f} [{_num(r['ci_low']):.3f}, {_num(r['ci_high']):.3f}], "
                             f"{100 * _num(r['identical']):.0f}% same (n={int(_num(r['n']))})")
        lines.append(f"| {method} | {ratio if ratio not in ('', 'None') else 'adaptive'} | " + " | ".join(cells) + " |")
    return lines


def stability_section(path: Path) -> list[str]:
    """Markdown section for report.md from a ``stability.csv``."""
    rows = read_csv(path)
    if not rows:
        return []
    return ["## Stability of the kept sets\n",
            f"`tokenprune stability` on {rows[0]['task']} ({rows[0]['model']}): mean Jaccard overlap of each run's kept "
            "set with the same run under a perturbation [95% bootstrap CI], the share of samples whose set did not "
            "change, n (prefill only; see `tokenprune.stability`).\n", *table(rows), ""]
