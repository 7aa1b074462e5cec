"""Models that build without a hub: tiny random models of every family (tests, pipeline checks).

``tokenprune.load("tiny-llava")`` builds one; their weights are random, so their answers ignore
the image and their accuracy means nothing -- they exist to exercise the machinery end to end.
"""
from __future__ import annotations

from typing import Callable

ZOO: dict[str, str] = {
    "tiny-llava": "tiny_llava",
    "tiny-llava-next": "tiny_llava_next",
    "tiny-qwen2-vl": "tiny_qwen2_vl",
    "tiny-qwen2.5-vl": "tiny_qwen2_5_vl",
    "tiny-internvl": "tiny_internvl",
    "mid-llava": "mid_llava",
}


def zoo_builder(name: str) -> Callable | None:
    """The builder of zoo model ``name`` (returns ``(model, processor)``), or ``None``."""
    if name not in ZOO:
        return None
    from . import tiny

    return getattr(tiny, ZOO[name])
