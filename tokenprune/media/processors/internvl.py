"""InternVL's video preprocessor without torchvision: every frame becomes one image tile.

InternVL has no video tower: ``InternVLProcessor`` flattens ``pixel_values_videos [V, T, 3, S, S]``
into ``pixel_values`` as ``T`` single tiles per video (``S`` = the tile size) and writes, per video,
``Frame1: <img>`` + ``image_seq_length`` x ``<IMG_CONTEXT>`` + ``</img>``, one line per frame. So a
frame must be exactly what the image path makes of a one-tile image: resized to the tile (no tiling,
no thumbnail), ``/255``, normalised with the image processor's mean and std -- what transformers'
``InternVLVideoProcessor`` does (its hub configs use the image tile size) and what
:class:`~tokenprune.media.processors.frames.FramesProcessor` does with plain torch. Frames are never
sampled here (a :class:`tokenprune.media.Video` is sampled already).
"""
from __future__ import annotations

from typing import Any

from ...errors import OptionError
from .frames import FramesProcessor


def tile_size(image_processor: Any) -> tuple[int, int]:
    """``(height, width)`` of one InternVL tile: the (GotOcr2) image processor's ``size``.

    Raises:
        OptionError: the size has no height/width (not a tiling image processor).
    """
    size = image_processor.size
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    height, width = get("height"), get("width")
    if height is None or width is None:
        raise OptionError(f"the InternVL image processor's size {size} has no height/width: set "
                          "image_processor.size = {'height': S, 'width': S} (S = the vision tower's image size)")
    return int(height), int(width)


def internvl_video_processor(image_processor: Any) -> FramesProcessor:
    """The torchvision-free video processor for an InternVL processor: ``videos [T, H, W, 3] uint8 ->
    pixel_values_videos [V, T, 3, S, S]`` float32, each frame resized to the tile size ``S x S``
    (bicubic, antialiased, rounded to whole grey levels as torchvision's uint8 resize), ``/255`` and
    normalised with ``image_processor``'s mean / std; ``do_sample_frames=True`` is refused."""
    h, w = tile_size(image_processor)
    return FramesProcessor.from_image_processor(image_processor, size={"height": h, "width": w},
                                                crop_size=None, do_center_crop=False)
