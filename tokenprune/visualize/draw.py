"""The figure: an image with the visual tokens a pruner keeps at full brightness.

Layout of one panel (:func:`draw_tokens`)::

    title
    [main view group, `size` px on the long side]   [side group 1, half size]
                                                     [side group 2, ...]
    [the same, scores as a heatmap]                  (only when `scores` is given)
    caption (the model's answer), wrapped

The views of a sample are split into *groups* of views that do not overlap in the image
(:func:`view_groups`): LLaVA and Qwen have one view; InternVL's tiles form one group and its
thumbnail another; LLaVA-NeXT's high-res view one and its base view another. The group with the
most tokens is the main picture, the others are drawn beside it at half size, each with its own
label (``"high-res: 96/400 kept"``), so no pixel stands for two views at once.

In a view group's picture every token's area is shown at ``dim + (1 - dim) * kept`` of its
brightness: kept (1) at full brightness, dropped (0) at ``dim``, a merged token's sources
(``0 < kept < 1``: VisionZip contextual tokens, SparseVLM recycled ones) in between. Image area no
token of the group covers (cut off by a center crop, LLaVA-NeXT's sub-token unpadding slivers) is
drawn grey at ``dim`` and hatched: the model never saw it in that view. Several
views in one group (tiles) are outlined. Scores are min-max normalised per view and drawn with
matplotlib's ``inferno`` colormap over a faint greyscale copy of the image (a view whose scores are
all equal gets the colormap's bottom; non-finite scores are grey).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .regions import ViewRegions

__all__ = ["draw_tokens", "compose", "count_kept", "panel_layout", "shade", "view_groups", "PanelLayout", "GroupPlacement"]

PAD = 8  # outer margin and gap between sub-panels, px
TILE_OUTLINE = (0, 190, 255)
NO_SCORE = (96, 96, 96)
HATCH = (170, 170, 170)  # image area in no token of the view group (cropped away, unpadded)


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_height(font) -> int:
    box = font.getbbox("Ag")
    return int(box[3]) + 2


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` px (over-long words broken), at most ``max_lines`` lines."""
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = word if not line else f"{line} {word}"
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = max(1, int(len(word) * width / font.getlength(word)))
                while cut > 1 and font.getlength(word[:cut]) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + " ...") > width:
            last = last[:-1]
        lines[-1] = last + " ..."
    return lines


def _extent(boxes: np.ndarray) -> tuple[float, float, float, float]:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    b = boxes[area > 0] if (area > 0).any() else boxes
    return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())


def _overlap(a: np.ndarray, b: np.ndarray, eps: float) -> bool:
    """Whether two views share image area (more than ``eps`` px^2 between any of their tokens)."""
    ax0, ay0, ax1, ay1 = _extent(a)
    bx0, by0, bx1, by1 = _extent(b)
    if min(ax1, bx1) - max(ax0, bx0) <= 0 or min(ay1, by1) - max(ay0, by0) <= 0:
        return False
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return float((w.clip(0) * h.clip(0)).sum()) > eps


def view_groups(regions: Sequence[ViewRegions]) -> list[list[int]]:
    """Views split into groups that do not overlap in the image, main group first.

    Greedy in view order: a view joins the first group none of whose views it overlaps. The main
    group is the one with the most tokens (LLaVA-NeXT: high-res; InternVL: the tiles); the others
    follow in order of their first view.
    """
    groups: list[list[int]] = []
    for v, region in enumerate(regions):
        eps = 1e-6 * max(1.0, float(np.prod(np.ptp(region.boxes.reshape(-1, 2), 0))))
        for g in groups:
            if not any(_overlap(region.boxes, regions[u].boxes, eps) for u in g):
                g.append(v)
                break
        else:
            groups.append([v])
    main = max(range(len(groups)), key=lambda g: (sum(len(regions[v]) for v in groups[g]), -g)) if groups else 0
    return [groups[main]] + [g for i, g in enumerate(groups) if i != main]


def _group_label(regions: Sequence[ViewRegions], views: list[int]) -> str:
    labels = [regions[v].label for v in views]
    if len(labels) == 1:
        return labels[0]
    words = [label.split(" ", 1) for label in labels]
    if all(len(w) == 2 for w in words) and len({w[0] for w in words}) == 1:
        return f"{words[0][0]}s {words[0][1]}-{words[-1][1]}"
    return ", ".join(labels)


@dataclass
class GroupPlacement:
    """Where one view group is drawn: original pixel ``(x, y)`` -> panel ``origin + (x, y) * scale``."""

    views: list[int]
    label: str
    origin: tuple[int, int]
    size: tuple[int, int]  # (w, h) of the drawn image, panel px
    scale: float
    heat_origin: tuple[int, int] | None = None  # the scores heatmap's copy, when drawn
    label_origin: tuple[int, int] = (0, 0)
    heat_label_origin: tuple[int, int] | None = None

    def to_panel(self, x: float, y: float, heat: bool = False) -> tuple[float, float]:
        ox, oy = self.heat_origin if heat else self.origin
        return ox + x * self.scale, oy + y * self.scale


@dataclass
class PanelLayout:
    """The geometry :func:`draw_tokens` uses (exposed so tests and tools can find a token's pixels)."""

    width: int
    height: int
    groups: list[GroupPlacement]
    title_lines: list[str] = field(default_factory=list)
    caption_lines: list[str] = field(default_factory=list)
    caption_y: int = 0
    font_px: int = 14


def panel_layout(image_size: tuple[int, int], regions: Sequence[ViewRegions], size: int = 336,
                 scores: bool = False, title: str = "", caption: str = "") -> PanelLayout:
    """The layout of a :func:`draw_tokens` panel for an image of ``image_size = (width, height)``."""
    width, height = image_size
    font_px = max(10, round(size * 0.042))
    font, small = _font(font_px), _font(max(9, round(font_px * 0.85)))
    th, sh = _text_height(font), _text_height(small)
    groups = view_groups(regions)
    main_scale = size / max(width, height)
    side_scale = main_scale / 2
    mw, mh = max(1, round(width * main_scale)), max(1, round(height * main_scale))
    sw, shh = max(1, round(width * side_scale)), max(1, round(height * side_scale))
    has_side = len(groups) > 1

    def label_w(views: list[int]) -> int:  # the widest label text the group may get
        n = sum(len(regions[v]) for v in views)
        return math.ceil(small.getlength(f"{_group_label(regions, views)}: {n}/{n} kept, {n} merged"))

    main_w = max(mw, label_w(groups[0]) if groups else 0)
    side_w = max([sw] + [label_w(g) for g in groups[1:]])
    panel_w = PAD + main_w + (PAD + side_w if has_side else 0) + PAD
    panel_w = max(panel_w, 2 * PAD + 160)
    title_lines = _wrap(title, font, panel_w - 2 * PAD, 3) if title else []
    y = PAD + len(title_lines) * th + (PAD // 2 if title_lines else 0)

    def block(top: int) -> tuple[list[tuple[tuple[int, int], tuple[int, int]]], int]:
        """(label origin, image origin) per group for one block starting at ``top``; its height."""
        spots = [((PAD, top), (PAD, top + sh))]
        bottom = top + sh + mh
        sx, sy = PAD + main_w + PAD, top
        for _ in groups[1:]:
            spots.append(((sx, sy), (sx, sy + sh)))
            sy += sh + shh + PAD // 2
        return spots, max(bottom, sy - PAD // 2)

    spots, bottom = block(y)
    heat_spots = None
    if scores:
        heat_spots, bottom = block(bottom + PAD)
    placements = []
    for g, views in enumerate(groups):
        main = g == 0
        placements.append(GroupPlacement(
            views=views, label=_group_label(regions, views), label_origin=spots[g][0], origin=spots[g][1],
            size=(mw, mh) if main else (sw, shh), scale=main_scale if main else side_scale,
            heat_label_origin=heat_spots[g][0] if heat_spots else None,
            heat_origin=heat_spots[g][1] if heat_spots else None))
    caption_lines = _wrap(caption, font, panel_w - 2 * PAD, 6) if caption else []
    caption_y = bottom + PAD // 2
    total_h = caption_y + len(caption_lines) * th + PAD
    return PanelLayout(width=panel_w, height=total_h, groups=placements, title_lines=title_lines,
                       caption_lines=caption_lines, caption_y=caption_y, font_px=font_px)


def _pixel_boxes(boxes: np.ndarray, scale: float, w: int, h: int) -> np.ndarray:
    """Original-pixel boxes -> integer panel-pixel boxes of an image drawn at ``scale`` (shared edges
    round alike, so neighbouring tokens neither gap nor overlap)."""
    b = np.rint(boxes * scale).astype(np.int64)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    return b


def _as_values(values, regions: Sequence[ViewRegions], what: str, allow_none: bool = False) -> list[np.ndarray | None]:
    if len(values) != len(regions):
        raise ValueError(f"{what}: {len(values)} arrays for {len(regions)} views")
    out = []
    for v, (value, region) in enumerate(zip(values, regions)):
        if value is None and allow_none:
            out.append(None)
            continue
        arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float64).reshape(-1)
        if len(arr) != len(region):
            raise ValueError(f"{what}[{v}] ({region.label}): {len(arr)} values for {len(region)} tokens")
        out.append(arr)
    return out


def _hatch(grey: np.ndarray, where: np.ndarray) -> np.ndarray:
    """RGB values for the pixels ``where`` no token covers: the dimmed greyscale image with
    light diagonal hatching (``grey`` is the full ``[h, w]`` greyscale)."""
    ys, xs = np.nonzero(where)
    out = np.repeat(grey[ys, xs][:, None], 3, axis=1)
    out[(xs + ys) % 8 == 0] = HATCH
    return out


def _heat_colors(score: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    finite = np.isfinite(score)
    colors = np.tile(np.array(NO_SCORE, dtype=np.float64), (len(score), 1))
    if finite.any():
        lo, hi = score[finite].min(), score[finite].max()
        norm = (score[finite] - lo) / (hi - lo) if hi > lo else np.zeros(finite.sum())  # constant: no signal
        colors[finite] = colormaps["inferno"](norm)[:, :3] * 255
    return colors


def count_kept(kept: np.ndarray) -> tuple[int, int, int]:
    """``(kept, merged, all)`` token counts of one view's ``[n]`` values in ``[0, 1]`` (1 kept, in between merged)."""
    k = np.asarray(kept, dtype=np.float64)
    return int((k >= 1 - 1e-6).sum()), int(((k > 1e-6) & (k < 1 - 1e-6)).sum()), len(k)


def shade(rgb: Image.Image, regions: Sequence[ViewRegions], kept: Sequence[np.ndarray], views: Sequence[int],
          scale: float, size: tuple[int, int], dim: float = 0.25
          ) -> tuple[Image.Image, np.ndarray, tuple[int, int, int]]:
    """The picture of one view group: ``rgb`` resized to ``size = (w, h)`` px (``scale`` px per original
    pixel) with each token of ``views`` at ``dim + (1 - dim) * kept`` of its brightness, area no token
    covers grey and hatched, several views outlined.

    Returns:
        ``(picture, covered [h, w] bool, (kept, merged, all) token counts over the views)``.
    """
    w, h = size
    base = np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
    factor = np.full((h, w), float(dim))
    covered = np.zeros((h, w), dtype=bool)
    outlines = []
    n_kept = n_part = n_all = 0
    for v in views:
        k = kept[v]
        pix = _pixel_boxes(regions[v].boxes, scale, w, h)
        for (x0, y0, x1, y1), value in zip(pix, k):
            factor[y0:y1, x0:x1] = dim + (1 - dim) * value
            covered[y0:y1, x0:x1] = True
        a, b, c = count_kept(k)
        n_kept, n_part, n_all = n_kept + a, n_part + b, n_all + c
        if len(views) > 1:
            outlines.append(_pixel_boxes(np.array([_extent(regions[v].boxes)]), scale, w, h)[0])
    shown = base * factor[..., None]
    grey = base.mean(2)
    shown[~covered] = _hatch(grey * dim, ~covered)
    picture = Image.fromarray(shown.round().clip(0, 255).astype(np.uint8))
    pd = ImageDraw.Draw(picture)
    for x0, y0, x1, y1 in outlines:
        pd.rectangle([x0, y0, x1 - 1, y1 - 1], outline=TILE_OUTLINE, width=1)
    return picture, covered, (n_kept, n_part, n_all)


def draw_tokens(image: Image.Image, regions: list[ViewRegions], kept: list[np.ndarray],
                scores: list[np.ndarray] | None = None, title: str = "", caption: str = "", dim: float = 0.25,
                size: int = 336) -> Image.Image:
    """One panel: the image (``size`` px on its long side) with each token's area at full brightness
    if kept (``kept[v][i] == 1``), at ``dim`` of its brightness if dropped (0), in between for a
    merged token's sources (``0 < kept < 1``).

    Args:
        image: the original image (the frame of ``regions``' boxes).
        regions: :func:`~tokenprune.visualize.token_regions` of this image.
        kept: one array per view, ``len(regions[v])`` values in ``[0, 1]`` (bools accepted).
        scores: optional, one array per view (``None`` for a view without scores; non-finite values
            are drawn grey): a heatmap below the picture, normalised per view, colormap ``inferno``.
        title: above the picture (e.g. the method and ratio).
        caption: below (e.g. the model's answer), wrapped, at most 6 lines.
        dim: brightness factor of dropped tokens (0: black, 1: no dimming).
        size: the long side of the main picture, px; other view groups are drawn at half that.

    Views that overlap (LLaVA-NeXT base vs high-res, InternVL thumbnail vs tiles) are drawn in
    separate pictures; see the module docstring for the layout.
    """
    if not 0 <= dim <= 1:
        raise ValueError(f"dim must be in [0, 1], got {dim}")
    kept_v = [k.clip(0, 1) for k in _as_values(kept, regions, "kept")]
    score_v = _as_values(scores, regions, "scores", allow_none=True) if scores is not None else None
    rgb = image.convert("RGB")
    layout = panel_layout(rgb.size, regions, size=size, scores=score_v is not None, title=title, caption=caption)
    panel = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(panel)
    font, small = _font(layout.font_px), _font(max(9, round(layout.font_px * 0.85)))
    th = _text_height(font)
    for i, line in enumerate(layout.title_lines):
        draw.text((PAD, PAD + i * th), line, fill="black", font=font)

    for g in layout.groups:
        w, h = g.size
        picture, covered, (n_kept, n_part, n_all) = shade(rgb, regions, kept_v, g.views, g.scale, (w, h), dim)
        panel.paste(picture, g.origin)
        text = f"{g.label}: {n_kept}/{n_all} kept" + (f", {n_part} merged" if n_part else "")
        draw.text(g.label_origin, text, fill="black", font=small)

        if score_v is not None and g.heat_origin is not None:
            grey = np.asarray(rgb.convert("L").resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
            heat = np.repeat(grey[..., None] * 0.35, 3, axis=2)
            heat[~covered] = _hatch(grey * 0.35, ~covered)
            for v in g.views:
                if score_v[v] is None:
                    continue
                colors = _heat_colors(score_v[v])
                pix = _pixel_boxes(regions[v].boxes, g.scale, w, h)
                for (x0, y0, x1, y1), color in zip(pix, colors):
                    heat[y0:y1, x0:x1] = 0.8 * color + 0.2 * grey[y0:y1, x0:x1, None]
            panel.paste(Image.fromarray(heat.round().clip(0, 255).astype(np.uint8)), g.heat_origin)
            draw.text(g.heat_label_origin, f"{g.label}: scores", fill="black", font=small)

    for i, line in enumerate(layout.caption_lines):
        draw.text((PAD, layout.caption_y + i * th), line, fill=(40, 40, 40), font=font)
    return panel


def compose(panels: list[Image.Image], columns: int | None = None, gap: int = 12) -> Image.Image:
    """Panels side by side on a white background: a grid of ``columns`` (default: one row of up to
    6, more rows beyond), each cell as large as the largest panel (panels top-aligned, centred)."""
    if not panels:
        raise ValueError("compose needs at least one panel")
    n = len(panels)
    if columns is None:
        columns = n if n <= 6 else math.ceil(n / math.ceil(n / 6))
    columns = max(1, min(int(columns), n))
    rows = math.ceil(n / columns)
    cw, ch = max(p.width for p in panels), max(p.height for p in panels)
    out = Image.new("RGB", (columns * cw + (columns + 1) * gap, rows * ch + (rows + 1) * gap), "white")
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        out.paste(p.convert("RGB"), (gap + c * (cw + gap) + (cw - p.width) // 2, gap + r * (ch + gap)))
    return out
