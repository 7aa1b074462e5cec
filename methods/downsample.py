"""Downsample (VTC-Bench, ACL'26, arXiv 2510.07143): the image itself shrunk before the processor, not its tokens.

As the official code ``Chenfei-Liao/VTC-Bench@983e443``, ``external/DART/lmms-eval/lmms_eval/models/qwen2_vl.py``
``Qwen2_VL.generate_until`` L243-281 (``image_ratio = int(os.environ["VTC_IMAGE_RATIO"])``): each image (every
image of a multi-image prompt) is resized to ``(w // r, h // r)`` with PIL ``BICUBIC`` when ``r > 1``, then, for
every ``r`` (1 included), saved as JPEG (PIL's default quality 75) and decoded again (qwen_vl_utils
``fetch_image``) before the processor. The processor then does what it always does with an image of that size.
``tools/analyze_results.py`` pairs each ``r`` with the token budget ``1 / r^2``
(``DOWNSAMPLE_TO_BUDGET = {1: 1, 2: 0.25, 3: 0.1111, 4: 0.0625, 5: 0.04, 10: 0.01}``) and scores methods on the
samples the unpruned model answers right and Downsample(r) answers wrong ("difficult", group A).

**ratio -> r.** ``r = 1 / sqrt(ratio)``, snapped to the nearest integer when within 0.1 % of it (so the
benchmark's budgets, 0.1111 included, give its integer ``r`` and the exact ``w // r``); otherwise the size is
``floor(w / r)`` (0.5 -> r = 1.414, 0.1 -> 3.162). ``factor=r`` sets ``r`` directly (``VTC_IMAGE_RATIO``; ``ratio``
is then unused). A side never goes below 1 pixel (the official code would fail there).

**What it means per family** (the kept count is whatever the processor makes of the shrunk image; runs report it):

| family | processor | effect of shrinking by r |
| --- | --- | --- |
| Qwen2-VL / 2.5-VL / 3-VL | ``smart_resize`` to multiples of 28 (32 for Qwen3-VL) within ``[min_pixels, max_pixels]`` | tokens ~ ``N / r^2`` (the benchmark's setting); rounding to the patch multiple, and the ``min_pixels`` floor for small images, move it off exactly |
| LLaVA-NeXT, LLaVA-OneVision (any-res) | best-fit grid of crops for the image's size, plus the base view | fewer crops (fewer tokens) once the shrunk image fits a smaller grid; the base view is fixed-size, so the count falls in steps, not as ``1 / r^2`` |
| InternVL (dynamic tiles) | the tile grid closest to the aspect ratio (at most ``max_patches``); of grids with the same aspect, the larger only when the image has the area for it | fewer tiles once the shrunk image is small (the tiny InternVL: 160 px -> 80 tokens, 40 px -> 16); otherwise the same count, less detail per tile |
| LLaVA-1.5, the demo (fixed resolution) | resized to the fixed input size (336 / 224 px) | **same token count, less detail**: the shrunk image is upsampled back, so every token sees ``1 / r^2`` of the pixels' information; the token-matched analogue is ``pool`` |
| video (any family) | frames | each frame resized the same way (no JPEG); VTC-Bench leaves videos untouched (``video=false`` does too) |

This is a pre-LLM method whose :meth:`select` keeps every token the processor produced: the reduction happens to
the image, through :meth:`~tokenprune.adapters.base.PrunableLVLM.encode`, which applies
:meth:`DownsampleNeeds.transform_visual` to each visual before the processor
(:func:`tokenprune.adapters.visuals.transform_visuals`). Its ``needs`` are their own, so a sweep never shares a
vision pass between ``downsample`` and another method.

Options:

| option | official default | what it does |
| --- | --- | --- |
| ``ratio`` (0.5) | -- | the token budget ``1 / r^2`` (above) |
| ``factor`` (``None``) | ``VTC_IMAGE_RATIO`` (1) | ``r`` itself, >= 1; ``ratio`` unused |
| ``jpeg`` (``True``) | always | the JPEG round trip of every image, ``r = 1`` included (so ratio 1 is *not* the unpruned input unless ``jpeg=false``) |
| ``quality`` (75) | PIL's default | JPEG quality |
| ``video`` (``True``) | untouched | also shrink video frames (``False``: the official no-op) |

**Deliberate differences.** (1) The official code hands qwen_vl_utils the JPEG, which resizes it with PIL to the
``smart_resize`` shape before the processor (a no-op resize there); here the processor resizes it (same shape for
images under the processor's ``max_pixels``, its own bicubic). (2) Defined for every family and for video frames,
where the official has no code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.visuals import Visual, shrink_visual
from ..errors import OptionError
from ..pruner import PrunerNeeds, PruningInputs, Reduction, TokenPruner, register_pruner, validate_float, validate_int, validate_ratio

# tools/analyze_results.py: downsample factor -> the token budget it stands for
DOWNSAMPLE_TO_BUDGET = {1: 1.0, 2: 0.25, 3: 0.1111, 4: 0.0625, 5: 0.04, 10: 0.01}
SNAP = 1e-3  # relative distance within which 1 / sqrt(ratio) counts as an integer factor


def factor_for(ratio: float) -> float:
    """``r = 1 / sqrt(ratio)``, snapped to the nearest integer within 0.1 % (0.1111 -> 3)."""
    r = 1.0 / math.sqrt(ratio)
    near = round(r)
    return float(near) if abs(r - near) <= SNAP * r else r


@dataclass(frozen=True)
class DownsampleNeeds(PrunerNeeds):
    """:class:`PrunerNeeds` of ``downsample``: nothing from the tower, but the visuals shrunk before the processor.

    Attributes:
        factor: ``r``: each side becomes ``side // r`` (``floor(side / r)`` for a non-integer ``r``).
        jpeg: the JPEG round trip after the resize (``r = 1`` too).
        quality: its JPEG quality.
        video: shrink video frames too.
    """

    factor: float = 1.0
    jpeg: bool = True
    quality: int = 75
    video: bool = True

    def transform_visual(self, visual: Visual) -> Visual:
        """One sample's visual as the processor should get it."""
        return shrink_visual(visual, self.factor, self.jpeg, self.quality, self.video)

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out["image"] = f"shrunk by {self.factor:g} before the processor" + (", JPEG round trip" if self.jpeg else "")
        return out


def _validate_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be true or false, got {value!r}")
    return value


@register_pruner("downsample")
class DownsamplePruner(TokenPruner):
    """Downsample (VTC-Bench): the image shrunk by 1/sqrt(ratio) a side before the processor (JPEG round trip, as the official)."""

    quantised = True  # the count is the processor's, not keep_count(ratio, N)

    def __init__(self, ratio: float = 0.5, factor: float | None = None, jpeg: bool = True, quality: int = 75,
                 video: bool = True):
        self.ratio = validate_ratio(ratio)
        self.factor = None if factor is None else validate_float(factor, "factor")
        if self.factor is not None and self.factor < 1:
            raise OptionError(f"factor must be >= 1 (each side of the image is divided by it), got {factor!r}")
        self.jpeg = _validate_bool(jpeg, "jpeg")
        self.quality = validate_int(quality, "quality", minimum=1)
        if self.quality > 95:
            raise OptionError(f"quality must be in 1..95 (PIL's JPEG range), got {quality!r}")
        self.video = _validate_bool(video, "video")

    @property
    def shrink(self) -> float:
        """``r``: ``factor`` if given, else from ``ratio``."""
        return self.factor if self.factor is not None else factor_for(self.ratio)

    @property
    def needs(self) -> DownsampleNeeds:
        return DownsampleNeeds(factor=self.shrink, jpeg=self.jpeg, quality=self.quality, video=self.video)

    @property
    def uses_ratio(self) -> bool:
        return self.factor is None

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """Every token of the shrunk image (the processor chose how many there are)."""
        return n_tokens

    def select(self, inputs: PruningInputs) -> Reduction:
        """Keep all ``N`` tokens: ``[B, N]`` indices, the grid unchanged."""
        indices = torch.arange(inputs.num_tokens, device=inputs.tokens.device).expand(inputs.batch_size, -1)
        return Reduction(indices=indices, grid=inputs.grid)
