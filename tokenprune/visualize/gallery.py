"""Flipped-answer galleries: the samples a method gets wrong that the unpruned model gets right,
drawn with what each method kept, for ``report.md`` and the sweep's W&B run.

An image sample is drawn as one panel per method; a video sample (``sample.image`` a
:class:`tokenprune.media.Video`) as a small frame strip, one row of up to 6 frames per method.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

RIGHT = 1.0 - 1e-9  # a per-sample score at its maximum: the answer is right
WRONG = 0.5  # below this, wrong (graded scores such as VQA accuracy: fewer than 2 of 3 humans agree)


def flips(rows: list[dict], metric: str) -> dict[float, list[tuple[str, list[str]]]]:
    """Per ratio, ``(sample id, methods that flipped it)``, the samples most methods flip first.

    A flip: the unpruned model's per-sample ``metric`` is right, the method's wrong.
    """
    ref = {r["sample_id"]: r["scores"].get(metric) for r in rows if r["method"] == "none"}
    by_ratio: dict[float, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["method"] == "none" or not r.get("kept"):
            continue
        base, score = ref.get(r["sample_id"]), r["scores"].get(metric)
        if base is not None and score is not None and base >= RIGHT and score < WRONG:
            by_ratio[float(r["ratio"])][r["sample_id"]].append(r["method"])
    return {ratio: sorted(ids.items(), key=lambda kv: -len(kv[1])) for ratio, ids in by_ratio.items()}


def write_galleries(cfg, out: Path, tasks: dict, rows: list[dict], metric_of, lvlm: Any = None,
                    per_ratio: int = 3) -> tuple[list[str], list[Path]]:
    """Draw up to ``per_ratio`` flipped samples per task and ratio into ``out/gallery/``.

    Returns the report's markdown lines and the PNGs. The model is loaded (for its processor's
    geometry only) if ``lvlm`` is not given and there is anything to draw.
    """
    from ..adapters import load
    from ..errors import OptionError
    from .regions import token_regions
    from .show import rows_figure, sample_image, stored_views

    lines: list[str] = []
    pngs: list[Path] = []
    for task_name, task in tasks.items():
        task_rows = [r for r in rows if r["task"] == task_name]
        if not task_rows:
            continue
        metric = metric_of(task, task_rows)
        for ratio, flipped in sorted(flips(task_rows, metric).items(), reverse=True):
            if not flipped:
                continue
            lines += [f"\n**{task_name}, ratio {ratio:g}**: {len(flipped)} sample(s) flipped by at least one method "
                      f"(right unpruned, wrong pruned; per-sample `{metric}`). "
                      f"Redraw any: `tokenprune show --run {out} --sample ID --ratio {ratio:g}`\n"]
            order = {m: i for i, m in enumerate(cfg.methods)}
            for sid, methods in flipped[:per_ratio]:
                methods = sorted(methods, key=lambda m: order.get(m, len(order)))
                lvlm = lvlm or load(cfg.model)
                task_obj, sample = sample_image(cfg, task_name, sid)
                chosen = [r for r in task_rows if r["sample_id"] == sid and (r["method"] == "none" or float(r["ratio"]) == ratio)]
                try:
                    regions = token_regions(lvlm, sample.image, task_obj.prompt(sample), views=stored_views(chosen))
                except OptionError as exc:  # e.g. a multi-image prompt: listed, not drawn, the report still written
                    lines.append(f"- `{sid}` ({sample.question!r}) flipped by {', '.join(methods)} (not drawn: {exc})\n")
                    continue
                figure = rows_figure(sample.image, regions, chosen, task_obj, thumbnail=True)
                path = out / "gallery" / f"{task_name}_r{ratio:g}_{sid}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                figure.save(path)
                pngs.append(path)
                lines.append(f"- `{sid}` ({sample.question!r}, reference {sample.answers[0]!r}) flipped by "
                             f"{', '.join(methods)}\n\n  ![{sid}](gallery/{path.name})\n")
    return lines, pngs
