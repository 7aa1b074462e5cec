"""Which source frames a video model sees: frame samplers named after the evaluators that use them.

A sampler maps a source video (``total_frames`` frames at ``fps`` frames per second) to the indices
of the frames to decode, in order. Each one reproduces an evaluator's or a model's own rule
bit-for-bit, so that a tokenprune run and an lmms-eval run of the same model see the same frames:

==================  ==========================================================================
``llava_onevision``  lmms-eval 0.7.3 ``llava_onevision``: 32 frames, ``linspace(..., dtype=int)``
``qwen2_5_vl``       lmms-eval 0.7.3 ``qwen2_5_vl``: qwen_vl_utils at 2 fps, then at most 32 + last
``qwen3_vl``         transformers' ``Qwen3VLVideoProcessor.sample_frames``: 2 fps, 4..768 frames
``internvl``         InternVL's chat code ``get_index`` (lmms-eval ``internvl2``/``internvl3``): 32
                     segment centres
``internvl_hf``      transformers' ``InternVLVideoProcessor.sample_frames`` (lmms-eval's
                     ``internvl_hf``): 32 segment centres, ``initial_shift=True``
``uniform``          8 evenly spaced frames, ends included
``all``              every frame
==================  ==========================================================================

Every sampler has the signature ``(total_frames, fps, frames=None, target_fps=None) -> list[int]``:
``frames`` is a frame count, ``target_fps`` a sampling rate in frames per second (only for the
rate-based samplers; the others reject it rather than silently ignore it). Indices may repeat where
the original rule repeats them (asking a count-based rule for more frames than the video has), as
the evaluator would then feed the same frame twice.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..errors import OptionError

Sampler = Callable[..., list[int]]

# lmms-eval 0.7.3 defaults: llava_onevision max_frames_num, qwen2_5_vl max_num_frames, internvl2/3
# num_frame, internvl_hf num_frames.
LMMS_EVAL_FRAMES = 32
# qwen_vl_utils (vision_process.py, the same in the Qwen2.5-VL and Qwen3-VL repositories):
# FPS, FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES.
QWEN_FPS = 2.0
QWEN_FRAME_FACTOR = 2
QWEN_MIN_FRAMES = 4
QWEN_MAX_FRAMES = 768
UNIFORM_FRAMES = 8


def _no_rate(name: str, target_fps: float | None) -> None:
    """Reject ``target_fps`` for a sampler that takes a fixed count (ignoring it would surprise)."""
    if target_fps is not None:
        raise OptionError(f"sampler {name!r} takes a frame count, not fps={target_fps}: drop fps, or use a "
                          f"rate-based sampler ({', '.join(RATE_SAMPLERS)})")


def llava_onevision(total_frames: int, fps: float, frames: int | None = None,
                    target_fps: float | None = None) -> list[int]:
    """lmms-eval 0.7.3's ``llava_onevision`` (``load_video``): ``np.linspace(0, n - 1, frames,
    dtype=int)`` -- evenly spaced, truncated toward 0, ends included.

    Args:
        total_frames: ``n``, frames in the source.
        fps: the source frame rate (unused: the rule is count-based).
        frames: how many frames; default 32 (lmms-eval's ``max_frames_num``). With ``frames > n``
            indices repeat, as in lmms-eval.
        target_fps: not allowed.

    Returns:
        ``frames`` source indices, non-decreasing.
    """
    _no_rate("llava_onevision", target_fps)
    frames = LMMS_EVAL_FRAMES if frames is None else frames
    return np.linspace(0, total_frames - 1, frames, dtype=int).tolist()


def _qwen_vl_utils_nframes(total_frames: int, fps: float, target_fps: float) -> int:
    """qwen_vl_utils' ``smart_nframes`` for a ``fps`` request (its default), not installed here so
    reproduced: ``floor2(min(max(n / fps * target_fps, ceil2(4)), floor2(min(768, n)), n))`` where
    ``floor2`` / ``ceil2`` round down / up to a multiple of ``FRAME_FACTOR = 2``."""
    f = QWEN_FRAME_FACTOR
    min_frames = math.ceil(QWEN_MIN_FRAMES / f) * f
    max_frames = math.floor(min(QWEN_MAX_FRAMES, total_frames) / f) * f
    nframes = min(min(max(total_frames / fps * target_fps, min_frames), max_frames), total_frames)
    return math.floor(nframes / f) * f


def qwen2_5_vl(total_frames: int, fps: float, frames: int | None = None,
               target_fps: float | None = None) -> list[int]:
    """lmms-eval 0.7.3's ``qwen2_5_vl``: qwen_vl_utils reads the video at ``target_fps``, then
    lmms-eval keeps at most ``frames`` of those frames plus the last one.

    Step 1 (qwen_vl_utils ``fetch_video`` with no ``fps``/``nframes`` in the message, any reader
    backend): ``m = smart_nframes`` = ``n / fps * target_fps`` clamped to ``[4, min(768, n)]`` and
    floored to an even count; indices ``torch.linspace(0, n - 1, m).round()`` (float32, round half
    to even). Step 2 (lmms-eval): ``k = unique(np.linspace(0, m - 1, frames, dtype=int))``, plus
    ``m - 1`` if missing; keeps all ``m`` frames when ``m <= frames``.

    Args:
        total_frames: ``n``, frames in the source.
        fps: the source frame rate.
        frames: most frames kept after step 1 (the last one may add one more); default 32
            (lmms-eval's ``max_num_frames``).
        target_fps: the reading rate; default 2.0 (qwen_vl_utils' ``FPS``; lmms-eval passes none).

    Returns:
        Source indices, strictly increasing. A 1-frame source gives ``[0]`` (qwen_vl_utils raises).
    """
    frames = LMMS_EVAL_FRAMES if frames is None else frames
    target_fps = QWEN_FPS if target_fps is None else target_fps
    if total_frames < QWEN_FRAME_FACTOR:
        return list(range(total_frames))
    m = _qwen_vl_utils_nframes(total_frames, fps, target_fps)
    # float32 as qwen_vl_utils (torch's default dtype): float64 can round a .5 the other way.
    read = torch.linspace(0, total_frames - 1, m, dtype=torch.float32).round().long().tolist()
    keep = np.unique(np.linspace(0, m - 1, frames, dtype=int))
    if m - 1 not in keep:
        keep = np.unique(np.append(keep, m - 1))
    return [read[k] for k in keep.tolist()]


def qwen3_vl(total_frames: int, fps: float, frames: int | None = None,
             target_fps: float | None = None) -> list[int]:
    """transformers' ``Qwen3VLVideoProcessor.sample_frames`` (its default ``do_sample_frames=True``).

    With a rate: ``m = int(n / fps * target_fps)`` clamped to ``[4, 768]`` and to ``n`` (no even
    rounding; the processor pads to even itself). With ``frames``: ``m = frames`` as given. Indices
    ``np.linspace(0, n - 1, m).round()`` (float64, round half to even).

    Args:
        total_frames: ``n``, frames in the source.
        fps: the source frame rate.
        frames: an exact frame count instead of a rate (then ``target_fps`` must be ``None``);
            default ``None`` (the processor's ``num_frames``).
        target_fps: the sampling rate; default 2 (the processor's ``fps``).

    Returns:
        ``m`` source indices, non-decreasing.
    """
    if frames is not None and target_fps is not None:
        raise OptionError("sampler 'qwen3_vl' takes frames or fps, not both (as Qwen3VLVideoProcessor): drop one")
    if frames is None:
        target_fps = QWEN_FPS if target_fps is None else target_fps
        frames = min(max(int(total_frames / fps * target_fps), QWEN_MIN_FRAMES), QWEN_MAX_FRAMES, total_frames)
    return np.linspace(0, total_frames - 1, frames).round().astype(int).tolist()


def internvl(total_frames: int, fps: float, frames: int | None = None,
             target_fps: float | None = None) -> list[int]:
    """InternVL's chat code ``get_index`` with no time bound, as lmms-eval 0.7.3's ``internvl2`` and
    ``internvl3`` call it: the centres of ``frames`` equal segments of ``[0, n - 1]``,
    ``int(seg / 2 + np.round(seg * i))`` with ``seg = (n - 1) / frames`` (round half to even).

    transformers' InternVL video processor uses ``seg = n / frames`` instead (see
    :func:`internvl_hf`); this one follows the official chat code, which InternVL's model cards and
    lmms-eval's ``internvl2``/``internvl3`` use.

    Args:
        total_frames: ``n``, frames in the source.
        fps: the source frame rate (used by ``get_index`` only for a time bound, never set here).
        frames: number of segments; default 32 (lmms-eval's ``num_frame``; the model cards'
            examples pass 8). More segments than frames repeat indices, as in the original.
        target_fps: not allowed.

    Returns:
        ``frames`` source indices, non-decreasing.
    """
    _no_rate("internvl", target_fps)
    frames = LMMS_EVAL_FRAMES if frames is None else frames
    seg = float(total_frames - 1) / frames
    return [int(seg / 2 + np.round(seg * i)) for i in range(frames)]


def internvl_hf(total_frames: int, fps: float, frames: int | None = None,
                target_fps: float | None = None) -> list[int]:
    """transformers' ``InternVLVideoProcessor.sample_frames`` with ``initial_shift=True``, as
    lmms-eval 0.7.3's ``internvl_hf`` asks for it: ``torch.arange(s, n, n / m).int()`` with
    ``s = n / m / 2``, i.e. the centres of ``m`` equal segments of ``[0, n)``, truncated.

    Args:
        total_frames: ``n``, frames in the source.
        fps: the source frame rate.
        frames: ``m``; default 32 (lmms-eval's ``num_frames``). Capped at ``n`` (transformers raises).
        target_fps: instead of ``frames``: ``m = int(n / fps * target_fps)``, as the processor does.

    Returns:
        ``m`` source indices, strictly increasing.
    """
    if frames is not None and target_fps is not None:
        raise OptionError("sampler 'internvl_hf' takes frames or fps, not both (as InternVLVideoProcessor): drop one")
    if target_fps is not None:
        frames = max(int(total_frames / fps * target_fps), 1)
    frames = min(LMMS_EVAL_FRAMES if frames is None else frames, total_frames)
    step = total_frames / frames
    return torch.arange(step / 2, total_frames, step).int().tolist()


def uniform(total_frames: int, fps: float, frames: int | None = None,
            target_fps: float | None = None) -> list[int]:
    """``frames`` evenly spaced frames, first and last included: ``np.linspace(0, n - 1,
    frames).round()`` (round half to even).

    Args:
        total_frames: ``n``, frames in the source.
        fps: the source frame rate (unused).
        frames: how many; default 8. Capped at ``n`` (then every frame).
        target_fps: not allowed.

    Returns:
        ``min(frames, n)`` source indices, strictly increasing.
    """
    _no_rate("uniform", target_fps)
    frames = min(UNIFORM_FRAMES if frames is None else frames, total_frames)
    return np.linspace(0, total_frames - 1, frames).round().astype(int).tolist()


def all_frames(total_frames: int, fps: float, frames: int | None = None,
               target_fps: float | None = None) -> list[int]:
    """Every frame, ``0 .. n - 1`` (mind the memory on a long video). Takes no ``frames`` or fps."""
    _no_rate("all", target_fps)
    if frames is not None:
        raise OptionError(f"sampler 'all' takes every frame, not frames={frames}: drop frames, or use 'uniform'")
    return list(range(total_frames))


SAMPLERS: dict[str, Sampler] = {
    "llava_onevision": llava_onevision,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "internvl": internvl,
    "internvl_hf": internvl_hf,
    "uniform": uniform,
    "all": all_frames,
}
RATE_SAMPLERS = ("qwen2_5_vl", "qwen3_vl", "internvl_hf")


def sample_indices(name: str, total_frames: int, fps: float, frames: int | None = None,
                   target_fps: float | None = None) -> list[int]:
    """The source frame indices that sampler ``name`` picks from a video, in order.

    Args:
        name: a key of :data:`SAMPLERS`.
        total_frames: frames in the source video (``>= 1``).
        fps: the source video's frame rate (``> 0``).
        frames: a frame count (``>= 1``) or ``None`` for the sampler's default.
        target_fps: a sampling rate (``> 0``, rate-based samplers only) or ``None`` for the default.

    Returns:
        Indices into ``range(total_frames)`` as Python ints.

    Raises:
        OptionError: unknown ``name`` (the message lists the known ones), ``frames < 1``, a
            non-positive rate, an empty video, or an option the sampler does not take.
    """
    if name not in SAMPLERS:
        raise OptionError(f"unknown frame sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    if total_frames < 1:
        raise OptionError(f"a video with {total_frames} frames cannot be sampled: it must have at least one frame")
    if not (fps > 0 and math.isfinite(fps)):
        raise OptionError(f"the source frame rate must be a positive number, got fps={fps}")
    if frames is not None and (isinstance(frames, bool) or int(frames) != frames or frames < 1):
        raise OptionError(f"frames must be a whole number >= 1, got frames={frames!r}")
    if target_fps is not None and not (target_fps > 0 and math.isfinite(target_fps)):
        raise OptionError(f"the sampling rate must be a positive number of frames per second, got fps={target_fps}")
    return SAMPLERS[name](total_frames, fps, None if frames is None else int(frames), target_fps)
