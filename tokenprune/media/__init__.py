"""Video input: :class:`Video` (sampled frames plus where they came from) and the frame samplers.

``Video.from_file(path, sampler="llava_onevision")`` decodes, with PyAV, exactly the frames the named
evaluator would give the model; ``Video.from_frames(images)`` wraps frames already in memory;
``write_video(path, frames)`` writes synthetic clips (benchmarks, tests).
"""
from .sampling import SAMPLERS, sample_indices
from .video import MediaError, Video, write_video

__all__ = ["MediaError", "SAMPLERS", "Video", "sample_indices", "write_video"]
