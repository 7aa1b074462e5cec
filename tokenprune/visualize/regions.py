"""Where each visual token comes from: its region of the original image, per family.

:func:`token_regions` replays the geometry of the model's own image processor on one image
(resize, center crop, pad, anyres crops, dynamic tiles) and maps every visual token's patch
block back to original-image pixels. It returns one :class:`ViewRegions` per *prunable* view of
the sample, in the order and token layout of ``lvlm.encode([image], [prompt]).views`` (raster
over ``View.grid``), so ``kept[v][i]`` of a pruner lines up with ``regions[v].boxes[i]``.

What each family's mapping does:

* **LLaVA-1.5** (and ``tokenprune-demo``): [pad to square (``LlavaImageProcessor(do_pad=True)``)]
  -> resize (``shortest_edge`` keeps the aspect, ``height``/``width`` squashes) -> center crop
  -> ``patch x patch`` grid. Crops cut part of the image away: only the kept part has tokens;
  a token over padding (square padding, or a crop larger than the image) is clipped to the image.
* **LLaVA-NeXT**: the *base* view is the whole image squashed to the crop size; the *high-res*
  view is the image resized (aspect kept) into the best ``image_grid_pinpoints`` resolution,
  centre-padded to it, cut into crops, the crops' token grids stitched, and the stitched grid
  unpadded by the model's own ``unpad_image`` (applied here to token coordinates, as the adapter
  does). Unpadding works on whole token rows/columns with its own rounding, so a kept edge row
  can be partly padding (clipped here), and a sliver of the image (less than one token) at the
  padded edges can be in no high-res token at all.
* **LLaVA-OneVision**: LLaVA-NeXT's geometry; a high-res grid downsampled by ``anyres_max_N``
  (bilinear) gives each token the footprint of the unpadded cells it is centred on.
* **Qwen2-VL / Qwen2.5-VL**: the whole image resized (``smart_resize``, read off the processor's
  ``image_grid_thw``) to multiples of ``patch * merge``; one token = one ``merge x merge`` block.
* **InternVL**: the image squashed to ``cols x rows`` tiles (the processor's
  ``get_optimal_tiled_canvas``), tiles in row-major order, then the thumbnail (whole image
  squashed to one tile) when there is more than one tile. Inside a tile a token is the block of
  patches the model's own ``pixel_shuffle`` folds into it.

* **Video** (every video family): one view per sampled frame (Qwen: per temporal patch of 2 frames,
  drawn on its first frame); a view's token grid covers its processed frame and maps back to the
  original frame proportionally, through LLaVA-NeXT-Video's shortest-edge resize and centre crop
  (:func:`video_regions`).

Boxes are ``(x0, y0, x1, y1)`` floats in original-image pixels (``0 <= x <= width``), edges
continuous (a resize maps pixel edges to pixel edges, as PIL and torchvision do).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import OptionError

__all__ = ["ViewRegions", "token_regions", "video_regions"]


@dataclass
class ViewRegions:
    """The image regions of one prunable view's tokens.

    Attributes:
        label: ``"image"``, ``"base"``, ``"high-res"``, ``"tile 3"``, ``"thumbnail"``.
        grid: the view's token grid ``(h, w)``, as the adapter's ``View.grid``.
        boxes: ``[h * w, 4]`` float ``(x0, y0, x1, y1)`` in original-image pixels, one per token
            in the adapter's order (raster over ``grid``); for a video view, in pixels of its frame.
        clip: a video view's video (``View.clip``), ``None`` for an image view.
        frame: a video view's first sampled frame (``View.frame``), ``None`` for an image view.
        frames: the sampled frames the view's tokens cover (Qwen: a temporal patch of 2 frames,
            ``(frame, frame + 1)``; other families ``(frame,)``); ``()`` for an image view.
        time: ``frame``'s time in seconds (``View.time``), if known.
    """

    label: str
    grid: tuple[int, int]
    boxes: np.ndarray
    clip: int | None = None
    frame: int | None = None
    frames: tuple[int, ...] = ()
    time: float | None = None

    def __post_init__(self):
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if len(self.boxes) != self.grid[0] * self.grid[1]:
            raise ValueError(f"view {self.label!r}: {len(self.boxes)} boxes for a {self.grid} grid")

    def __len__(self) -> int:
        return len(self.boxes)


# -- affine maps between original-image and processed-image pixel coordinates ---------------------
@dataclass(frozen=True)
class _Map:
    """``u = s * x + t`` per axis: original pixel coordinate ``x`` -> processed coordinate ``u``."""

    sx: float = 1.0
    tx: float = 0.0
    sy: float = 1.0
    ty: float = 0.0

    def resize(self, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> "_Map":
        fy, fx = new_hw[0] / old_hw[0], new_hw[1] / old_hw[1]
        return _Map(self.sx * fx, self.tx * fx, self.sy * fy, self.ty * fy)

    def shift(self, dx: float, dy: float) -> "_Map":
        return _Map(self.sx, self.tx + dx, self.sy, self.ty + dy)

    def back(self, boxes: np.ndarray) -> np.ndarray:
        """Processed-coordinate boxes ``[N, 4]`` -> original-image coordinates."""
        b = np.asarray(boxes, dtype=np.float64)
        return np.stack([(b[:, 0] - self.tx) / self.sx, (b[:, 1] - self.ty) / self.sy,
                         (b[:, 2] - self.tx) / self.sx, (b[:, 3] - self.ty) / self.sy], 1)


def _clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    out = boxes.copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def _grid_boxes(gh: int, gw: int, ph: float, pw: float) -> np.ndarray:
    """Raster boxes of a ``gh x gw`` grid of ``ph x pw`` cells starting at the origin."""
    i, j = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    i, j = i.reshape(-1).astype(np.float64), j.reshape(-1).astype(np.float64)
    return np.stack([j * pw, i * ph, (j + 1) * pw, (i + 1) * ph], 1)


def _hw(value) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    return int(value[0]), int(value[1])


def _get(size: Any, key: str):
    """``size.key`` of a transformers ``SizeDict`` or a plain dict (``None`` if absent)."""
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _dummy(h: int, w: int) -> np.ndarray:
    """A zero-cost ``(3, h, w)`` array: transformers' size helpers only read its shape."""
    return np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), (3, h, w))


def _resized_hw(size: Any, h: int, w: int) -> tuple[int, int]:
    """Output ``(h, w)`` of the image processors' backend ``resize`` for ``size`` (same branches)."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    shortest, longest = _get(size, "shortest_edge"), _get(size, "longest_edge")
    if shortest and longest:
        return _hw(get_size_with_aspect_ratio((h, w), shortest, longest))
    if shortest:
        return _hw(get_resize_output_image_size(_dummy(h, w), size=shortest, default_to_square=False,
                                                input_data_format=ChannelDimension.FIRST))
    if _get(size, "max_height") and _get(size, "max_width"):
        return _hw(get_image_size_for_max_height_width((h, w), _get(size, "max_height"), _get(size, "max_width")))
    if _get(size, "height") and _get(size, "width"):
        return int(_get(size, "height")), int(_get(size, "width"))
    raise OptionError(f"cannot map tokens to the image: unsupported image processor size {size!r}")


def _crop_offset(ip: Any, length: int, crop: int) -> int:
    """Where a center crop of ``crop`` px starts in an image axis of ``length`` px (negative: the
    image is padded first), exactly as the processor's backend computes it."""
    if crop <= length:
        return (length - crop) // 2
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # pragma: no cover - transformers without backends: numpy center_crop
        PilBackend = None
    if PilBackend is not None and not isinstance(ip, PilBackend):
        return -((crop - length) // 2)  # torchvision backend: pads floor(d/2) before
    return (length - crop) // 2  # numpy center_crop: pads ceil(d/2) before, i.e. floor(-d/2)


def _resize_and_crop(ip: Any, m: _Map, hw: tuple[int, int]) -> tuple[_Map, tuple[int, int]]:
    """The standard ``resize(size)`` -> ``center_crop(crop_size)`` steps of a processor."""
    if getattr(ip, "do_resize", True) and getattr(ip, "size", None) is not None:
        new = _resized_hw(ip.size, *hw)
        m, hw = m.resize(hw, new), new
    crop = getattr(ip, "crop_size", None)
    if getattr(ip, "do_center_crop", False) and crop is not None:
        ch, cw = int(_get(crop, "height")), int(_get(crop, "width"))
        top, left = _crop_offset(ip, hw[0], ch), _crop_offset(ip, hw[1], cw)
        m, hw = m.shift(-left, -top), (ch, cw)
    return m, hw


def _patch_size(vision_config: Any) -> tuple[int, int]:
    return _hw(vision_config.patch_size)


# -- families -----------------------------------------------------------------------------------
def _llava(lvlm, image: Image.Image, batch: dict) -> list[ViewRegions]:
    ip = lvlm.processor.image_processor
    width, height = image.size
    m, hw = _Map(), (height, width)
    if getattr(ip, "do_pad", False) and hasattr(ip, "pad_to_square"):  # LlavaImageProcessor: square first
        side = max(hw)
        m, hw = m.shift((side - width) // 2 if width < side else 0, (side - height) // 2 if height < side else 0), (side, side)
    m, hw = _resize_and_crop(ip, m, hw)
    pixels = tuple(batch["pixel_values"].shape[-2:])
    if hw != pixels:
        raise OptionError(f"token geometry: expected a {hw} processed image, the processor made {pixels}")
    ph, pw = _patch_size(lvlm.model.config.vision_config)
    boxes = m.back(_grid_boxes(hw[0] // ph, hw[1] // pw, ph, pw))
    return [ViewRegions("image", (hw[0] // ph, hw[1] // pw), _clip(boxes, width, height))]


def _llava_next(lvlm, image: Image.Image, batch: dict) -> list[ViewRegions]:
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    ip = lvlm.processor.image_processor
    cfg = lvlm.model.config
    width, height = image.size
    size, crop = ip.size, getattr(ip, "crop_size", None)
    if _get(size, "height") and _get(size, "width"):
        base_hw = (int(_get(size, "height")), int(_get(size, "width")))
    else:
        base_hw = (int(_get(size, "shortest_edge")),) * 2
    crop_px = int(_get(crop, "height") or _get(size, "height") or _get(size, "shortest_edge"))
    ph, pw = _patch_size(cfg.vision_config)

    # base view: the whole image squashed to base_hw, then the per-crop resize + center crop
    m, hw = _resize_and_crop(ip, _Map().resize((height, width), base_hw), base_hw)
    side_h, side_w = hw[0] // ph, hw[1] // pw
    tile = _grid_boxes(side_h, side_w, ph, pw)  # token boxes in a processed crop's pixels
    views = [ViewRegions("base", (side_h, side_w), _clip(m.back(tile), width, height))]

    # high-res: resize into the best pinpoint resolution (aspect kept), centre-pad, cut into crops
    best = select_best_resolution((height, width), ip.image_grid_pinpoints)
    new_hw = get_patch_output_size(_dummy(height, width), best, input_data_format=ChannelDimension.FIRST)
    canvas = _Map().resize((height, width), new_hw).shift((best[1] - new_hw[1]) // 2, (best[0] - new_hw[0]) // 2)
    nph, npw = -(-best[0] // crop_px), -(-best[1] // crop_px)
    model_grid = tuple(get_anyres_image_grid_shape((height, width), cfg.image_grid_pinpoints, cfg.vision_config.image_size))
    if model_grid != (nph, npw):
        raise OptionError(f"token geometry: the processor cuts {nph}x{npw} crops, the model expects {model_grid}")
    if batch["pixel_values"].shape[1] != 1 + nph * npw:
        raise OptionError(f"token geometry: expected 1 + {nph * npw} crops, the processor made {batch['pixel_values'].shape[1]}")
    crop_map, _ = _resize_and_crop(ip, _Map(), (crop_px, crop_px))  # crop pixels -> processed crop pixels
    # every stitched token's box in original pixels: crop (r, c) of the canvas starts at (c, r) * crop_px
    stitched = np.zeros((nph * side_h, npw * side_w, 4))
    for r in range(nph):
        for c in range(npw):
            in_crop = crop_map.back(tile)  # crop pixels
            in_crop[:, [0, 2]] += c * crop_px
            in_crop[:, [1, 3]] += r * crop_px
            stitched[r * side_h:(r + 1) * side_h, c * side_w:(c + 1) * side_w] = canvas.back(in_crop).reshape(side_h, side_w, 4)
    # which stitched tokens survive: the model's own unpad_image on token coordinates (as the adapter)
    rows, cols = torch.meshgrid(torch.arange(nph * side_h), torch.arange(npw * side_w), indexing="ij")
    kept = unpad_image(torch.stack([rows, cols]).float(), (height, width)).long()  # [2, h, w]
    h, w = kept.shape[1:]
    boxes = stitched[kept[0].reshape(-1).numpy(), kept[1].reshape(-1).numpy()]
    views.append(ViewRegions("high-res", (h, w), _clip(boxes, width, height)))
    return views


def _qwen(lvlm, image: Image.Image, batch: dict) -> list[ViewRegions]:
    ip = lvlm.processor.image_processor
    width, height = image.size
    _, gh, gw = (int(v) for v in batch["image_grid_thw"][0].tolist())  # patches of the resized image
    patch, merge = int(ip.patch_size), int(ip.merge_size)
    if merge != int(lvlm.model.model.visual.spatial_merge_size):
        raise OptionError(f"token geometry: processor merge_size {merge} != the model's spatial_merge_size")
    resized = (gh * patch, gw * patch)
    m = _Map().resize((height, width), resized)
    boxes = m.back(_grid_boxes(gh // merge, gw // merge, merge * patch, merge * patch))
    return [ViewRegions("image", (gh // merge, gw // merge), _clip(boxes, width, height))]


def _internvl(lvlm, image: Image.Image, batch: dict) -> list[ViewRegions]:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    ip = lvlm.processor.image_processor
    cfg = lvlm.model.config
    width, height = image.size
    th, tw = int(_get(ip.size, "height")), int(_get(ip.size, "width"))
    max_tiles = int(getattr(ip, "max_patches", 1))
    if getattr(ip, "crop_to_patches", False) and max_tiles > 1:
        cols, rows = get_optimal_tiled_canvas((height, width), (th, tw), int(getattr(ip, "min_patches", 1)), max_tiles)
    else:
        cols = rows = 1
    n_tiles = cols * rows + (1 if cols * rows > 1 else 0)
    if n_tiles != batch["pixel_values"].shape[0]:
        raise OptionError(f"token geometry: expected {n_tiles} tiles, the processor made {batch['pixel_values'].shape[0]}")
    # the tokens of one tile: the patch blocks the model's pixel_shuffle folds together
    ph, pw = _patch_size(cfg.vision_config)
    side = th // ph
    if tw // pw != side:
        raise OptionError(f"token geometry: non-square InternVL tiles ({th}x{tw} px) are not supported")
    index = torch.arange(side * side, dtype=torch.float32).view(1, side, side, 1)
    groups = lvlm.model.model.pixel_shuffle(index, scale_factor=cfg.downsample_ratio)  # [1, s, s, k]
    s = groups.shape[1]
    patches = groups.reshape(s * s, -1).long().numpy()  # [tokens, k] patch indices (raster over side x side)
    pr, pc = patches // side, patches % side
    tile = np.stack([pc.min(1) * pw, pr.min(1) * ph, (pc.max(1) + 1) * pw, (pr.max(1) + 1) * ph], 1).astype(np.float64)

    views = []
    canvas = _Map().resize((height, width), (rows * th, cols * tw))
    for i in range(cols * rows):
        r, c = divmod(i, cols)
        m = canvas.shift(-c * tw, -r * th)
        label = "image" if cols * rows == 1 else f"tile {i + 1}"
        views.append(ViewRegions(label, (s, s), _clip(m.back(tile), width, height)))
    if cols * rows > 1:
        thumb = _Map().resize((height, width), (th, tw))
        views.append(ViewRegions("thumbnail", (s, s), _clip(thumb.back(tile), width, height)))
    return views


def _llava_onevision(lvlm, image: Image.Image, batch: dict) -> list[ViewRegions]:
    """LLaVA-NeXT's geometry (the same crops, padding and unpadding); an ``anyres_max`` downsampled
    high-res grid ``h' x w'`` makes token ``(a, b)`` the footprint of unpadded rows
    ``[a h / h', (a + 1) h / h')`` and columns ``[b w / w', (b + 1) w / w')`` (fractional rows mapped
    linearly inside a row): bilinear downsampling centres each token there."""
    views = _llava_next(lvlm, image, batch)
    width, height = image.size
    layout = lvlm._layout((height, width))
    if not layout.downsampled:
        return views
    (h, w), (oh, ow) = layout.unpadded, layout.out
    boxes = views[1].boxes.reshape(h, w, 4)
    ys = np.concatenate([boxes[:, 0, 1], boxes[-1:, 0, 3]])  # row edges of the unpadded grid, h + 1 knots
    xs = np.concatenate([boxes[0, :, 0], boxes[0, -1:, 2]])
    y = np.interp(np.arange(oh + 1) * h / oh, np.arange(h + 1), ys)
    x = np.interp(np.arange(ow + 1) * w / ow, np.arange(w + 1), xs)
    out = np.stack(np.broadcast_arrays(x[None, :-1], y[:-1, None], x[None, 1:], y[1:, None]), -1).reshape(-1, 4)
    return [views[0], ViewRegions("high-res", (oh, ow), out)]


# Qwen3-VL: Qwen2-VL's processor geometry (patch_size read from the processor: 16 px)
_FAMILIES = {"llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen, "qwen3_vl": _qwen, "internvl": _internvl,
             "llava_onevision": _llava_onevision}


# -- video frames ----------------------------------------------------------------------------------
def _center_crop_offset(length: int, crop: int) -> int:
    """Where a centre crop of ``crop`` px starts in an axis of ``length`` px, as the frame processors
    (:func:`tokenprune.media.processors.frames.center_crop_frames`) and transformers' video processors
    cut it: ``(length - crop) // 2``; a frame smaller than the crop is padded ``(crop - length) // 2`` before."""
    return (length - crop) // 2 if crop <= length else -((crop - length) // 2)


def _video_frame_map(lvlm, video: Any, batch: dict) -> tuple[_Map, tuple[int, int]]:
    """``(map, (h, w))``: original frame pixels -> the pixels of the processed frame that a video view's
    token grid covers, and that frame's size.

    Frames resized to a size and centre-cropped (LLaVA-NeXT-Video: shortest edge, then the crop) map
    through the resize and the crop; every other family resizes the whole frame to the processed size
    (Qwen's ``smart_resize``, OneVision's and InternVL's squash to the tower's square), so the grid
    covers the whole frame and the identity map (``(h, w)`` = the frame's own size) is exact.
    """
    height, width = video.size
    vp = getattr(lvlm.processor, "video_processor", None)
    crop = getattr(vp, "crop_size", None)
    if vp is None or not getattr(vp, "do_center_crop", False) or crop is None:
        return _Map(), (height, width)
    m, hw = _Map(), (height, width)
    if getattr(vp, "do_resize", True) and getattr(vp, "size", None) is not None:
        new = _resized_hw(vp.size, height, width)
        m, hw = m.resize(hw, new), new
    ch, cw = int(_get(crop, "height")), int(_get(crop, "width"))
    m = m.shift(-_center_crop_offset(hw[1], cw), -_center_crop_offset(hw[0], ch))
    pixels = batch.get("pixel_values_videos")
    if pixels is not None and pixels.dim() >= 4 and tuple(pixels.shape[-2:]) != (ch, cw):
        raise OptionError(f"token geometry: expected {ch}x{cw} processed video frames, the processor made "
                          f"{tuple(pixels.shape[-2:])}")
    return m, (ch, cw)


def video_regions(lvlm, video: Any, prompt: str = "Describe the video.", *,
                  views: Sequence[Any] | None = None) -> list[ViewRegions]:
    """Per prunable view of one video sample (one per frame; Qwen: per temporal patch of 2 frames), each
    token's box in pixels of the view's (first) frame.

    A frame view's grid covers its processed frame, cell by cell (Qwen: ``merge x merge`` patches of the
    smart-resized frame; OneVision: the bilinearly pooled grid of the squashed frame; LLaVA-NeXT-Video: the
    2x2-average-pooled patches of the centre crop; InternVL: pixel-shuffled patch blocks of the frame
    squashed to one tile); cells map back to the original frame through the resize (and crop)
    proportionally, see :func:`_video_frame_map`.

    Args:
        lvlm: a video-capable :class:`~tokenprune.adapters.base.PrunableLVLM`.
        video: a :class:`tokenprune.media.Video`.
        prompt: the question.
        views: this sample's views (objects with ``grid``, ``prunable``, ``clip``, ``frame``, ``time``;
            ``lvlm.encode([video], [prompt]).views`` or what a sweep stored); ``None``: encoded here
            (one vision pass, for the grids).

    Raises:
        OptionError: a view is not a video frame, or the processed frames are not the expected size.
    """
    batch = lvlm.prepare([video], [prompt])  # also attaches the family's video processor, read below
    if views is None:
        views = lvlm.encode([video], [prompt]).views
    prunable = [v for v in views if getattr(v, "prunable", True) and getattr(v, "sample", 0) == 0]
    if any(getattr(v, "frame", None) is None for v in prunable):
        raise OptionError("token regions of a sample that mixes video frames and images are not supported: "
                          "draw the video and the images separately")
    height, width = video.size
    m, (ph, pw) = _video_frame_map(lvlm, video, batch)
    starts = sorted({int(v.frame) for v in prunable})
    out = []
    for v in prunable:
        gh, gw = (int(g) for g in v.grid)
        f = int(v.frame)
        later = [s for s in starts if s > f]
        covered = tuple(range(f, min(later[0] if later else video.num_frames, video.num_frames))) or (f,)
        boxes = m.back(_grid_boxes(gh, gw, ph / gh, pw / gw))
        label = f"frame {f}" if len(covered) == 1 else f"frames {covered[0]}-{covered[-1]}"
        time = getattr(v, "time", None)
        out.append(ViewRegions(label, (gh, gw), _clip(boxes, width, height), clip=getattr(v, "clip", 0), frame=f,
                               frames=covered, time=None if time is None else float(time)))
    return out


def token_regions(lvlm, image: Any, prompt: str = "Describe the image.", *,
                  views: Sequence[Any] | None = None) -> list[ViewRegions]:
    """Per prunable view of this one image (or video), the region of the original image each visual token covers.

    Runs the model's processor on ``(image, prompt)`` (no vision tower) and replays its geometry;
    see the module docstring for each family. The result lines up with the prunable views of
    ``lvlm.encode([image], [prompt]).views``: same order, same grids, tokens in raster order.
    A :class:`tokenprune.media.Video` goes to :func:`video_regions` (one view per frame, boxes in
    frame pixels).

    Args:
        lvlm: a :class:`~tokenprune.adapters.base.PrunableLVLM` (``tokenprune.load`` / ``wrap``).
        image: the original image (any size; its pixel coordinates are the boxes' frame), or a video.
        prompt: the question (only the processor batch is built from it).
        views: optionally, this sample's views from ``lvlm.encode`` (prunable or all): the grids
            are checked against them, and a mismatch raises instead of drawing wrong regions.
    """
    from ..media import Video

    if isinstance(image, Video):
        return video_regions(lvlm, image, prompt, views=views)
    if not isinstance(image, Image.Image):
        raise OptionError(f"token regions take one PIL image or a tokenprune.Video, got {type(image).__name__} "
                          "(multi-image prompts: draw one image at a time)")
    family = getattr(lvlm, "family", None)
    if family not in _FAMILIES:
        raise OptionError(f"token regions are not implemented for model family {family!r} "
                          f"(supported: {', '.join(sorted(_FAMILIES))})")
    batch = lvlm.prepare([image], [prompt])
    regions = _FAMILIES[family](lvlm, image, batch)
    if views is not None:
        grids = [tuple(int(g) for g in v.grid) for v in views if getattr(v, "prunable", True)]
        if grids != [r.grid for r in regions]:
            raise OptionError(f"token geometry does not match the model's views: regions {[r.grid for r in regions]}, "
                              f"views {grids}")
    return regions
