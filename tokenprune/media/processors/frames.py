"""Frames -> ``pixel_values_videos [B, T, 3, H, W]``: a torchvision-free video preprocessor.

For families whose video tensor is simply every frame resized and normalised as an image is
(LLaVA-OneVision, LLaVA-NeXT-Video; InternVL's frames-as-tiles can use :func:`preprocess_frames`
alone). It does what transformers' ``BaseVideoProcessor`` does for these families, with plain torch:

1. resize each frame to the output size (``size``: ``{"height", "width"}``, ``{"shortest_edge"}``
   optionally with ``"longest_edge"``, or ``{"max_height", "max_width"}``, sizes computed by
   transformers' own helpers) with ``F.interpolate(mode="bicubic", antialias=True)`` on the frames as
   floats, width then height, clamped to ``[0, 255]`` and rounded after each pass, as torchvision's
   resize of uint8 frames (which transformers' video processors call on CPU) does; a frame already at
   the output size is not resampled;
2. optionally centre-crop to ``crop_size`` (offsets ``(H - h) // 2``, ``(W - w) // 2``, as transformers);
3. multiply by ``rescale_factor`` (``1 / 255``), normalise with ``image_mean`` / ``image_std``.

:class:`FramesProcessor` wraps that as an object the Hugging Face processor can call as its
``video_processor`` (``processor.video_processor = FramesProcessor.from_image_processor(ip)``):
``FramesProcessor(videos)`` returns a ``BatchFeature`` holding ``pixel_values_videos`` ``[B, T, 3, H, W]``
float32. It does not sample frames (:mod:`tokenprune.media` does, before): ``do_sample_frames=True``
is refused. Where the per-pixel result is compared with an image processor's (same size, no
resize), they agree to float rounding; resized frames are within 1 grey level of torchvision's uint8
resize (``benchmarks/video_processor_parity.py``, in a side environment with torchvision).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ...errors import OptionError

SIZE_KEYS = (("height", "width"), ("shortest_edge",), ("shortest_edge", "longest_edge"), ("max_height", "max_width"))
# The per-call keyword arguments that override a FramesProcessor's settings.
SETTINGS = ("size", "crop_size", "image_mean", "image_std", "do_resize", "do_center_crop", "do_rescale",
            "rescale_factor", "do_normalize")


def _size_dict(size: Any, what: str = "size") -> dict[str, int]:
    """``size`` as a dict of ints (an int means a square ``{"height": s, "width": s}``), keys checked."""
    if hasattr(size, "__dict__") and not isinstance(size, dict):  # transformers' SizeDict
        size = {k: v for k, v in vars(size).items() if v is not None}
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not isinstance(size, dict):
        raise OptionError(f"frames {what} must be a dict such as {{'height': 384, 'width': 384}} or "
                          f"{{'shortest_edge': 224}}, got {size!r}")
    out = {k: int(v) for k, v in size.items() if v is not None}
    if tuple(sorted(out)) not in {tuple(sorted(k)) for k in SIZE_KEYS}:
        raise OptionError(f"frames {what} {size!r} is not supported: give {{'height', 'width'}}, "
                          "{'shortest_edge'} (optionally with 'longest_edge') or {'max_height', 'max_width'}")
    return out


def output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """``(h, w)`` a ``height x width`` frame is resized to for ``size``, computed as transformers' image and
    video processors do (``get_resize_output_image_size`` with ``default_to_square=False`` for a
    shortest edge, ``get_size_with_aspect_ratio`` with a longest edge too,
    ``get_image_size_for_max_height_width`` for a maximum)."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    size = _size_dict(size)
    if "height" in size:
        return size["height"], size["width"]
    if "max_height" in size:
        return tuple(get_image_size_for_max_height_width((height, width), size["max_height"], size["max_width"]))
    if "longest_edge" in size:
        return tuple(get_size_with_aspect_ratio((height, width), size["shortest_edge"], size["longest_edge"]))
    shape = np.empty((1, height, width), dtype=np.uint8)  # only its shape is read
    return tuple(get_resize_output_image_size(shape, size["shortest_edge"], default_to_square=False,
                                              input_data_format=ChannelDimension.FIRST))


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[T, 3, H, W]`` frames (uint8 or float on the 0..255 scale) -> ``[T, 3, h, w]`` float32 on the
    0..255 scale, bicubic with antialiasing, clamped and rounded to whole grey levels (torchvision's
    and PIL's uint8 output); returned unresampled (as float) when already ``size``."""
    x = frames.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    # Separable, width then height, back to whole grey levels between the passes: what torchvision's
    # uint8 resize (inside transformers' video processors, on CPU) does. One 2-D pass is up to ~20 grey
    # levels away from it on noisy frames; two passes are within 1.
    h, w = size
    if x.shape[-1] != w:
        x = F.interpolate(x, size=[x.shape[-2], w], mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0, 255).round_()
    if x.shape[-2] != h:
        x = F.interpolate(x, size=[h, w], mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0, 255).round_()
    return x


def center_crop_frames(frames: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """``[..., H, W]`` -> ``[..., h, w]``, the centre ``crop = (h, w)``: offsets ``(H - h) // 2`` and ``(W - w) // 2``
    (transformers' ``center_crop``); a frame smaller than the crop is zero-padded around it first."""
    h, w = crop
    height, width = frames.shape[-2:]
    if h > height or w > width:  # transformers pads with zeros, the frame centred
        ph, pw = max(h - height, 0), max(w - width, 0)
        frames = F.pad(frames, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        height, width = frames.shape[-2:]
    top, left = (height - h) // 2, (width - w) // 2
    return frames[..., top:top + h, left:left + w]


def _as_frames(video: Any) -> torch.Tensor:
    """One video -> ``[T, 3, H, W]`` tensor: an array / tensor ``[T, H, W, 3]`` (channels last, as
    :class:`tokenprune.media.Video` holds them) or ``[T, 3, H, W]``, or a list of PIL images / ``[H, W, 3]`` arrays."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in video])
    x = torch.as_tensor(np.asarray(video)) if not torch.is_tensor(video) else video
    if x.dim() != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise OptionError(f"a video must be frames [T, H, W, 3] (or [T, 3, H, W]), got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x


def preprocess_frames(frames: Any, size: dict[str, int] | None, image_mean: Sequence[float], image_std: Sequence[float],
                      crop_size: dict[str, int] | None = None, rescale_factor: float = 1 / 255,
                      do_resize: bool = True, do_center_crop: bool = False, do_rescale: bool = True,
                      do_normalize: bool = True) -> torch.Tensor:
    """One video's frames -> ``[T, 3, H, W]`` float32 model input (resize, centre crop, rescale, normalise).

    Args:
        frames: ``[T, H, W, 3]`` uint8 (numpy or torch; ``[T, 3, H, W]`` also taken) or a list of PIL frames.
        size: the output size (see :func:`output_size`); ``None`` or ``do_resize=False``: frames kept as they are.
        image_mean / image_std: per-channel normalisation (after rescaling).
        crop_size: ``{"height", "width"}`` of the centre crop, with ``do_center_crop``.
        rescale_factor: multiplies the 0..255 pixels (``1 / 255``), with ``do_rescale``.
    """
    x = _as_frames(frames)
    if do_resize and size is not None:
        x = resize_frames(x, output_size(int(x.shape[-2]), int(x.shape[-1]), size))
    else:
        x = x.float()
    if do_center_crop and crop_size is not None:
        c = _size_dict(crop_size, "crop_size")
        if "height" not in c:
            raise OptionError(f"frames crop_size must be {{'height', 'width'}}, got {crop_size!r}")
        x = center_crop_frames(x, (c["height"], c["width"]))
    if do_rescale:
        x = x * rescale_factor
    if do_normalize:
        mean = torch.as_tensor(image_mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(image_std, dtype=torch.float32).reshape(-1, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def _hub_mixin() -> type:
    """transformers' ``PushToHubMixin``: ``ProcessorMixin.to_dict`` (hence ``repr(processor)``) serialises
    its attributes of this type through their ``to_dict``."""
    from transformers.utils import PushToHubMixin

    return PushToHubMixin


class FramesProcessor(_hub_mixin()):
    """A video processor the Hugging Face processor can call (``processor.video_processor = ...``):
    videos -> ``BatchFeature({"pixel_values_videos": [B, T, 3, H, W] float32})``.

    Settings mirror transformers' video processors (``size``, ``crop_size``, ``image_mean``,
    ``image_std``, ``do_resize``, ``do_center_crop``, ``do_rescale``, ``rescale_factor``,
    ``do_normalize``); a call's keyword arguments of those names override them for that call, any
    other keyword (the processor's ``return_tensors``, ``video_metadata``, ...) is ignored except
    ``do_sample_frames=True``, refused (frames arrive sampled). Usually built from the model's image
    processor (:meth:`from_image_processor`), so frames are normalised as the model's images are.

    Args:
        size / crop_size / image_mean / image_std / ...: see :func:`preprocess_frames`.
        output_key: the name of the output tensor (``"pixel_values_videos"``).
    """

    model_input_names = ["pixel_values_videos"]

    def __init__(self, size: dict[str, int] | int | None, image_mean: Sequence[float], image_std: Sequence[float],
                 crop_size: dict[str, int] | None = None, do_resize: bool = True, do_center_crop: bool = False,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 output_key: str = "pixel_values_videos"):
        self.size = None if size is None else _size_dict(size)
        self.crop_size = None if crop_size is None else _size_dict(crop_size, "crop_size")
        self.image_mean = [float(m) for m in np.atleast_1d(image_mean)]
        self.image_std = [float(s) for s in np.atleast_1d(image_std)]
        self.do_resize, self.do_center_crop = bool(do_resize), bool(do_center_crop)
        self.do_rescale, self.rescale_factor, self.do_normalize = bool(do_rescale), float(rescale_factor), bool(do_normalize)
        self.output_key = output_key
        self.model_input_names = [output_key]

    @classmethod
    def from_image_processor(cls, image_processor: Any, **overrides: Any) -> "FramesProcessor":
        """The settings of ``image_processor`` (its ``size``, ``crop_size``, ``do_center_crop``, mean, std,
        rescaling), any of them replaced by ``overrides`` (e.g. ``size={"height": 384, "width": 384}``).

        Only the resize / crop / normalise settings are read: anyres tiling, padding and the like are
        image-only and do not apply to frames."""
        ip = image_processor

        def get(name: str, default: Any) -> Any:
            value = getattr(ip, name, None)
            return default if value is None else value

        settings = dict(size=get("size", None), crop_size=get("crop_size", None),
                        image_mean=get("image_mean", [0.0, 0.0, 0.0]), image_std=get("image_std", [1.0, 1.0, 1.0]),
                        do_resize=get("do_resize", True), do_center_crop=get("do_center_crop", False),
                        do_rescale=get("do_rescale", True), rescale_factor=get("rescale_factor", 1 / 255),
                        do_normalize=get("do_normalize", True))
        settings.update(overrides)
        if settings["size"] is not None:
            settings["size"] = _size_dict(settings["size"])
        if settings["crop_size"] is not None:
            settings["crop_size"] = _size_dict(settings["crop_size"], "crop_size")
        return cls(**settings)

    def preprocess(self, video: Any, **overrides: Any) -> torch.Tensor:
        """One video -> ``[T, 3, H, W]`` float32 with this processor's settings (``overrides`` replace them)."""
        s = {k: getattr(self, k) for k in SETTINGS}
        s.update({k: v for k, v in overrides.items() if k in SETTINGS and v is not None})
        return preprocess_frames(video, **s)

    def __call__(self, videos: Any = None, **kwargs: Any):
        """``videos``: one video or a list of them (each as :func:`preprocess_frames` takes it).

        Returns:
            ``BatchFeature`` with ``pixel_values_videos`` ``[B, T, 3, H, W]`` float32.

        Raises:
            OptionError: ``do_sample_frames=True``; or the videos give different ``[T, 3, H, W]`` (one
                tensor holds the batch: sample as many frames of each, or run them in separate batches).
        """
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.video_utils import make_batched_videos

        if videos is None:
            videos = kwargs.pop("video", None)
        if kwargs.get("do_sample_frames"):
            raise OptionError("tokenprune's frames processor does not sample frames: sample them when reading the video "
                              "(tokenprune.Video.from_file(path, sampler=..., frames=...)) and pass do_sample_frames=False")
        if torch.is_tensor(videos) and videos.dim() == 4:
            videos = [videos]
        elif not torch.is_tensor(videos):
            videos = make_batched_videos(videos)
        out = [self.preprocess(v, **kwargs) for v in videos]
        shapes = sorted({tuple(x.shape) for x in out})
        if len(shapes) > 1:
            raise OptionError(f"videos of one batch must give frames of one shape [T, 3, H, W], got {shapes}: sample "
                              "the same number of frames from each, or run them in separate batches")
        return BatchFeature(data={self.output_key: torch.stack(out)})

    def to_dict(self) -> dict[str, Any]:
        """The settings (what ``ProcessorMixin.to_dict`` / ``repr`` show for the processor's video processor)."""
        out = {k: copy.deepcopy(getattr(self, k)) for k in SETTINGS}
        out["video_processor_type"] = type(self).__name__
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items() if k in SETTINGS)})"
