"""Is a method looking at the right place? The share of its kept tokens that lie on the object.

On easy-VQA every image is one shape on a pale background, so the object has a pixel mask (every
pixel with a channel below 200; backgrounds have every channel >= 230); on ``shapes_scene`` the
objects are drawn from the scene each sample stores. A token's *coverage* is
the fraction of the pixels of its image region on the shape; a method's on-object share for an
image is the mean coverage of the tokens it kept, averaged over images with a bootstrap CI. The
same mean over *all* tokens is the shape's area share: what a method that ignores the image
(``random``) keeps in expectation -- the sanity check of the measure.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import TokenpruneError
from .record import Kept
from .regions import ViewRegions, token_regions

COLUMNS = ["method", "ratio", "n_images", "on_object", "ci_low", "ci_high", "area_share", "tokens_kept"]


def shape_mask(image: Image.Image) -> np.ndarray:
    """``[H, W]`` bool: the easy-VQA shape (pixels with a channel below 200)."""
    return np.asarray(image.convert("RGB")).min(-1) < 200


def token_coverage(regions: list[ViewRegions], mask: np.ndarray) -> np.ndarray:
    """``[N]`` (all views' tokens in order): the share of each token's region that lies on ``mask``.

    A region's pixels are the pixels whose centres fall inside its box (original-image coordinates).
    """
    h, w = mask.shape
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    out = []
    for view in regions:
        x0, y0, x1, y1 = view.boxes.T
        # pixel j's centre j + 0.5 lies in [a, b) for j in [ceil(a - 0.5), ceil(b - 0.5))
        c0 = np.clip(np.ceil(x0 - 0.5), 0, w).astype(int)
        c1 = np.clip(np.ceil(x1 - 0.5), 0, w).astype(int)
        r0 = np.clip(np.ceil(y0 - 0.5), 0, h).astype(int)
        r1 = np.clip(np.ceil(y1 - 0.5), 0, h).astype(int)
        on = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
        area = (r1 - r0) * (c1 - c0)
        out.append(np.where(area > 0, on / np.maximum(area, 1), np.nan))
    return np.concatenate(out)


MASKED_TASKS = ("easy_vqa", "shapes_scene")  # tasks whose images come with object masks


def object_mask(task_name: str, sample: Any) -> np.ndarray:
    """``[H, W]`` bool: the object pixels of a sample of a :data:`MASKED_TASKS` task (easy-VQA: its
    one shape; ``shapes_scene``: every object, drawn from the scene the sample stores)."""
    if task_name == "shapes_scene":
        from ..benchmarks.tasks.shapes_scene import Scene, object_masks

        return object_masks(Scene.from_json(sample.extra["scene"])).any(0)
    return shape_mask(sample.image)


def on_object_table(run_dir: str | Path, lvlm: Any = None, bootstrap: int = 1000, seed: int = 0,
                    task: str | None = None) -> list[dict]:
    """One row per (method, ratio) of an easy-VQA or ``shapes_scene`` sweep (``task``; default: the
    sweep's first of them): on-object share of the kept tokens with a 95% bootstrap CI over images,
    the objects' area share on the same images, tokens kept."""
    from ..adapters import load
    from ..benchmarks.results import ratio_key, read_all
    from ..benchmarks.stats import bootstrap_ci
    from ..benchmarks.sweep import load_sweep_config
    from .show import sample_image

    run_dir = Path(run_dir)
    cfg = load_sweep_config(run_dir)
    usable = [t for t in cfg.tasks if t in MASKED_TASKS]
    if task is None and usable:
        task = usable[0]
    if task not in usable:
        raise TokenpruneError(f"the on-object share needs object masks: run it on a sweep of {' or '.join(MASKED_TASKS)} "
                              f"(this one has {', '.join(cfg.tasks)})")
    rows = [r for r in read_all(run_dir) if r["task"] == task and r["method"] != "none" and r.get("kept")]
    if not rows:
        raise TokenpruneError(f"{run_dir} has no rows with kept tokens (sweeps before kept tokens were stored?); "
                              "rerun the sweep into a new --output")
    lvlm = lvlm or load(cfg.model)
    coverage: dict[str, np.ndarray] = {}
    by_image: dict[str, int] = {}
    for sid in dict.fromkeys(r["sample_id"] for r in rows):
        task_obj, sample = sample_image(cfg, task, sid)
        image_id = sample.extra.get("image_id", sample.extra.get("scene", sid))  # questions share images: one entry per image
        if image_id in by_image.values():
            continue
        by_image[sid] = image_id
        coverage[sid] = token_coverage(token_regions(lvlm, sample.image, task_obj.prompt(sample)),
                                       object_mask(task, sample))
    groups: dict[tuple[str, float | None], list[dict]] = defaultdict(list)  # ratio None: a ratio-free run
    for r in rows:
        if r["sample_id"] in coverage:
            groups[(r["method"], ratio_key(r["ratio"]))].append(r)
    table = []
    for (method, ratio), g in groups.items():
        shares, areas, kept_n = [], [], []
        for r in g:
            cov = coverage[r["sample_id"]]
            kept = Kept.from_json(r["kept"]).stages[-1]
            if len(kept) != len(cov):
                raise TokenpruneError(f"{method}: {len(kept)} tokens stored but {len(cov)} regions for sample "
                                      f"{r['sample_id']}: the sweep was run with another model?")
            shares.append(float(np.nanmean(cov[kept])))
            areas.append(float(np.nanmean(cov)))
            kept_n.append(int(kept.sum()))
        shares_a = np.array(shares)
        low, high = bootstrap_ci(len(shares_a), lambda idx: float(shares_a[idx].mean()), n_resamples=bootstrap, seed=seed)
        table.append({"method": method, "ratio": ratio, "n_images": len(g), "on_object": float(shares_a.mean()),
                      "ci_low": low, "ci_high": high, "area_share": float(np.mean(areas)),
                      "tokens_kept": float(np.mean(kept_n))})
    order = {m: i for i, m in enumerate(cfg.methods)}
    table.sort(key=lambda t: (order.get(t["method"], len(order)), -(t["ratio"] or 0.0)))
    with (run_dir / "on_object.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in t.items()} for t in table)
    return table


def format_table(table: list[dict]) -> str:
    """The table as aligned text, the area share once as the reference line."""
    from ..benchmarks.results import ratio_label

    width = max([14] + [len(t["method"]) + 2 for t in table])
    lines = [f"{'method':<{width}}{'ratio':>9}{'images':>8}{'on object [95% CI]':>28}{'area share':>12}{'kept':>7}"]
    for t in table:
        lines.append(f"{t['method']:<{width}}{ratio_label(t['ratio']):>9}{t['n_images']:>8}"
                     f"{t['on_object']:>11.3f} [{t['ci_low']:.3f}, {t['ci_high']:.3f}]{t['area_share']:>12.3f}"
                     f"{t['tokens_kept']:>7.1f}")
    lines.append("area share: the shape's share of all tokens on the same images, what an image-blind selection "
                 "(random) keeps in expectation")
    return "\n".join(lines)
