"""``tokenprune show``: the image with the tokens each method keeps, one panel per method; for a
video, a frame strip: one row of frames per method (:mod:`tokenprune.visualize.strip`).

Two sources: a live run (:func:`show_image` / :func:`show_video`: the model runs once per method on
one image or video) and a finished sweep (:func:`show_run`: the kept tokens stored in
``samples.jsonl`` are redrawn; the model's weights are loaded only for the processor geometry,
nothing is generated).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..benchmarks.results import ratio_key, ratio_label
from ..errors import OptionError, TokenpruneError
from ..pruner import pruner_from_spec, validate_ratio
from .draw import compose, draw_tokens
from .record import Kept, record_kept, view_sizes
from .regions import ViewRegions, token_regions
from .strip import StripRow, draw_strip

STRIP_FRAMES = 8  # frame cells per strip row, at most (evenly spaced)
THUMB_FRAMES, THUMB_CELL = 6, 96  # a gallery's video thumbnail: a small strip

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


def _kept_title(spec: str, ratio: float | None, kept: Kept) -> str:
    """``ratio`` ``None``: a sweep's ratio-free run (its count chosen per sample), titled ``adaptive``."""
    n, k = sum(kept.views), int(kept.stages[-1].sum())
    stages = f" after {len(kept.stages)} stages" if len(kept.stages) > 1 else ""
    merged = f" (+{int(kept.merged.sum())} merged)" if kept.merged.any() else ""
    return f"{spec} @ {ratio_label(ratio)}: {k}/{n} kept{stages}{merged}"


def _is_video(obj: Any) -> bool:
    from ..media import Video

    return isinstance(obj, Video)


def _kept_runs(lvlm, visual: Any, prompt: str, methods: Sequence[str], ratio: float, max_new_tokens: int):
    """``(views of the unpruned encoding, unpruned answer, [(spec, Kept, answer)])``: the model run once
    unpruned and once per method on one visual, recording what each method kept."""
    enc = lvlm.encode([visual], [prompt])
    out = lvlm.generate([visual], [prompt], max_new_tokens=max_new_tokens, encoded=enc)
    runs = []
    for spec in methods:
        pruner = pruner_from_spec(spec, ratio=ratio)
        penc = lvlm.encode([visual], [prompt], lvlm.vision_needs(pruner))
        with record_kept(pruner) as rec:
            pout = lvlm.generate([visual], [prompt], pruner=pruner, max_new_tokens=max_new_tokens, sample_ids=["0"],
                                 encoded=penc)
        runs.append((spec, rec.kept("0", view_sizes(penc.views, 0)), pout.texts[0]))
    return enc.views, out.texts[0], runs


def video_header(model: str, video: Any, note: str = "") -> str:
    """The strip's first line: the model, the file, how many frames were sampled from how many."""
    name = Path(video.path).name if getattr(video, "path", None) else "in-memory frames"
    shown = list(video.indices)
    picks = ", ".join(map(str, shown)) if len(shown) <= 12 else f"{', '.join(map(str, shown[:6]))}, ..., {shown[-1]}"
    extra = f" ({note})" if note else ""
    return (f"{model} on {name}: {video.num_frames} frames sampled{extra} of {video.total_frames} at {video.fps:g} fps "
            f"(source frames {picks})")


def show_video(video: Any, prompt: str, methods: Sequence[str] = DEFAULT_METHODS, ratio: float = 0.25,
               model: str | None = None, lvlm: Any = None, max_new_tokens: int = 8,
               reference: Sequence[str] | None = None, max_frames: int = STRIP_FRAMES, cell: int = 160,
               note: str = "") -> Image.Image:
    """A frame strip for one video: the unpruned model's row, then one row per method spec at ``ratio``.

    Each row: at most ``max_frames`` of the video's frame views (evenly spaced; the header says which),
    each frame with the tokens the method kept at full brightness, dropped ones dimmed, merged ones in
    between, the frame's index and time and its kept count under it; the row's title gives the method's
    total, its caption the model's answer. Qwen's views are temporal patches of 2 frames, drawn on the
    patch's first frame.

    Args:
        video: a :class:`tokenprune.media.Video` (sampled as the caller chose).
        model / lvlm: a video model's id or zoo name, or the loaded model (one of them is required).
        note: how the frames were sampled (e.g. ``"uniform"``), for the header.
        max_frames / cell: frame cells per row and their long side in px.
        (the others as :func:`show_image`)
    """
    from ..adapters import load

    ratio = validate_ratio(ratio)
    if lvlm is None and not model:
        raise OptionError("show_video needs a video model: pass model= (an id or zoo name) or lvlm=")
    lvlm = lvlm or load(model)
    model = model or getattr(lvlm, "family", "the model")
    views, answer, runs = _kept_runs(lvlm, video, prompt, methods, ratio, max_new_tokens)
    regions = token_regions(lvlm, video, prompt, views=[v for v in views if v.sample == 0])
    sizes = view_sizes(views, 0)
    _check_regions(regions, sizes, model)
    rows = [StripRow(f"none: all {sum(sizes)} tokens", [np.ones(n) for n in sizes],
                     _answer(answer, _correct(answer, reference)))]
    for spec, kept, text in runs:
        _check_regions(regions, kept.views, model)
        rows.append(StripRow(_kept_title(spec, ratio, kept), kept.per_view(kept.value), _answer(text, _correct(text, reference))))
    header = video_header(model, video, note) + f"; prompt: {prompt!r}"
    return draw_strip(video, regions, rows, header=header, cell=cell, max_frames=max_frames)


def _correct(text: str, reference: Sequence[str] | None) -> bool | None:
    return None if not reference else text.strip().lower().rstrip(".") in {r.lower() for r in reference}


def show_image(image: Image.Image, prompt: str, methods: Sequence[str] = DEFAULT_METHODS, ratio: float = 0.25,
               model: str = "tokenprune-demo", lvlm: Any = None, max_new_tokens: int = 8,
               reference: Sequence[str] | None = None) -> Image.Image:
    """A figure for one image: the unpruned model, then one panel per method spec at ``ratio``.

    Each panel: kept tokens at full brightness, dropped ones dimmed, merged ones in between, the
    method's score as a heatmap where it has one, and the model's answer (✓/✗ against
    ``reference`` answers if given). A :class:`tokenprune.media.Video` gets a frame strip
    (:func:`show_video`).
    """
    from ..adapters import load

    if _is_video(image):
        return show_video(image, prompt, methods, ratio, model if lvlm is None else None, lvlm, max_new_tokens, reference)
    ratio = validate_ratio(ratio)
    lvlm = lvlm or load(model)
    regions = token_regions(lvlm, image, prompt)
    views, answer, runs = _kept_runs(lvlm, image, prompt, methods, ratio, max_new_tokens)
    sizes = view_sizes(views, 0)
    _check_regions(regions, sizes, model)
    panels = [panel_for(image, regions, None, f"none: all {sum(sizes)} tokens", _answer(answer, _correct(answer, reference)))]
    for spec, kept, text in runs:
        panels.append(panel_for(image, regions, kept, _kept_title(spec, ratio, kept), _answer(text, _correct(text, reference))))
    return compose(panels)


def sample_image(cfg, task_name: str, sample_id: str):
    """``(task, sample)`` of sample ``sample_id`` of a sweep's task, decoded from the sweep's data
    (``sample.image``: a PIL image, or a :class:`tokenprune.media.Video` for a video task)."""
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
    """Redraw sample ``sample_id`` of a finished sweep from the kept tokens it stored (no generation).
    Ratio-free runs (``scissor``: ratio ``None``, the same at every ratio) are drawn beside any ``ratio``."""
    from ..adapters import load
    from ..benchmarks.sweep import load_sweep_config

    run_dir = Path(run_dir)
    cfg = load_sweep_config(run_dir)
    rows = run_rows(run_dir, sample_id, task)
    task_name = rows[0]["task"]
    ratio = float(ratio) if ratio is not None else cfg.ratios[0]
    chosen = [r for r in rows if r["task"] == task_name
              and (r["method"] == "none" or ratio_key(r["ratio"]) in (ratio, None))
              and (methods is None or r["method"] in methods or r["method"] == "none")]
    if not any(r["method"] != "none" for r in chosen):
        have = sorted({f"{r['method']}@{ratio_label(r['ratio'])}" for r in rows})
        raise OptionError(f"no method rows at ratio {ratio:g} for sample {sample_id!r}; the sweep has: {', '.join(have)}")
    task_obj, sample = sample_image(cfg, task_name, sample_id)
    lvlm = lvlm or load(cfg.model)
    prompt = task_obj.prompt(sample)
    regions = token_regions(lvlm, sample.image, prompt, views=stored_views(chosen))
    header = f"{cfg.model}, {task_name} sample {sample_id}: {sample.question!r}" if _is_video(sample.image) else ""
    return rows_figure(sample.image, regions, chosen, task_obj, header=header)


def stored_views(rows: Sequence[dict]) -> list[SimpleNamespace] | None:
    """A video sample's frame views as a sweep stored them with its kept tokens (grid, frame, time per view),
    for :func:`~tokenprune.visualize.token_regions` without a vision pass; ``None`` if no row stored them
    (image samples, or only unpruned rows: the regions then come from encoding the video once)."""
    for r in rows:
        k = r.get("kept") or {}
        if k.get("grids") and k.get("frames"):
            times = k.get("times") or [None] * len(k["frames"])
            return [SimpleNamespace(sample=0, prunable=True, grid=tuple(g), frame=f, time=t, clip=0)
                    for g, f, t in zip(k["grids"], k["frames"], times)]
    return None


def rows_figure(visual: Any, regions: list[ViewRegions], rows: Sequence[dict], task, header: str = "",
                thumbnail: bool = False) -> Image.Image:
    """The figure of a sample's ``samples.jsonl`` rows: panels side by side for an image, a frame strip
    (one row per method; ``thumbnail``: a small one, as galleries draw it) for a video."""
    if not _is_video(visual):
        return compose([_row_panel(visual, regions, r, task) for r in rows])
    strip_rows = [_strip_row(regions, r, task) for r in rows]
    if thumbnail:
        return draw_strip(visual, regions, strip_rows, header=header, cell=THUMB_CELL, max_frames=THUMB_FRAMES)
    return draw_strip(visual, regions, strip_rows, header=header, max_frames=STRIP_FRAMES)


def _row_caption(row: dict, task) -> str:
    metric = task.headline if task.headline in row["scores"] else next(iter(row["scores"]), None)
    score = row["scores"].get(metric) if metric else None
    return _answer(row["prediction"], None if score is None else bool(score >= 1))


def _row_panel(image, regions, row: dict, task) -> Image.Image:
    caption = _row_caption(row, task)
    if row["method"] == "none" or not row.get("kept"):
        return panel_for(image, regions, None, f"none: all {sum(len(r.boxes) for r in regions)} tokens", caption)
    kept = Kept.from_json(row["kept"])
    _check_regions(regions, kept.views, row.get("model", "the model"))
    return panel_for(image, regions, kept, _kept_title(row["method"], ratio_key(row["ratio"]), kept), caption)


def _strip_row(regions, row: dict, task) -> StripRow:
    """One ``samples.jsonl`` row of a video sample as a strip row (``none``: every token kept)."""
    caption = _row_caption(row, task)
    if row["method"] == "none" or not row.get("kept"):
        return StripRow(f"none: all {sum(len(r) for r in regions)} tokens", [np.ones(len(r)) for r in regions], caption)
    kept = Kept.from_json(row["kept"])
    _check_regions(regions, kept.views, row.get("model", "the model"))
    return StripRow(_kept_title(row["method"], ratio_key(row["ratio"]), kept), kept.per_view(kept.value), caption)


def save(figure: Image.Image, path: str | Path) -> Path:
    """Write ``figure`` as PNG (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)
    return path


__all__ = ["DEFAULT_METHODS", "panel_for", "rows_figure", "run_rows", "sample_image", "save", "show_image", "show_run",
           "show_video", "stored_views", "video_header"]
