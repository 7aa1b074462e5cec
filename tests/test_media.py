"""tokenprune.media: the frame samplers against hand-computed indices of the evaluators' rules,
PyAV decoding of exactly those frames (each test frame's grey level encodes its index), the
:class:`Video` accessors and metadata, frame lists, and every error as one line.

Expected indices are written out by hand from each rule's formula (the working is in the comments),
never recomputed with the code under test.
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
from PIL import Image

from tokenprune.errors import OptionError
from tokenprune.media import SAMPLERS, MediaError, Video, sample_indices

LEVEL = 10  # frame i is a flat grey of level i * LEVEL; mpeg4 at qscale 1 keeps it within +-4


def write_video(path, n: int = 24, rate: int = 24, options: dict | None = None) -> str:
    """An mpeg4 video of ``n`` 32x32 frames at ``rate`` fps, frame ``i`` a flat grey ``i * LEVEL``."""
    pytest.importorskip("av")
    from tokenprune.media import write_video as write

    frames = np.stack([np.full((32, 32, 3), i * LEVEL, np.uint8) for i in range(n)])
    return write(path, frames, fps=rate, container_options=options)


def frame_ids(video: Video) -> list[int]:
    """Which source frame each decoded frame is, read back from its grey level."""
    return [int(round(float(f.mean()) / LEVEL)) for f in video.frames]


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> str:
    return write_video(tmp_path_factory.mktemp("media") / "clip.mp4")


# ---------------------------------------------------------------------------------- samplers

def test_sampler_names():
    assert set(SAMPLERS) == {"llava_onevision", "qwen2_5_vl", "qwen3_vl", "internvl", "internvl_hf", "uniform", "all"}


def test_llava_onevision():
    # np.linspace(0, 99, 32, dtype=int): i * 99/31 = i * 3.1935..., truncated.
    assert sample_indices("llava_onevision", 100, 30.0) == [
        0, 3, 6, 9, 12, 15, 19, 22, 25, 28, 31, 35, 38, 41, 44, 47,
        51, 54, 57, 60, 63, 67, 70, 73, 76, 79, 83, 86, 89, 92, 95, 99]
    assert sample_indices("llava_onevision", 10, 30.0, frames=4) == [0, 3, 6, 9]
    # More frames than the video has: lmms-eval feeds repeats (i * 23/31 = 0, .74, 1.48, 2.23, 2.97, 3.71).
    short = sample_indices("llava_onevision", 24, 24.0)
    assert len(short) == 32 and short[:6] == [0, 0, 1, 2, 2, 3] and short[-1] == 23


def test_qwen2_5_vl():
    # 10 s at 30 fps read at 2 fps: 20 frames (even, within [4, 300]); round(i * 299/19 = i * 15.7368).
    assert sample_indices("qwen2_5_vl", 300, 30.0) == [
        0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189, 205, 220, 236, 252, 268, 283, 299]
    # 60 s at 30 fps: 120 frames round(i * 1799/119 = i * 15.1176); lmms-eval keeps positions
    # int(j * 119/31 = j * 3.8387) = 0, 3, 7, 11, 15, 19, 23, 26, ..., 119 of them.
    assert sample_indices("qwen2_5_vl", 1800, 30.0) == [
        0, 45, 106, 166, 227, 287, 348, 393, 454, 514, 574, 635, 695, 741, 801, 862,
        922, 983, 1043, 1088, 1149, 1209, 1270, 1330, 1391, 1436, 1497, 1557, 1618, 1678, 1739, 1799]
    # 4.5 s: 9 frames floored to 8; round(i * 134/7 = i * 19.142857).
    assert sample_indices("qwen2_5_vl", 135, 30.0) == [0, 19, 38, 57, 77, 96, 115, 134]
    # 250 frames at 29.97 fps: 16.68 -> 16; round(i * 249/15 = i * 16.6).
    assert sample_indices("qwen2_5_vl", 250, 29.97) == [
        0, 17, 33, 50, 66, 83, 100, 116, 133, 149, 166, 183, 199, 216, 232, 249]
    # fps=1: 10 frames, round(i * 299/9 = i * 33.222).
    assert sample_indices("qwen2_5_vl", 300, 30.0, target_fps=1.0) == [0, 33, 66, 100, 133, 166, 199, 233, 266, 299]
    # Short clips: at least 4 frames (round(i * 4/3)), but never more than the even floor of n.
    assert sample_indices("qwen2_5_vl", 5, 30.0) == [0, 1, 3, 4]
    assert sample_indices("qwen2_5_vl", 3, 30.0) == [0, 2]
    assert sample_indices("qwen2_5_vl", 1, 30.0) == [0]
    # frames=4 of 20 read: positions int(j * 19/3) = 0, 6, 12, 19.
    assert sample_indices("qwen2_5_vl", 300, 30.0, frames=4) == [0, 94, 189, 299]


def test_qwen3_vl():
    # 4.5 s at 2 fps: int(9.0) = 9 frames (no even rounding); round(i * 16.75), half to even:
    # 33.5 -> 34, 100.5 -> 100.
    assert sample_indices("qwen3_vl", 135, 30.0) == [0, 17, 34, 50, 67, 84, 100, 117, 134]
    assert sample_indices("qwen3_vl", 5, 30.0) == [0, 1, 3, 4]  # min 4 frames
    assert sample_indices("qwen3_vl", 3, 30.0) == [0, 1, 2]  # capped at n
    assert sample_indices("qwen3_vl", 100, 24.0, frames=4) == [0, 33, 66, 99]  # an exact count
    with pytest.raises(OptionError, match="frames or fps, not both"):
        sample_indices("qwen3_vl", 100, 24.0, frames=4, target_fps=1.0)


def test_internvl():
    # get_index: seg = 63/8 = 7.875; int(3.9375 + np.round(7.875 * i)), np.round(31.5) = 32.
    assert sample_indices("internvl", 64, 30.0, frames=8) == [3, 11, 19, 27, 35, 42, 50, 58]
    # Default 32 segments: seg = 63/32 = 1.96875, int(0.984 + round(1.96875 i)).
    default = sample_indices("internvl", 64, 30.0)
    assert len(default) == 32 and default[:4] == [0, 2, 4, 6] and default[-1] == 61
    # transformers' InternVL processor: arange(n/m/2, n, n/m).int().
    assert sample_indices("internvl_hf", 64, 30.0, frames=8) == [4, 12, 20, 28, 36, 44, 52, 60]
    assert sample_indices("internvl_hf", 10, 30.0, frames=4) == [1, 3, 6, 8]  # 1.25, 3.75, 6.25, 8.75


def test_uniform_and_all():
    # round(i * 23/7 = i * 3.2857)
    assert sample_indices("uniform", 24, 24.0) == [0, 3, 7, 10, 13, 16, 20, 23]
    assert sample_indices("uniform", 5, 24.0, frames=8) == [0, 1, 2, 3, 4]  # capped at n
    assert sample_indices("all", 5, 24.0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="bogus"), "unknown frame sampler 'bogus': use one of llava_onevision, qwen2_5_vl"),
    (dict(frames=0), "frames must be a whole number >= 1"),
    (dict(frames=2.5), "frames must be a whole number >= 1"),
    (dict(name="qwen3_vl", target_fps=0.0), "sampling rate must be a positive number"),
    (dict(total_frames=0), "at least one frame"),
    (dict(fps=0.0), "source frame rate must be a positive number"),
    (dict(target_fps=2.0), "sampler 'uniform' takes a frame count, not fps=2.0"),
    (dict(name="all", frames=3), "sampler 'all' takes every frame"),
])
def test_sampler_errors(kwargs, message):
    args = dict(name="uniform", total_frames=24, fps=24.0) | kwargs
    with pytest.raises(OptionError, match=message) as e:
        sample_indices(args.pop("name"), args.pop("total_frames"), args.pop("fps"), **args)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("sampler, frames, expected", [
    ("uniform", None, [0, 3, 7, 10, 13, 16, 20, 23]),
    ("qwen3_vl", None, [0, 8, 15, 23]),  # 1 s at 2 fps -> 2, raised to 4; round(i * 23/3)
    # seg = 23/4 = 5.75: int(2.875 + np.round(5.75 i)), np.round(11.5) = 12
    ("internvl", 4, [2, 8, 14, 19]),
    ("all", None, list(range(24))),
])
def test_from_file_decodes_the_sampled_frames(mp4, sampler, frames, expected):
    video = Video.from_file(mp4, sampler=sampler, frames=frames)
    assert video.indices == tuple(expected)
    assert frame_ids(video) == expected
    assert video.frames.dtype == np.uint8 and video.frames.shape == (len(expected), 32, 32, 3)
    assert (video.fps, video.total_frames, video.path) == (24.0, 24, mp4)


def test_repeated_indices_decode(mp4):
    video = Video.from_file(mp4, sampler="llava_onevision")  # 32 of 24 frames: repeats
    assert video.num_frames == 32 and frame_ids(video) == list(video.indices)
    assert list(video.indices[:6]) == [0, 0, 1, 2, 2, 3]


def test_accessors_and_metadata(mp4):
    video = Video.from_file(mp4, sampler="qwen3_vl")
    assert video.num_frames == 4 and video.size == (32, 32) and video.duration == 1.0
    np.testing.assert_allclose(video.times, [0.0, 8 / 24, 15 / 24, 23 / 24])
    meta = video.metadata()
    assert type(meta).__name__ == "VideoMetadata"
    assert (meta.total_num_frames, meta.fps, meta.height, meta.width, meta.duration, meta.video_backend) == (
        24, 24.0, 32, 32, 1.0, "pyav")
    assert meta.frames_indices == [0, 8, 15, 23]
    np.testing.assert_allclose(meta.timestamps, video.times)
    pil = video.pil_frames()
    assert len(pil) == 4 and pil[0].size == (32, 32) and pil[0].mode == "RGB"
    with pytest.raises(dataclasses.FrozenInstanceError):
        video.fps = 1.0  # type: ignore[misc]


def test_frame_count_without_header(tmp_path):
    """Matroska stores no frame count (stream.frames == 0): the frames are counted by decoding."""
    import av

    path = write_video(tmp_path / "clip.mkv", n=24)
    with av.open(path) as c:
        assert c.streams.video[0].frames == 0
    video = Video.from_file(path)
    assert video.total_frames == 24 and frame_ids(video) == [0, 3, 7, 10, 13, 16, 20, 23]


def test_truncated_file_is_sampled_from_the_frames_that_exist(tmp_path):
    """An mp4 whose header (moov first) promises 24 frames but whose data ends after 10."""
    import av

    path = write_video(tmp_path / "full.mp4", n=24, options={"movflags": "faststart"})
    with av.open(path) as c:
        positions = [p.pos for p in c.demux(c.streams.video[0]) if p.size]
        assert c.streams.video[0].frames == 24
    cut = tmp_path / "cut.mp4"
    cut.write_bytes((tmp_path / "full.mp4").read_bytes()[:positions[10]])
    video = Video.from_file(cut)
    # round(i * 9/7 = i * 1.2857)
    assert video.total_frames == 10 and frame_ids(video) == list(video.indices) == [0, 1, 3, 4, 5, 6, 8, 9]


# ---------------------------------------------------------------------------------- frame lists

def test_from_frames():
    images = [Image.new("RGB", (16, 8), (i * LEVEL,) * 3) for i in range(6)]
    video = Video.from_frames(images, fps=2.0)
    assert video.frames.shape == (6, 8, 16, 3) and video.size == (8, 16)
    assert video.indices == tuple(range(6)) and video.total_frames == 6 and video.path is None
    np.testing.assert_allclose(video.times, [0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert video.metadata().video_backend is None and video.metadata().duration == 3.0
    assert frame_ids(video) == list(range(6))
    # Frame lists take the same samplers as files: lmms-eval's OneVision samples its frame lists so.
    picked = video.sample("llava_onevision", frames=3)
    assert picked.indices == (0, 2, 5) and frame_ids(picked) == [0, 2, 5]  # int(0, 2.5, 5)
    with pytest.raises(OptionError, match="cannot be resampled"):
        picked.sample("uniform")
    # An array, with source indices from a longer video.
    array = np.stack([np.full((4, 4, 3), i * LEVEL, np.uint8) for i in range(3)])
    sub = Video.from_frames(array, fps=30.0, indices=[0, 30, 60], total_frames=90)
    assert sub.indices == (0, 30, 60) and sub.total_frames == 90
    np.testing.assert_allclose(sub.times, [0.0, 1.0, 2.0])
    array[:] = 0  # the Video holds its own copy
    assert frame_ids(sub) == [0, 1, 2]


@pytest.mark.parametrize("frames, kwargs, message", [
    ([], {}, "no frames"),
    ([Image.new("RGB", (4, 4)), Image.new("RGB", (8, 4))], {}, "differ in size"),
    (np.zeros((2, 4, 4, 3), np.float32), {}, "must be a uint8 array"),
    (np.zeros((4, 4, 3), np.uint8), {}, "must be a uint8 array"),
    (np.zeros((2, 4, 4, 3), np.uint8), dict(indices=[0]), "2 frames"),
    (np.zeros((2, 4, 4, 3), np.uint8), dict(indices=[0, 5], total_frames=3), "outside"),
    (np.zeros((2, 4, 4, 3), np.uint8), dict(fps=0.0), "positive number"),
])
def test_from_frames_errors(frames, kwargs, message):
    with pytest.raises(MediaError, match=message):
        Video.from_frames(frames, **kwargs)


# ---------------------------------------------------------------------------------- file errors

def test_file_errors(tmp_path, mp4):
    pytest.importorskip("av")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cases = [
        (corrupt, {}, "cannot open video .*corrupt.mp4.*is it a video file"),
        (empty, {}, "empty.mp4' is empty"),
        (tmp_path / "missing.mp4", {}, "missing.mp4' does not exist"),
        (mp4, dict(sampler="bogus"), "unknown frame sampler 'bogus': use one of llava_onevision"),
        (mp4, dict(frames=0), "frames must be a whole number >= 1"),
    ]
    for path, kwargs, message in cases:
        with pytest.raises(OptionError, match=message) as e:
            Video.from_file(path, **kwargs)
        assert "\n" not in str(e.value)
    assert issubclass(MediaError, OptionError)


def test_no_video_stream(tmp_path):
    av = pytest.importorskip("av")
    path = str(tmp_path / "sound.m4a")
    container = av.open(path, "w")
    stream = container.add_stream("aac", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 16000
    for packet in [*stream.encode(frame), *stream.encode()]:
        container.mux(packet)
    container.close()
    with pytest.raises(MediaError, match="has no video stream"):
        Video.from_file(path)


def test_header_only_file_has_no_frames(tmp_path):
    """A Matroska file cut before its first frame: a video stream, zero frames."""
    import av

    path = write_video(tmp_path / "clip.mkv", n=4)
    with av.open(path) as c:
        first = next(p.pos for p in c.demux(c.streams.video[0]))
    cut = tmp_path / "cut.mkv"
    cut.write_bytes((tmp_path / "clip.mkv").read_bytes()[:first])
    with pytest.raises(MediaError, match="has no frames"):
        Video.from_file(cut)


def test_missing_pyav_says_how_to_install(monkeypatch, mp4):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(MediaError, match=r"pip install 'tokenprune\[video\]'"):
        Video.from_file(mp4)
