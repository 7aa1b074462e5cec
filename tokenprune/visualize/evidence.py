"""Evidence recall: did a method keep the tokens a video question's answer depends on?

The video analogue of the on-object share (:mod:`.on_object`). A ``shapes_video`` question names the
events its answer depends on (:func:`tokenprune.benchmarks.tasks.shapes_video.evidence`: an object in
some frames -- each flash of the flashing object, the two objects of an ``order`` question when they
are shown, ...). Its **evidence tokens** are the visual tokens, frame view by frame view, whose region
of the frame the object covers in those frames: at least ``min_cover`` (default 0.1) of the token's
pixels, and in every view where the object is shown at least the one token it covers most (so a
small object has evidence in every frame it is in). A view that holds two frames (Qwen's temporal
patch) covers the object in either.

Per question, from what a sweep stored about each sample (``kept`` in ``samples.jsonl``: the kept and
merged bitmasks per frame view, their frames and token grids) and the scene the sample carries:

* ``recall``: the share of its evidence tokens the method kept or merged into a kept token;
* ``recall_kept``: the share it kept (merges not counted: ``pool`` merges every token, so its
  ``recall`` is 1 by construction; ``recall_kept`` tells the pooling apart);
* ``complete``: 1 if every event has at least one evidence token kept or merged (a necessary
  condition for answering: three flashes need three flashes seen), else 0; ``complete_kept``: kept.

:func:`evidence_table` averages them per method, ratio and question kind (``all``: every question),
with a 95% bootstrap CI over questions for ``recall``, and writes ``evidence_recall.csv``. Nothing
needs the model: token regions come from each view's grid over the frame (exact when the frames are
rendered at the model's own frame size, or the family squashes the whole frame into its grid -- every
family but a centre-cropping one given frames of another size); ``lvlm=`` maps them through the
model's own processor geometry instead (:func:`tokenprune.visualize.regions.video_regions`).
"""
from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import TokenpruneError
from .on_object import token_coverage
from .record import Kept
from .regions import ViewRegions, _grid_boxes

COLUMNS = ["method", "ratio", "kind", "n_questions", "recall", "ci_low", "ci_high", "recall_kept", "complete",
           "complete_kept", "evidence_tokens", "tokens_kept"]
EVIDENCE_TASKS = ("shapes_video",)
MIN_COVER = 0.1


@dataclass
class Evidence:
    """One question's evidence over its visual tokens (all prunable views in order, ``N`` tokens).

    Attributes:
        mask: ``[N]`` bool, the evidence tokens (the union of the events').
        events: per event, ``[N]`` bool: its evidence tokens (empty when the event's frames were not shown).
    """

    mask: np.ndarray
    events: list[np.ndarray]

    def score(self, value: np.ndarray) -> dict[str, float]:
        """``recall``, ``recall_kept``, ``complete``, ``complete_kept`` and ``evidence_tokens`` of a method's
        kept values (:attr:`Kept.value`: 1 kept, 0.5 merged, 0 dropped)."""
        if len(value) != len(self.mask):
            raise TokenpruneError(f"{len(value)} kept values for {len(self.mask)} visual tokens")
        n = int(self.mask.sum())
        seen, kept = value > 0, value >= 1
        return {"recall": float(seen[self.mask].mean()) if n else float("nan"),
                "recall_kept": float(kept[self.mask].mean()) if n else float("nan"),
                "complete": float(all(e.any() and seen[e].any() for e in self.events)),
                "complete_kept": float(all(e.any() and kept[e].any() for e in self.events)),
                "evidence_tokens": float(n)}


def view_frames(views: Sequence[int], frames: Sequence[int | None] | None, n_frames: int) -> list[tuple[int, ...]]:
    """The sampled frames each view covers: from its first frame (``Kept.frames``) up to the next view's
    first frame (Qwen: two per view); without frames (the frames given as images), view ``i`` is frame
    ``i`` when there is one view per frame."""
    if frames and all(f is not None for f in frames):
        starts = sorted({int(f) for f in frames})
        out = []
        for f in frames:
            later = [s for s in starts if s > int(f)]
            out.append(tuple(range(int(f), later[0] if later else n_frames)) or (int(f),))
        return out
    if len(views) == n_frames:
        return [(i,) for i in range(n_frames)]
    raise TokenpruneError(f"{len(views)} visual views for {n_frames} frames, and no frame per view stored: "
                          "cannot tell which frame each token is in")


def grid_regions(grids: Sequence[tuple[int, int]], covered: Sequence[tuple[int, ...]], size: int) -> list[ViewRegions]:
    """Each view's token grid laid over the whole ``size`` x ``size`` frame, cell by cell."""
    out = []
    for (gh, gw), frames in zip(grids, covered):
        out.append(ViewRegions(f"frame {frames[0]}", (gh, gw), _grid_boxes(gh, gw, size / gh, size / gw),
                               frame=frames[0], frames=tuple(frames)))
    return out


def question_evidence(scene: Any, kind: str, targets: Sequence[int], regions: Sequence[ViewRegions],
                      frame_indices: Sequence[int], size: int, min_cover: float = MIN_COVER) -> Evidence:
    """The evidence tokens of one ``shapes_video`` question, over ``regions`` (one per prunable view, each
    with the sampled frames it covers in ``frames``); ``frame_indices``: the scene frame of each sampled frame."""
    from ..benchmarks.tasks.shapes_video import actor_mask, evidence

    sizes = [len(r) for r in regions]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    events = []
    masks: dict[tuple[int, int], np.ndarray] = {}
    for actor_id, frames in evidence(scene, kind, targets):
        wanted = set(frames)
        ev = np.zeros(offsets[-1], dtype=bool)
        for v, region in enumerate(regions):
            shown = [int(frame_indices[f]) for f in (region.frames or (region.frame,)) if int(frame_indices[f]) in wanted]
            if not shown:
                continue
            mask = np.zeros((size, size), dtype=bool)
            for t in shown:
                if (actor_id, t) not in masks:
                    masks[(actor_id, t)] = actor_mask(scene.actors[actor_id], t, size)
                mask |= masks[(actor_id, t)]
            if not mask.any():
                continue
            cover = np.nan_to_num(token_coverage([region], mask))
            on = cover >= min_cover
            on[int(np.argmax(cover))] = True
            ev[offsets[v]:offsets[v + 1]] = on
        events.append(ev)
    union = np.any(events, axis=0) if events else np.zeros(offsets[-1], dtype=bool)
    return Evidence(union, events)


def sample_evidence(extra: dict[str, Any], category: str, kept: Kept, lvlm: Any = None,
                    min_cover: float = MIN_COVER) -> Evidence:
    """The evidence of a sweep row's sample (its ``extra`` and the views its ``kept`` record describes)."""
    from ..benchmarks.tasks.shapes_video import VideoScene, render

    scene = VideoScene.from_json(extra["scene"])
    size = int(extra["size"])
    frame_indices = list(extra.get("frame_indices") or range(scene.frames))
    covered = view_frames(kept.views, kept.frames, len(frame_indices))
    if lvlm is not None:
        from ..media import Video
        from .regions import video_regions

        video = Video.from_frames(render(scene, size)[frame_indices])
        regions = video_regions(lvlm, video)  # the prompt does not change a video's token grids
        if [len(r) for r in regions] != list(kept.views):
            raise TokenpruneError(f"the model's views {[r.grid for r in regions]} do not match the stored ones {kept.grids}: "
                                  "was the sweep run with another model?")
    else:
        grids = kept.grids or [_square(n) for n in kept.views]
        regions = grid_regions(grids, covered, size)
    return question_evidence(scene, category, extra["targets"], regions, frame_indices, size, min_cover)


def _square(n: int) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise TokenpruneError(f"a view of {n} tokens and no grid stored: cannot place its tokens")
    return side, side


def evidence_table(run_dir: str | Path, lvlm: Any = None, bootstrap: int = 1000, seed: int = 0,
                   task: str = "shapes_video", min_cover: float = MIN_COVER) -> list[dict]:
    """One row per (method, ratio, kind) of a ``shapes_video`` sweep, plus ``kind="all"``: mean evidence
    recall with a 95% bootstrap CI over questions, recall of kept tokens only, the share of questions
    with every event seen, evidence tokens and tokens kept per question. Writes ``evidence_recall.csv``
    in ``run_dir``."""
    from ..benchmarks.results import read_all
    from ..benchmarks.stats import bootstrap_ci
    from ..benchmarks.tasks.shapes_video import KINDS

    if task not in EVIDENCE_TASKS:
        raise TokenpruneError(f"evidence recall needs a task whose samples carry their scene: {', '.join(EVIDENCE_TASKS)}")
    run_dir = Path(run_dir)
    every = read_all(run_dir)
    rows = [r for r in every if r.get("task") == task and r.get("method") != "none"]
    if not rows:
        tasks = sorted({r.get("task") for r in every})
        raise TokenpruneError(f"{run_dir} has no pruned {task} rows (its tasks: {', '.join(map(str, tasks)) or 'none'}); "
                              f"run a sweep with --tasks {task} first")
    missing = [r for r in rows if not r.get("kept")]
    if missing:
        raise TokenpruneError(f"{len(missing)} rows of {run_dir} store no kept tokens (e.g. {missing[0]['method']} on "
                              f"{missing[0]['sample_id']}): rerun the sweep into a new --output")
    cache: dict[tuple, Evidence] = {}
    scored: dict[tuple[str, Any], list[tuple[str, dict[str, float], int]]] = defaultdict(list)
    for r in rows:
        kept = Kept.from_json(r["kept"])
        key = (r["sample_id"], tuple(kept.views), tuple(kept.frames or ()), tuple(map(tuple, kept.grids or ())))
        if key not in cache:
            cache[key] = sample_evidence(r["extra"], r["category"], kept, lvlm, min_cover)
        s = cache[key].score(kept.value)
        scored[(r["method"], r["ratio"])].append((r["category"], s, int(kept.stages[-1].sum())))
    order = _method_order(run_dir, [m for m, _ in scored])
    table = []
    for (method, ratio), items in sorted(scored.items(), key=lambda kv: (order[kv[0][0]], -(kv[0][1] or 0))):
        for kind in (*KINDS, "all"):
            mine = [(s, k) for c, s, k in items if kind == "all" or c == kind]
            mine = [(s, k) for s, k in mine if s["evidence_tokens"] > 0]
            if not mine:
                continue
            recall = np.array([s["recall"] for s, _ in mine])
            low, high = bootstrap_ci(len(recall), lambda idx: float(recall[idx].mean()), n_resamples=bootstrap, seed=seed)
            table.append({"method": method, "ratio": ratio, "kind": kind, "n_questions": len(mine),
                          "recall": float(recall.mean()), "ci_low": low, "ci_high": high,
                          "recall_kept": float(np.mean([s["recall_kept"] for s, _ in mine])),
                          "complete": float(np.mean([s["complete"] for s, _ in mine])),
                          "complete_kept": float(np.mean([s["complete_kept"] for s, _ in mine])),
                          "evidence_tokens": float(np.mean([s["evidence_tokens"] for s, _ in mine])),
                          "tokens_kept": float(np.mean([k for _, k in mine]))})
    with (run_dir / "evidence_recall.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in t.items()}
                         for t in table)
    return table


def _method_order(run_dir: Path, methods: Sequence[str]) -> dict[str, int]:
    """The sweep's method order (its config), methods it does not list after them."""
    listed: list[str] = []
    try:
        from ..benchmarks.sweep import load_sweep_config

        listed = list(load_sweep_config(run_dir).methods)
    except Exception:  # noqa: BLE001 -- a folder of copied rows without config.yaml still has a table
        pass
    order = {m: i for i, m in enumerate(listed)}
    for m in methods:
        order.setdefault(m, len(order))
    return order


TITLES = {"recall": "evidence recall (kept or merged)", "recall_kept": "evidence recall, kept tokens only",
          "complete": "every event seen, kept or merged (share of questions)",
          "complete_kept": "every event seen in kept tokens (share of questions)"}


def format_table(table: Sequence[dict], columns: Sequence[str] = ("recall", "recall_kept", "complete", "complete_kept")) -> str:
    """Each of ``columns`` per method and ratio (rows) and kind (columns), the tokens kept per question last."""
    from ..benchmarks.tasks.shapes_video import KINDS

    kinds = [k for k in (*KINDS, "all") if any(t["kind"] == k for t in table)]
    cells = {(t["method"], t["ratio"], t["kind"]): t for t in table}
    runs = list(dict.fromkeys((t["method"], t["ratio"]) for t in table))
    width = max([12] + [len(m) + 2 for m, _ in runs])
    heads = [k.replace("count_flashes", "flashes").replace("static_control", "static").replace("final_state", "final")
             for k in kinds]
    lines = []
    for col in columns:
        lines.append(f"{TITLES.get(col, col)}:")
        lines.append(f"{'method':<{width}}{'ratio':>6}" + "".join(f"{h:>10}" for h in heads) + f"{'kept':>7}")
        for m, r in runs:
            vals = [cells.get((m, r, k)) for k in kinds]
            kept = cells.get((m, r, "all"), {}).get("tokens_kept", float("nan"))
            ratio = "-" if r is None else f"{r:g}"
            lines.append(f"{m:<{width}}{ratio:>6}" + "".join(f"{v[col]:>10.3f}" if v else f"{'':>10}" for v in vals)
                         + f"{kept:>7.1f}")
        lines.append("")
    lines.append("evidence tokens: the tokens covering the objects the answer depends on, in the frames it depends on; "
                 "recall's 95% CIs in evidence_recall.csv")
    return "\n".join(lines)


__all__ = ["COLUMNS", "Evidence", "evidence_table", "format_table", "grid_regions", "question_evidence",
           "sample_evidence", "view_frames"]
