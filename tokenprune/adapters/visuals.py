"""What a sample shows the model, and how it becomes the processor's text and media inputs.

Every entry point (:meth:`~tokenprune.adapters.base.PrunableLVLM.generate`, ``loglikelihood``,
``encode``) takes, per sample, one *visual*: a PIL image, a list of PIL images (a multi-image
prompt), or a :class:`tokenprune.media.Video`. A batch may mix them. This module turns them into
the chat content the processor's template renders (``{"type": "image"}`` / ``{"type": "video"}``
parts, at the prompt's placeholders or first) and the flat image and video lists the processor
consumes in prompt order. It knows nothing about a model family: a family says only what its raw
placeholders are and how its processor takes videos (see ``PrunableLVLM.video_inputs``).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from PIL import Image

from ..errors import OptionError

IMAGE_PLACEHOLDER = "<image>"  # where a prompt may place an image (lmms-eval's and LLaVA's convention)
VIDEO_PLACEHOLDER = "<video>"  # where a prompt may place its video

Visual = Union[Image.Image, Sequence[Image.Image], Any]  # Any: tokenprune.media.Video (imported lazily)


@dataclass
class SampleVisuals:
    """One sample's media in prompt order: ``images`` (a multi-image prompt) or one video in ``videos``."""

    images: list[Image.Image] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``"video"`` or ``"image"`` (a sample holds one kind)."""
        return "video" if self.videos else "image"


def _count(n: int, kind: str) -> str:
    return f"one {kind}" if n == 1 else f"{n} {kind}s"


def _is_video(obj: Any) -> bool:
    from ..media import Video

    return isinstance(obj, Video)


def split_visuals(visuals: Sequence[Visual]) -> list[SampleVisuals]:
    """Each sample's visual as :class:`SampleVisuals`.

    Raises:
        OptionError: an entry is neither a PIL image, a non-empty list of them, nor a ``Video``.
    """
    out = []
    for i, v in enumerate(visuals):
        if isinstance(v, Image.Image):
            out.append(SampleVisuals(images=[v]))
        elif _is_video(v):
            out.append(SampleVisuals(videos=[v]))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, Image.Image) for x in v):
            out.append(SampleVisuals(images=list(v)))
        else:
            what = "an empty list" if isinstance(v, (list, tuple)) and not v else type(v).__name__
            raise OptionError(f"sample {i}: got {what}; give a PIL image, a list of PIL images, or a "
                              "tokenprune.Video (tokenprune.Video.from_file(path) reads a video file)")
    return out


def user_content(prompt: str, visuals: SampleVisuals | None = None) -> list[dict[str, str]]:
    """The user turn's content for ``prompt`` showing ``visuals`` (default: one image).

    Images go where the prompt writes :data:`IMAGE_PLACEHOLDER` (once per image) and a video where it
    writes :data:`VIDEO_PLACEHOLDER`; a prompt without placeholders gets all of them first.
    Whitespace around a placeholder is dropped.

    Raises:
        OptionError: the prompt holds placeholders, but not exactly one per image (or video).
    """
    visuals = visuals if visuals is not None else SampleVisuals(images=[Image.new("RGB", (1, 1))])
    kind, mark = ("video", VIDEO_PLACEHOLDER) if visuals.videos else ("image", IMAGE_PLACEHOLDER)
    count = len(visuals.videos) if visuals.videos else len(visuals.images)
    found = prompt.count(mark)
    if found == 0:
        return [{"type": kind} for _ in range(count)] + [{"type": "text", "text": prompt}]
    if found != count:
        raise OptionError(f"the prompt shows {_count(count, kind)}, but has {found} {mark!r} "
                          f"placeholders (write one per {kind}, or none to put them first): {prompt[:80]!r}")
    parts: list[dict[str, str]] = []
    pieces = prompt.split(mark)
    for j, piece in enumerate(pieces):
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
        if j < len(pieces) - 1:
            parts.append({"type": kind})
    return parts


def raw_prompt(prompt: str, visuals: SampleVisuals, image_placeholder: str, video_placeholder: str,
               family: str = "this model") -> str:
    """``chat_template=False``: ``prompt`` as given, checked to place each of its visuals.

    It must hold the family's placeholder once per image (or once for its video). tokenprune's own
    ``<image>`` / ``<video>`` (as lmms-eval contexts write them) are mapped to the family's, so one
    prompt text serves every family.

    Raises:
        OptionError: the placeholders do not match the visuals (one line: what to write).
    """
    kind, mine, theirs = (("video", VIDEO_PLACEHOLDER, video_placeholder) if visuals.videos
                          else ("image", IMAGE_PLACEHOLDER, image_placeholder))
    count = len(visuals.videos) if visuals.videos else len(visuals.images)
    n = prompt.count(theirs)
    if n == 0 and theirs != mine and prompt.count(mine) == count:
        prompt, n = prompt.replace(mine, theirs), count
    if n == 0:
        raise OptionError(f"chat_template=False passes prompts as given, so each must place its {kind}: write "
                          f"{theirs!r} (the {family} {kind} placeholder) where the {kind} goes; got {prompt[:80]!r}")
    if n != count:
        raise OptionError(f"the prompt shows {_count(count, kind)}, but has {n} {theirs!r} "
                          f"placeholders: {prompt[:80]!r}")
    return prompt


def render(processor: Any, prompt: str, template: str | None, visuals: SampleVisuals | None = None) -> str:
    """``prompt`` (with ``visuals``) as one user turn through the chat template, generation prompt added."""
    extra = {} if template is None else {"chat_template": template}
    return processor.apply_chat_template([{"role": "user", "content": user_content(prompt, visuals)}],
                                         add_generation_prompt=True, tokenize=False, **extra)


# -- image-level methods: the visual itself changed before the processor --------------------------------
def shrink_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(w, h)`` shrunk by ``factor`` as VTC-Bench does (``(w // r, h // r)``; a non-integer ``factor``:
    ``floor(w / r)``), at least 1 pixel a side."""
    w, h = size
    if float(factor).is_integer():
        r = int(factor)
        return max(1, w // r), max(1, h // r)
    return max(1, math.floor(w / factor)), max(1, math.floor(h / factor))


def jpeg_roundtrip(image: Image.Image, quality: int = 75) -> Image.Image:
    """``image`` saved as JPEG (PIL's default quality 75, as VTC-Bench's ``save(buffer, format="JPEG")``) and
    decoded again as RGB (qwen_vl_utils ``fetch_image``'s ``Image.open(BytesIO(data)).convert("RGB")``)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def shrink_image(image: Image.Image, factor: float, jpeg: bool = True, quality: int = 75) -> Image.Image:
    """VTC-Bench's Downsample of one image (``Qwen2_VL.generate_until``): ``resize(shrink_size, BICUBIC)`` when
    ``factor > 1`` (``factor == 1``: the image as is), then the JPEG round trip when ``jpeg`` (official: always,
    ``factor == 1`` included)."""
    if factor > 1:
        image = image.resize(shrink_size(image.size, factor), resample=Image.BICUBIC)
    return jpeg_roundtrip(image, quality) if jpeg else image


def shrink_visual(visual: Visual, factor: float, jpeg: bool = True, quality: int = 75, video: bool = True) -> Visual:
    """One sample's visual shrunk before the processor: an image, each image of a list, or (``video``) each
    frame of a :class:`tokenprune.media.Video` (resized only: VTC-Bench leaves videos untouched, so neither a
    resize nor a JPEG round trip is official there)."""
    if isinstance(visual, Image.Image):
        return shrink_image(visual, factor, jpeg, quality)
    if isinstance(visual, (list, tuple)):
        return [shrink_image(v, factor, jpeg, quality) for v in visual]
    if _is_video(visual):
        if not video or factor <= 1:
            return visual
        import dataclasses

        import numpy as np

        frames = [np.asarray(f.resize(shrink_size(f.size, factor), resample=Image.BICUBIC))
                  for f in visual.pil_frames()]
        return dataclasses.replace(visual, frames=np.stack(frames))
    return visual


def transform_visuals(visuals: Sequence[Visual], needs: Any) -> Sequence[Visual]:
    """``visuals`` as an image-level method wants them before the processor: ``needs.transform_visual`` applied
    to each (the :class:`~tokenprune.pruner.PrunerNeeds` of ``downsample``), or ``visuals`` unchanged when
    ``needs`` has none (every token-level method)."""
    fn = getattr(needs, "transform_visual", None)
    if fn is None:
        return visuals
    return [fn(v) for v in visuals]
