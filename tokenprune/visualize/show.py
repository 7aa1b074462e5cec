"""``tokenprune show``: the image with the tokens each method keeps, one panel per method.

Two sources: a live run (:func:`show_image`: the model runs once per method on one image) and a
finished sweep (:func:`show_run`: the kept tokens stored in ``samples.jsonl`` are redrawn; the
model's weights are loaded only for the processor geometry, nothing is generated).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import OptionError, TokenpruneError
from ..pruner import pruner_from_spec, validate_ratio
from .draw import compose, draw_tokens
from .record import Kept, record_kept, view_sizes
from .regions import ViewRegions, token_regions

DEFAULT_METHODS = ("fopru_rank", "fopru_row", "random", "pool", "fastv")


def _check_regions(regions: list[ViewRegions], sizes: list[int], model: str) -> None:
    if [len(r.boxes) for r in regions] != sizes:
        raise TokenpruneError(f"token regions of {model} ({[len(r.boxes) for r in regions]} per view) do not match "
                              f"its visual tokens ({sizes} per view); this family's region mapping needs fixing")


def _answer(text: str, correct: bool | None) -> str:
    mark = "" if correct is None else (" (right)" if correct else " (wrong)")  # PIL's default font has no check marks
    return f"answer: {text.strip()!r}{mark}"


def panel_for(image: Image.Image, regions: list[ViewRegions], kept: Kept | None, title: str, caption: str,
              scores: bool = True) -> Image.Image:
    """One method's panel; ``kept=None``: the unpruned model (every token kept)."""
    if kept is None:
        return draw_tokens(image, regions, [np.ones(len(r.boxes)) for r in regions], None, title=title, caption=caption)
    heat = kept.per_view(kept.scores) if scores and kept.scores is not None else None
    return draw_tokens(image, regions, kept.per_view(kept.value), heat, title=title, caption=caption)


def _kept_title(spec: str, ratio: float, kept: Kept) -> str:
    n, k = sum(kept.views), int(kept.stages[-1].sum())
    stages = f" after {len(kept.stages)} stages" if len(kept.stages) > 1 else ""
    merged = f" (+{int(kept.merged.sum())} merged)" if kept.merged.any() else ""
    return f"{spec} @ {ratio:g}: {k}/{n} kept{stages}{merged}"


def show_image(image: Image.Image, prompt: str, methods: Sequence[str] = DEFAULT_METHODS, ratio: float = 0.25,
               model: str = "tokenprune-demo", lvlm: Any = None, max_new_tokens: int = 8,
               reference: Sequence[str] | None = None) -> Image.Image:
    """A figure for one image: the unpruned model, then one panel per method spec at ``ratio``.

    Each panel: kept tokens at full brightness, dropped ones dimmed, merged ones in between, the
    method's score as a heatmap where it has one, and the model's answer (✓/✗ against
    ``reference`` answers if given).
    """
    from ..adapters import load

    ratio = validate_ratio(ratio)
    lvlm = lvlm or load(model)
    regions = token_regions(lvlm, image, prompt)

    def correct(text: str) -> bool | None:
        return None if not reference else text.strip().lower().rstrip(".") in {r.lower() for r in reference}

    enc = lvlm.encode([image], [prompt])
    sizes = view_sizes(enc.views, 0)
    _check_regions(regions, sizes, model)
    out = lvlm.generate([image], [prompt], max_new_tokens=max_new_tokens, encoded=enc)
    panels = [panel_for(image, regions, None, f"none: all {sum(sizes)} tokens", _answer(out.texts[0], correct(out.texts[0])))]
    for spec in methods:
        pruner = pruner_from_spec(spec, ratio=ratio)
        enc = lvlm.encode([image], [prompt], lvlm.vision_needs(pruner))
        with record_kept(pruner) as rec:
            out = lvlm.generate([image], [prompt], pruner=pruner, max_new_tokens=max_new_tokens, sample_ids=["0"],
                                encoded=enc)
        kept = rec.kept("0", sizes)
        panels.append(panel_for(image, regions, kept, _kept_title(spec, ratio, kept),
                                _answer(out.texts[0], correct(out.texts[0]))))
    return compose(panels)


def sample_image(cfg, task_name: str, sample_id: str):
    """``(task, sample)`` of sample ``sample_id`` of a sweep's task, decoded from the sweep's data."""
    from ..benchmarks.sweep import _data_dir
    from ..benchmarks.tasks import get_task

    task = get_task(task_name, **cfg.task_options.get(task_name, {}))
    data = task.load(data_dir=_data_dir(cfg, task_name), limit=cfg.limit, seed=cfg.seed if cfg.limit else None)
    for sample in data.samples(only={sample_id}):
        return task, sample
    raise TokenpruneError(f"sample {sample_id!r} is not in {task_name}'s data (or its image is broken)")


def run_rows(run_dir: Path, sample_id: str, task: str | None = None) -> list[dict]:
    """Every row of ``samples.jsonl`` (and unmerged part files) for one sample."""
    from ..benchmarks.results import read_all

    rows = [r for r in read_all(run_dir) if str(r["sample_id"]) == sample_id and (task is None or r["task"] == task)]
    if not rows:
        raise TokenpruneError(f"no results for sample {sample_id!r} in {run_dir}; sample ids are the "
                              "'sample_id' values of samples.jsonl")
    return rows


def show_run(run_dir: str | Path, sample_id: str, ratio: float | None = None, methods: Sequence[str] | None = None,
             task: str | None = None, lvlm: Any = None) -> Image.Image:
    """Redraw sample ``sample_id`` of a finished sweep from the kept tokens it stored (no generation)."""
    from ..adapters import load
    from ..benchmarks.sweep import load_sweep_config

    run_dir = Path(run_dir)
    cfg = load_sweep_config(run_dir)
    rows = run_rows(run_dir, sample_id, task)
    task_name = rows[0]["task"]
    ratio = float(ratio) if ratio is not None else cfg.ratios[0]
    chosen = [r for r in rows if r["task"] == task_name and (r["method"] == "none" or float(r["ratio"]) == ratio)
              and (methods is None or r["method"] in methods or r["method"] == "none")]
    if not any(r["method"] != "none" for r in chosen):
        have = sorted({f"{r['method']}@{r['ratio']}" for r in rows})
        raise OptionError(f"no method rows at ratio {ratio:g} for sample {sample_id!r}; the sweep has: {', '.join(have)}")
    task_obj, sample = sample_image(cfg, task_name, sample_id)
    lvlm = lvlm or load(cfg.model)
    prompt = task_obj.prompt(sample)
    regions = token_regions(lvlm, sample.image, prompt)
    return compose([_row_panel(sample.image, regions, r, task_obj) for r in chosen])


def _row_panel(image, regions, row: dict, task) -> Image.Image:
    metric = task.headline if task.headline in row["scores"] else next(iter(row["scores"]), None)
    score = row["scores"].get(metric) if metric else None
    correct = None if score is None else bool(score >= 1)
    caption = _answer(row["prediction"], correct)
    if row["method"] == "none" or not row.get("kept"):
        return panel_for(image, regions, None, f"none: all {sum(len(r.boxes) for r in regions)} tokens", caption)
    kept = Kept.from_json(row["kept"])
    _check_regions(regions, kept.views, row.get("model", "the model"))
    return panel_for(image, regions, kept, _kept_title(row["method"], float(row["ratio"]), kept), caption)


def save(figure: Image.Image, path: str | Path) -> Path:
    """Write ``figure`` as PNG (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)
    return path


__all__ = ["DEFAULT_METHODS", "panel_for", "run_rows", "sample_image", "save", "show_image", "show_run"]
