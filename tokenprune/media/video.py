"""A sampled video: the frames a model sees, and where in the source they came from.

:class:`Video` holds the decoded frames ``[T, H, W, 3]`` uint8 of ``T`` sampled frames together with
the source's frame rate and each frame's source index, which is what families that encode time
need (Qwen2.5-VL's temporal positions, Qwen3-VL's timestamps: see :meth:`Video.metadata`).

Files are decoded with PyAV (``pip install 'tokenprune[video]'``), never torchvision. Frame ``i`` is
the ``i``-th frame the decoder outputs from the first video stream (presentation order), the
numbering frame-accurate readers (decord, which lmms-eval uses) give ordinary files too.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ..errors import OptionError
from .sampling import sample_indices

if TYPE_CHECKING:
    from PIL import Image
    from transformers.video_utils import VideoMetadata


class MediaError(OptionError):
    """A video that cannot be read or used: missing, corrupt, empty, or frames of the wrong shape.
    The message names the file, the cause and the fix."""


@dataclass(frozen=True, eq=False)
class Video:
    """``T`` frames sampled from a source video of ``total_frames`` frames at ``fps``.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB, the sampled frames in source order.
        fps: the SOURCE video's frame rate, frames per second (not the sampling rate).
        indices: the source frame index of each sampled frame (``T`` of them, in ``[0, total_frames)``).
        total_frames: frames in the source video.
        path: the file it was decoded from, ``None`` for in-memory frames.
    """

    frames: np.ndarray = field(repr=False)
    fps: float
    indices: tuple[int, ...]
    total_frames: int
    path: str | None = None

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, np.ndarray) or f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8 or not len(f):
            what = f"{f.dtype} {tuple(f.shape)}" if isinstance(f, np.ndarray) else type(f).__name__
            raise MediaError(f"video frames must be a uint8 array [T, H, W, 3] with T >= 1, got {what}")
        if len(self.indices) != len(f):
            raise MediaError(f"{len(self.indices)} frame indices for {len(f)} frames: give one index per frame")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise MediaError(f"a video's frame rate must be a positive number, got fps={self.fps}")
        if any(not 0 <= i < self.total_frames for i in self.indices):
            raise MediaError(f"frame indices {list(self.indices)} fall outside the source's "
                             f"{self.total_frames} frames: each must be in [0, total_frames)")
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))

    @property
    def num_frames(self) -> int:
        """``T``, the number of sampled frames."""
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of every frame, in pixels."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    @property
    def times(self) -> np.ndarray:
        """``[T]`` float64, each sampled frame's time in seconds from the start: ``indices / fps``."""
        return np.asarray(self.indices, dtype=np.float64) / self.fps

    @property
    def duration(self) -> float:
        """The source's length in seconds, ``total_frames / fps``."""
        return self.total_frames / self.fps

    def metadata(self) -> VideoMetadata:
        """transformers' ``VideoMetadata`` of this sample, which video processors read for fps-based
        sampling and timestamps (Qwen3-VL): source fps, ``frames_indices``, ``total_num_frames``,
        ``duration``, frame ``height``/``width``, and ``video_backend`` (``"pyav"`` for a decoded
        file, ``None`` for in-memory frames)."""
        from transformers.video_utils import VideoMetadata

        h, w = self.size
        return VideoMetadata(total_num_frames=self.total_frames, fps=self.fps, width=w, height=h,
                             duration=self.duration, video_backend="pyav" if self.path else None,
                             frames_indices=list(self.indices))

    def pil_frames(self) -> list[Image.Image]:
        """The ``T`` frames as RGB PIL images (copies)."""
        from PIL import Image

        return [Image.fromarray(f) for f in self.frames]

    def sample(self, sampler: str = "uniform", frames: int | None = None, fps: float | None = None) -> Video:
        """Sample this video again, as if decoding it from its source: for a video that holds every
        source frame (e.g. a frame-list task's frames from :meth:`from_frames`), so that the same
        samplers apply to files and to frame lists.

        Args:
            sampler, frames, fps: as in :meth:`from_file`.

        Returns:
            A new :class:`Video` of the chosen frames (the array is a copy).

        Raises:
            OptionError: this video is already a sample of its source, or a sampler error.
        """
        if self.indices != tuple(range(self.total_frames)):
            raise OptionError(f"this video holds {self.num_frames} of its source's {self.total_frames} frames, "
                              "so it cannot be resampled: sample the source file with Video.from_file instead")
        picked = sample_indices(sampler, self.total_frames, self.fps, frames=frames, target_fps=fps)
        return replace(self, frames=self.frames[picked], indices=tuple(picked))

    @classmethod
    def from_frames(cls, frames: Sequence[Any] | np.ndarray, fps: float = 1.0,
                    indices: Sequence[int] | None = None, total_frames: int | None = None) -> Video:
        """A video from frames already in memory, e.g. lmms-eval's frame-list tasks (``mvbench_frames``,
        ``longvideobench_i``), which hand a list of PIL images.

        Args:
            frames: PIL images (converted to RGB, all one size) or arrays ``[H, W, 3]`` uint8, or
                one array ``[T, H, W, 3]`` uint8.
            fps: the frame rate the frames stand for; default 1.0 (one frame a second).
            indices: each frame's source index; default ``0 .. T - 1`` (the frames ARE the source).
            total_frames: frames in the source; default ``max(indices) + 1``.

        Returns:
            A :class:`Video` (the frames are copied).

        Raises:
            MediaError: no frames, frames of different sizes, or not uint8 RGB.
        """
        if isinstance(frames, np.ndarray):
            array = np.array(frames)  # copy: the Video must not change when the caller's array does
        else:
            frames = list(frames)
            if not frames:
                raise MediaError("from_frames got no frames: pass a non-empty list of PIL images or [H, W, 3] arrays")
            arrays = [np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in frames]
            if len({a.shape for a in arrays}) > 1:
                raise MediaError(f"frames differ in size ({sorted({a.shape for a in arrays})}): "
                                 "resize them to one size first")
            array = np.stack(arrays)
        indices = tuple(range(len(array))) if indices is None else tuple(indices)
        if total_frames is None:
            total_frames = max(indices) + 1 if indices else 0
        return cls(frames=array, fps=float(fps), indices=indices, total_frames=total_frames)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], sampler: str = "uniform", frames: int | None = None,
                  fps: float | None = None) -> Video:
        """Decode the frames that ``sampler`` picks from a video file, with PyAV.

        Args:
            path: a video file FFmpeg can read (mp4, mkv, webm, avi, ...).
            sampler: a name in :data:`tokenprune.media.SAMPLERS` (match it to the evaluator whose
                numbers you compare against, e.g. ``"llava_onevision"``); default ``"uniform"``.
            frames: the sampler's frame count, ``None`` for its default.
            fps: the sampler's sampling rate (rate-based samplers only), ``None`` for its default.

        Returns:
            A :class:`Video` with ``frames [T, H, W, 3]`` uint8 RGB and the source fps and indices.

        Raises:
            MediaError: PyAV missing, the file missing, unreadable, without a video stream or frames.
            OptionError: an unknown sampler or a bad ``frames`` / ``fps``.
        """
        path = os.fspath(path)
        av = _import_av()
        if not os.path.isfile(path):
            raise MediaError(f"video file {path!r} does not exist: check the path")
        if os.path.getsize(path) == 0:
            raise MediaError(f"video file {path!r} is empty (0 bytes): download or export it again")
        with _open(av, path) as (_, stream):
            # stream.frames comes from the container header; 0 means unknown (Matroska, WebM, ...).
            declared, rate = int(stream.frames or 0), _rate(stream, path)
        total = declared if declared > 0 else _count_frames(av, path)
        if total == 0:
            raise MediaError(f"video {path!r} has no frames: re-export it, or check that it plays")
        wanted = sample_indices(sampler, total, rate, frames=frames, target_fps=fps)
        decoded, seen = _decode(av, path, set(wanted))
        if len(decoded) < len(set(wanted)):
            # The stream ended before the header's count (a truncated file): sample again from the
            # frames that exist, as a reader that counts decoded frames would.
            if seen == 0:
                raise MediaError(f"video {path!r} has no decodable frames: re-export it, or check that it plays")
            total = seen
            wanted = sample_indices(sampler, total, rate, frames=frames, target_fps=fps)
            decoded, _ = _decode(av, path, set(wanted))
        if len({decoded[i].shape for i in wanted}) > 1:
            raise MediaError(f"video {path!r} changes frame size mid-stream: re-encode it at one size "
                             "(ffmpeg -i IN -vf scale=W:H out.mp4)")
        return cls(frames=np.stack([decoded[i] for i in wanted]), fps=rate, indices=tuple(wanted),
                   total_frames=total, path=path)


def write_video(path: str | os.PathLike, frames: Any, fps: float = 8, codec: str = "mpeg4",
                options: dict[str, str] | None = None, container_options: dict[str, str] | None = None) -> str:
    """Write ``frames`` ``[T, H, W, 3]`` uint8 (an array or a list of them) as a video file with PyAV.

    For synthetic benchmarks, demos and tests. ``codec="mpeg4"`` is encoded at ``qscale=1`` (flat
    colours come back within a few grey levels); any PyAV encoder name works (``"libx264"``), with
    ``options`` passed to it (``container_options`` to the container, e.g. mp4's ``movflags``). Frame
    width and height must be even (``yuv420p``). Returns the path.
    """
    av = _import_av()
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"frames must be [T, H, W, 3] uint8, got shape {frames.shape}")
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = dict(options if options is not None else ({"qscale": "1"} if codec == "mpeg4" else {}))
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def _import_av() -> Any:
    """PyAV, imported only when a file is decoded (it is an optional dependency)."""
    try:
        import av
    except ImportError:
        raise MediaError("decoding video files needs PyAV: pip install 'tokenprune[video]'") from None
    return av


@contextmanager
def _open(av: Any, path: str) -> Iterator[tuple[Any, Any]]:
    """``with _open(av, path) as (container, stream)``: the file's first video stream, opening
    errors turned into a one-line :class:`MediaError`."""
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"cannot open video {path!r} ({_reason(e)}): is it a video file? If it plays "
                         "elsewhere, re-export it (ffmpeg -i IN -c:v libx264 out.mp4)") from None
    try:
        if not container.streams.video:
            raise MediaError(f"{path!r} has no video stream (audio only?): give a video file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: faster, and frames still come out in order
        yield container, stream
    finally:
        container.close()


def _rate(stream: Any, path: str) -> float:
    """The stream's frame rate in frames per second: its average rate (what transformers' PyAV
    reader reports), else FFmpeg's guess."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate or not float(rate) > 0:
        raise MediaError(f"video {path!r} declares no frame rate: re-encode it with one (ffmpeg -i IN -r 30 out.mp4)")
    return float(rate)


def _frames(av: Any, path: str, container: Any, stream: Any) -> Iterator[Any]:
    """The decoded frames of ``stream`` in presentation order, decoding errors as MediaError."""
    it = container.decode(stream)
    i = 0
    while True:
        try:
            frame = next(it)
        except StopIteration:
            return
        except (av.FFmpegError, ValueError) as e:
            raise MediaError(f"video {path!r} fails to decode at frame {i} ({_reason(e)}): the file is "
                             "damaged; re-export it (ffmpeg -i IN -c:v libx264 out.mp4)") from None
        yield frame
        i += 1


def _count_frames(av: Any, path: str) -> int:
    """Frames in a file whose header does not say, by decoding them all (exact; costs one pass)."""
    with _open(av, path) as (container, stream):
        return sum(1 for _ in _frames(av, path, container, stream))


def _decode(av: Any, path: str, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames ``wanted`` (source indices) as ``[H, W, 3]`` uint8 RGB, stopping after the last.

    Returns:
        ``{index: frame}`` and how many frames were decoded (fewer than the last wanted index + 1
        only when the stream ended early).
    """
    last = max(wanted)
    out: dict[int, np.ndarray] = {}
    seen = 0
    with _open(av, path) as (container, stream):
        # Sequential decoding, no seeking: exact indices whatever the keyframe layout.
        for i, frame in enumerate(_frames(av, path, container, stream)):
            seen = i + 1
            if i in wanted:  # convert only the kept frames to RGB: skipped ones need no conversion
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    return out, seen


def _reason(e: BaseException) -> str:
    """PyAV's error text on one line, without its errno prefix."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(text).split())
