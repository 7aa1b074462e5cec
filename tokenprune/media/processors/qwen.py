"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL video preprocessing without torchvision.

What transformers' ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor`` do (5.25, read from
``video_processing_qwen2_vl.py`` and ``video_processing_qwen3_vl.py``), in plain torch:

1. ``smart_resize`` each clip's frames to multiples of ``patch_size * merge_size`` within the pixel
   budget ``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}``: per frame for
   Qwen2-VL / 2.5-VL (``budget="frame"``), over ``t * h * w`` for Qwen3-VL (``budget="clip"``), with
   the optional ``cap_pixels_per_frame`` of each (qwen-vl-utils' per-frame share of a total budget);
2. resize as :func:`tokenprune.media.processors.frames.resize_frames` does (bicubic with antialias,
   width then height, rounded back to uint8 between the passes as torchvision's uint8 resize does;
   only when the size changes);
3. rescale by ``1/255`` and normalise with the family's mean / std, with the arithmetic of the PIL
   image processor (float64 rescale, float32 normalise), so that a clip of two equal frames gives
   pixels bit-identical to the image path (HF's torchvision video path fuses the two steps and
   differs from it by ~2e-7);
4. pad ``T`` to a multiple of ``temporal_patch_size`` by repeating the last frame;
5. HF's patchify permutation: ``pixel_values_videos [sum t*h*w, C * tps * p * p]`` (patches in
   2x2-merge order, temporal patch outermost) and ``video_grid_thw [n, 3]``.

Frames are never sampled here: a :class:`tokenprune.media.Video` already holds the frames its
sampler chose, so ``do_sample_frames`` must be off (``fps`` / ``num_frames`` are refused). The
processor is handed to the Hugging Face processor as its ``video_processor``
(:meth:`tokenprune.adapters.qwen2_vl.QwenVLLVLM.video_processor`); the Hugging Face processor then
writes the ``<|video_pad|>`` runs, Qwen3-VL's ``<t seconds>`` text, ``mm_token_type_ids`` and
Qwen2.5-VL's ``second_per_grid_ts`` (from the ``video_metadata`` this returns).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import OptionError
from .frames import resize_frames

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# transformers 5.25 class defaults (Qwen2VLVideoProcessor / Qwen3VLVideoProcessor).
QWEN2_VL_DEFAULTS: dict[str, Any] = dict(
    patch_size=14, temporal_patch_size=2, merge_size=2, budget="frame",
    size={"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, max_video_tokens=128000,
)
QWEN3_VL_DEFAULTS: dict[str, Any] = dict(
    patch_size=16, temporal_patch_size=2, merge_size=2, budget="clip",
    size={"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
    image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD, max_video_tokens=768,
)

# Keyword arguments a Hugging Face processor may hand its video processor that change nothing here.
_IGNORED = {"do_convert_rgb", "data_format", "input_data_format", "device", "default_to_square", "return_tensors",
            "do_center_crop", "crop_size", "do_pad"}


def smart_resize_frame(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's ``smart_resize``: ``(h, w)`` multiples of ``factor``, ``min_pixels <= h * w <= max_pixels``,
    aspect ratio kept as closely as possible (transformers' ``qwen2_vl`` image and video processors)."""
    if max(height, width) / min(height, width) > 200:
        raise OptionError(f"video frames of {height}x{width} px: the aspect ratio must be below 200 (Qwen's limit); "
                          "crop or pad the frames")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_clip(num_frames: int, height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                      temporal_factor: int = 2) -> tuple[int, int]:
    """Qwen3-VL's ``smart_resize``: as :func:`smart_resize_frame`, the budget over ``t * h * w`` with ``t``
    the frame count rounded to a multiple of ``temporal_factor`` (``video_processing_qwen3_vl.py``)."""
    if num_frames < temporal_factor:
        raise OptionError(f"a Qwen3-VL video needs at least {temporal_factor} frames, got {num_frames}: sample more "
                          "frames, or pass a single frame as an image")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise OptionError(f"video frames of {height}x{width} px: the aspect ratio must be below 200 (Qwen's limit); "
                          "crop or pad the frames")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _as_frames(video: Any) -> torch.Tensor:
    """One clip as ``[T, 3, H, W]`` uint8: an array / tensor ``[T, H, W, 3]`` or ``[T, 3, H, W]``, or a
    list of PIL images or ``[H, W, 3]`` arrays."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in video])
    x = torch.as_tensor(np.asarray(video)) if not torch.is_tensor(video) else video
    if x.ndim != 4:
        raise OptionError(f"a video must be frames [T, H, W, 3] (or [T, 3, H, W]), got shape {tuple(x.shape)}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    elif x.shape[1] != 3:
        raise OptionError(f"video frames must be RGB (3 channels), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise OptionError(f"video frames must be uint8 (0-255), got {x.dtype}: tokenprune.Video holds them so")
    return x.contiguous()


class QwenVideoProcessor:
    """A torchvision-free stand-in for transformers' Qwen2-VL / Qwen3-VL video processor.

    Called like them (``processor(videos, **videos_kwargs)``) by ``Qwen2VLProcessor``,
    ``Qwen2_5_VLProcessor`` and ``Qwen3VLProcessor``, which read ``merge_size``,
    ``temporal_patch_size`` and ``model_input_names`` from it.

    Args:
        patch_size: ViT patch side in pixels (14 for Qwen2/2.5-VL, 16 for Qwen3-VL).
        temporal_patch_size: frames per temporal patch (2).
        merge_size: the merger's spatial merge (2): one LLM token = ``merge_size**2`` patches.
        size: ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}`` (``min_pixels`` /
            ``max_pixels`` override it, as in transformers).
        image_mean, image_std: per-channel normalisation.
        budget: ``"frame"`` (Qwen2/2.5-VL: the pixel budget per frame) or ``"clip"`` (Qwen3-VL: over
            ``t * h * w``).
        cap_pixels_per_frame: qwen-vl-utils' bound on a clip's total pixels (transformers' option of
            the same name; off by default, as in transformers 5.25).
        max_video_tokens: that bound's token budget (transformers' defaults: 128000 for Qwen2-VL, 768
            per frame for Qwen3-VL).
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    rescale_factor = 1 / 255

    def __init__(self, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                 size: dict[str, int] | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
                 budget: str = "frame", cap_pixels_per_frame: bool = False, max_video_tokens: int = 128000):
        if budget not in ("frame", "clip"):
            raise OptionError(f"budget must be 'frame' (Qwen2/2.5-VL) or 'clip' (Qwen3-VL), got {budget!r}")
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.size = self._size(size or QWEN2_VL_DEFAULTS["size"], min_pixels, max_pixels)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.budget = budget
        self.cap_pixels_per_frame = bool(cap_pixels_per_frame)
        self.max_video_tokens = int(max_video_tokens)

    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> "QwenVideoProcessor":
        """transformers' defaults for ``family`` (``"qwen2_vl"`` -- also Qwen2.5-VL -- or ``"qwen3_vl"``),
        with ``overrides`` (any ``__init__`` argument, ``None`` values ignored)."""
        defaults = QWEN3_VL_DEFAULTS if family == "qwen3_vl" else QWEN2_VL_DEFAULTS
        return cls(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    @staticmethod
    def _size(size: dict[str, int], min_pixels: int | None, max_pixels: int | None) -> dict[str, int]:
        out = {"shortest_edge": size.get("shortest_edge", size.get("min_pixels")),
               "longest_edge": size.get("longest_edge", size.get("max_pixels"))}
        if min_pixels is not None:
            out["shortest_edge"] = min_pixels
        if max_pixels is not None:
            out["longest_edge"] = max_pixels
        if not out["shortest_edge"] or not out["longest_edge"]:
            raise OptionError(f"a Qwen video size needs 'shortest_edge' and 'longest_edge' (min / max pixels), "
                              f"got {size}")
        return {k: int(v) for k, v in out.items()}

    def __repr__(self) -> str:
        return (f"QwenVideoProcessor(patch_size={self.patch_size}, temporal_patch_size={self.temporal_patch_size}, "
                f"merge_size={self.merge_size}, size={self.size}, budget={self.budget!r})")

    def to_dict(self) -> dict[str, Any]:
        """The settings (what transformers' processors print and save for their sub-processors)."""
        return dict(video_processor_type=type(self).__name__, patch_size=self.patch_size,
                    temporal_patch_size=self.temporal_patch_size, merge_size=self.merge_size, size=dict(self.size),
                    image_mean=list(self.image_mean), image_std=list(self.image_std), budget=self.budget,
                    cap_pixels_per_frame=self.cap_pixels_per_frame, max_video_tokens=self.max_video_tokens)

    # -- sizes --------------------------------------------------------------------------------------
    def resized_size(self, num_frames: int, height: int, width: int, size: dict[str, int] | None = None,
                     cap_pixels_per_frame: bool | None = None, max_video_tokens: int | None = None) -> tuple[int, int]:
        """``(h, w)`` in pixels that the ``num_frames`` frames of ``height x width`` are resized to."""
        size = size or self.size
        cap = self.cap_pixels_per_frame if cap_pixels_per_frame is None else cap_pixels_per_frame
        tokens = self.max_video_tokens if max_video_tokens is None else max_video_tokens
        factor = self.patch_size * self.merge_size
        lo, hi = size["shortest_edge"], size["longest_edge"]
        if self.budget == "frame":
            if cap:  # Qwen2VLVideoProcessor.resize: an even share of 90% of max_video_tokens' pixels
                total = int(tokens * factor * factor * 0.9)
                hi = max(min(hi, total * self.temporal_patch_size // num_frames), int(lo * 1.05))
            return smart_resize_frame(height, width, factor, lo, hi)
        if cap:  # Qwen3VLVideoProcessor.resize: per frame at most max_video_tokens tokens or the even share
            per_frame = max(min(tokens * factor * factor, hi // num_frames), int(lo * 1.05))
            hi = per_frame * num_frames
        return smart_resize_clip(num_frames, height, width, factor, lo, hi, self.temporal_patch_size)

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int,
                                 videos_kwargs: dict[str, Any] | None = None) -> int:
        """ViT patches (``t * h * w``) of a clip of ``num_frames`` frames of ``height x width`` pixels."""
        kw = dict(videos_kwargs or {})
        size = self._size(kw.get("size") or self.size, kw.get("min_pixels"), kw.get("max_pixels"))
        h, w = self.resized_size(num_frames, height, width, size, kw.get("cap_pixels_per_frame"),
                                 kw.get("max_video_tokens"))
        t = -(-num_frames // self.temporal_patch_size)
        return t * (h // self.patch_size) * (w // self.patch_size)

    # -- processing ---------------------------------------------------------------------------------
    def __call__(self, videos: Any, **kwargs: Any):
        """``videos``: one clip or a list of clips (see :func:`_as_frames`), prompt order.

        Keyword arguments are the processor's ``videos_kwargs``: ``size`` / ``min_pixels`` /
        ``max_pixels``, ``do_resize``, ``do_rescale``, ``rescale_factor``, ``do_normalize``,
        ``image_mean``, ``image_std``, ``cap_pixels_per_frame``, ``max_video_tokens``,
        ``video_metadata`` (one ``VideoMetadata`` per clip), ``return_metadata``, ``return_tensors``.

        Returns:
            ``BatchFeature`` with ``pixel_values_videos [sum t*h*w, 3 * tps * p * p]`` float32 and
            ``video_grid_thw [n, 3]`` (``t`` = frames / ``temporal_patch_size``, rounded up), plus
            ``video_metadata`` (a list) when ``return_metadata`` is set.

        Raises:
            OptionError: frame sampling asked for, an unknown option, or frames that are not RGB uint8.
        """
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.video_utils import make_batched_metadata, make_batched_videos

        kw = dict(kwargs)
        if kw.pop("do_sample_frames", None) or kw.get("fps") is not None or kw.get("num_frames") is not None:
            raise OptionError("tokenprune's Qwen video preprocessor takes frames already sampled: sample them with "
                              "tokenprune.Video.from_file(path, sampler=...), and pass do_sample_frames=False")
        kw.pop("fps", None), kw.pop("num_frames", None)
        resample = kw.pop("resample", None)
        if resample is not None and int(resample) != 3:  # PILImageResampling.BICUBIC
            raise OptionError(f"tokenprune's Qwen video preprocessor resizes bicubic only (as Qwen's own), "
                              f"got resample={resample}")
        size = self._size(kw.pop("size", None) or self.size, kw.pop("min_pixels", None), kw.pop("max_pixels", None))
        do_resize = kw.pop("do_resize", True)
        do_rescale = kw.pop("do_rescale", True)
        rescale_factor = kw.pop("rescale_factor", self.rescale_factor)
        do_normalize = kw.pop("do_normalize", True)
        mean = tuple(kw.pop("image_mean", None) or self.image_mean)
        std = tuple(kw.pop("image_std", None) or self.image_std)
        cap = kw.pop("cap_pixels_per_frame", None)
        max_tokens = kw.pop("max_video_tokens", None)
        metadata = kw.pop("video_metadata", None)
        return_metadata = kw.pop("return_metadata", False)
        return_tensors = kw.get("return_tensors")
        for key in ("patch_size", "temporal_patch_size", "merge_size"):  # must match the model: refuse changes
            if key in kw and kw.pop(key) not in (None, getattr(self, key)):
                raise OptionError(f"{key} is the model's ({getattr(self, key)}); it cannot be changed per call")
        unknown = sorted(set(kw) - _IGNORED)
        if unknown:
            raise OptionError(f"tokenprune's Qwen video preprocessor does not take {', '.join(unknown)}; "
                              "pass only size, do_resize, do_rescale, do_normalize, image_mean, image_std, "
                              "cap_pixels_per_frame, max_video_tokens, video_metadata, return_metadata")

        clips = [_as_frames(v) for v in make_batched_videos(videos)]
        patches, grids = [], []
        for x in clips:
            t, _, h, w = x.shape
            if do_resize:
                rh, rw = self.resized_size(t, h, w, size, cap, max_tokens)
                if (rh, rw) != (h, w):
                    # Bicubic with antialias, width then height, rounded to uint8 between (torchvision's uint8 path).
                    x = resize_frames(x, (rh, rw)).to(torch.uint8)
            out = self._normalise(x, do_rescale, rescale_factor, do_normalize, mean, std)
            p, grid = self.patchify(out)
            patches.append(p)
            grids.append(grid)
        data = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
        result = BatchFeature(data=data, tensor_type=return_tensors)
        if return_metadata:
            result["video_metadata"] = make_batched_metadata([c.permute(0, 2, 3, 1).numpy() for c in clips],
                                                             video_metadata=metadata)
        return result

    preprocess = __call__

    @staticmethod
    def _normalise(x: torch.Tensor, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                   mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """``[T, 3, H, W]`` uint8 -> float32, with the PIL image processor's arithmetic: rescale in float64
        then to float32, ``(x - mean) / std`` in float32 (so video pixels equal image pixels bit for bit)."""
        out = x.double() * rescale_factor if do_rescale else x.double()
        out = out.float()
        if do_normalize:
            m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
            out = (out - m) / s
        return out

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """``[T, C, H, W]`` -> ``([t*h*w, C * tps * p * p], [t, h, w])``: T padded to a multiple of the
        temporal patch by repeating the last frame, then transformers' permutation (temporal patch,
        merge block row, merge block column, row and column in the block; channel, frame, pixel row,
        pixel column within a patch)."""
        tps, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -x.shape[0] % tps:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        frames, c, h, w = x.shape
        gt, gh, gw = frames // tps, h // p, w // p
        x = x.reshape(gt, tps, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * tps * p * p), [gt, gh, gw]
