"""Frame strips: what each method keeps of a video, one row of frames per method.

Layout of a strip (:func:`draw_strip`)::

    header (model, video, which frames are shown, Qwen's temporal patches)
    row title (e.g. "fopru_rank @ 0.25: 24/96 kept")
    [frame]           [frame]           [frame] ...   each frame `cell` px on its long side
    frame 0, 0.00 s   frame 4, 1.00 s   ...           the sampled frame's index (Qwen: "frames 0-1") and time
    3/12 kept         5/12 kept         ...           the tokens of that frame kept (and merged)
    answer (the row's caption)
    (the next row)

A *cell* is one drawn frame: the views whose first frame is that frame (one per sampled frame; Qwen:
one per temporal patch of 2 frames, drawn on the patch's first frame). At most ``max_frames`` cells
are drawn, evenly spaced with both ends included, and the header says which. In a cell each
token's area is shaded as in :func:`~tokenprune.visualize.draw.draw_tokens`: full brightness kept,
``dim`` dropped, in between merged; frame area no token covers (LLaVA-NeXT-Video's centre crop) is
grey and hatched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .draw import PAD, _as_values, _font, _text_height, _wrap, shade
from .regions import ViewRegions

__all__ = ["StripRow", "StripLayout", "draw_strip", "frame_cells", "pick_frames", "strip_layout"]


@dataclass
class StripRow:
    """One row of a strip: ``title`` above, per view ``kept`` values in ``[0, 1]``, ``caption`` below."""

    title: str
    kept: list[np.ndarray]
    caption: str = ""


@dataclass
class StripLayout:
    """Where :func:`draw_strip` puts everything (exposed so tests and tools can find a token's pixels).

    Attributes:
        width, height: the figure's size, px.
        cells: per drawn cell, ``(first frame, view indices)``, in frame order.
        shown: the indices (into :func:`frame_cells`) of the drawn cells.
        total: how many cells the video has.
        scale: panel px per original frame pixel; ``size``: a cell picture's ``(w, h)``.
        xs: each drawn cell's left edge; ``row_tops``: each row's picture top edge.
        header_lines, row_titles, row_captions: the wrapped text.
    """

    width: int
    height: int
    cells: list[tuple[int, list[int]]]
    shown: list[int]
    total: int
    scale: float
    size: tuple[int, int]
    xs: list[int]
    row_tops: list[int]
    header_lines: list[str] = field(default_factory=list)
    row_titles: list[list[str]] = field(default_factory=list)
    row_captions: list[list[str]] = field(default_factory=list)
    font_px: int = 12

    def to_panel(self, row: int, cell: int, x: float, y: float) -> tuple[float, float]:
        """Original frame pixel ``(x, y)`` of drawn cell ``cell`` in row ``row`` -> figure pixel."""
        return self.xs[cell] + x * self.scale, self.row_tops[row] + y * self.scale


def frame_cells(regions: Sequence[ViewRegions]) -> list[tuple[int, list[int]]]:
    """``(first frame, view indices)`` per distinct first frame of the video views, in frame order."""
    cells: dict[int, list[int]] = {}
    for v, r in enumerate(regions):
        if r.frame is None:
            raise ValueError(f"view {r.label!r} is not a video frame: frame strips draw video views only")
        cells.setdefault(int(r.frame), []).append(v)
    return sorted(cells.items())


def pick_frames(n: int, at_most: int) -> list[int]:
    """At most ``at_most`` of ``range(n)``, evenly spaced, first and last included (all when ``n <= at_most``)."""
    if at_most < 1:
        raise ValueError(f"at_most must be >= 1, got {at_most}")
    if n <= at_most:
        return list(range(n))
    if at_most == 1:
        return [0]
    return sorted({int(i) for i in np.linspace(0, n - 1, at_most).round()})


def _cell_label(regions: Sequence[ViewRegions], views: list[int], font=None, width: float = math.inf) -> str:
    """``"frame 3, 1.25 s"`` (Qwen: ``"frames 2-3, 1.25 s"``); ``"#3 1.2s"`` where that is wider than ``width`` px."""
    r = regions[views[0]]
    frames = sorted({f for v in views for f in (regions[v].frames or (regions[v].frame,))})
    name = f"frame {frames[0]}" if len(frames) == 1 else f"frames {frames[0]}-{frames[-1]}"
    label = name if r.time is None else f"{name}, {r.time:.2f} s"
    if font is not None and font.getlength(label) > width:
        short = f"#{frames[0]}" if len(frames) == 1 else f"#{frames[0]}-{frames[-1]}"
        label = short if r.time is None else f"{short} {r.time:.1f}s"
    return label


def _shown_note(regions: Sequence[ViewRegions], cells, shown: list[int]) -> str:
    """What the header says about the drawn frames: which, of how many, and Qwen's temporal patches."""
    firsts = [cells[i][0] for i in shown]
    if len(shown) < len(cells):
        note = (f"frames shown: {', '.join(map(str, firsts))} ({len(shown)} of {len(cells)} frame views, "
                "evenly spaced)")
    else:
        note = f"all {len(cells)} frame views shown"
    spans = {len(r.frames) for r in regions if r.frames}
    if max(spans, default=1) > 1:
        note += (f"; one view per temporal patch of {max(spans)} frames: its tokens are drawn on the patch's "
                 "first frame")
    return note


def strip_layout(frame_size: tuple[int, int], regions: Sequence[ViewRegions], rows: Sequence[StripRow],
                 header: str = "", cell: int = 160, max_frames: int = 8) -> StripLayout:
    """The layout of :func:`draw_strip` for frames of ``frame_size = (width, height)``."""
    width, height = frame_size
    cells = frame_cells(regions)
    shown = pick_frames(len(cells), max_frames)
    scale = cell / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    font_px = max(9, round(cell * 0.075))
    font, small = _font(font_px), _font(max(8, round(font_px * 0.9)))
    th, sh = _text_height(font), _text_height(small)
    col_w = max(w, 2 * th)
    fig_w = max(PAD + len(shown) * (col_w + PAD), 2 * PAD + 240)
    full_header = "\n".join(t for t in (header, _shown_note(regions, cells, shown)) if t)
    header_lines = _wrap(full_header, font, fig_w - 2 * PAD, 6)
    y = PAD + len(header_lines) * th + (PAD if header_lines else 0)
    xs = [PAD + i * (col_w + PAD) + (col_w - w) // 2 for i in range(len(shown))]
    tops, titles, captions = [], [], []
    for row in rows:
        title = _wrap(row.title, font, fig_w - 2 * PAD, 2) if row.title else []
        y += len(title) * th + (PAD // 2 if title else 0)
        tops.append(y)
        y += h + PAD // 2 + 2 * sh  # the picture, then two lines under each frame
        caption = _wrap(row.caption, font, fig_w - 2 * PAD, 2) if row.caption else []
        y += len(caption) * th + PAD
        titles.append(title)
        captions.append(caption)
    return StripLayout(width=fig_w, height=y + PAD, cells=[cells[i] for i in shown], shown=shown, total=len(cells),
                       scale=scale, size=(w, h), xs=xs, row_tops=tops, header_lines=header_lines,
                       row_titles=titles, row_captions=captions, font_px=font_px)


def draw_strip(video: Any, regions: list[ViewRegions], rows: Sequence[StripRow], header: str = "",
               cell: int = 160, max_frames: int = 8, dim: float = 0.25) -> Image.Image:
    """A frame strip: per row (the unpruned model, then each method) the video's frames with each token's
    area at full brightness if kept, ``dim`` if dropped, in between if merged.

    Args:
        video: the :class:`tokenprune.media.Video` (``frames [T, H, W, 3]``) the regions are of.
        regions: :func:`~tokenprune.visualize.token_regions` of the video, one per prunable view.
        rows: one :class:`StripRow` per method, each with ``len(regions)`` kept arrays.
        header: text above (model, video); the frames shown and Qwen's temporal patches are added.
        cell: the long side of one frame picture, px.
        max_frames: at most this many frame cells per row, evenly spaced (see :func:`pick_frames`).
        dim: brightness factor of dropped tokens.
    """
    if not 0 <= dim <= 1:
        raise ValueError(f"dim must be in [0, 1], got {dim}")
    if not rows:
        raise ValueError("draw_strip needs at least one row")
    frames = np.asarray(video.frames)
    kept_rows = [[k.clip(0, 1) for k in _as_values(r.kept, regions, f"row {i} kept")] for i, r in enumerate(rows)]
    layout = strip_layout((frames.shape[2], frames.shape[1]), regions, rows, header, cell, max_frames)
    fig = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(fig)
    font, small = _font(layout.font_px), _font(max(8, round(layout.font_px * 0.9)))
    th, sh = _text_height(font), _text_height(small)
    for i, line in enumerate(layout.header_lines):
        draw.text((PAD, PAD + i * th), line, fill="black", font=font)
    w, h = layout.size
    images = {f: Image.fromarray(frames[f]).convert("RGB") for f, _ in layout.cells}
    for r, (row, kept) in enumerate(zip(rows, kept_rows)):
        top = layout.row_tops[r]
        title = layout.row_titles[r]
        for i, line in enumerate(title):
            draw.text((PAD, top - PAD // 2 - (len(title) - i) * th), line, fill="black", font=font)
        for c, (frame, views) in enumerate(layout.cells):
            picture, _, (n_kept, n_part, n_all) = shade(images[frame], regions, kept, views, layout.scale, (w, h), dim)
            x = layout.xs[c]
            fig.paste(picture, (x, top))
            draw.text((x, top + h + 2), _cell_label(regions, views, small, max(w, 2 * th) + PAD // 2), fill="black", font=small)
            count = f"{n_kept}/{n_all} kept" + (f", {n_part} merged" if n_part else "")
            draw.text((x, top + h + 2 + sh), count, fill=(60, 60, 60), font=small)
        y = top + h + PAD // 2 + 2 * sh
        for i, line in enumerate(layout.row_captions[r]):
            draw.text((PAD, y + i * th), line, fill=(40, 40, 40), font=font)
    return fig
