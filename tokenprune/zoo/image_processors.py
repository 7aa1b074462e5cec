"""The CLIP image processor the zoo's LLaVA models use, without transformers' torchvision notice."""
from __future__ import annotations

from typing import Any


def clip_image_processor(**kwargs: Any):
    """``CLIPImageProcessor(**kwargs)`` where torchvision is installed, else the PIL-backed
    ``CLIPImageProcessorPil`` -- what transformers falls back to there anyway, after printing a
    notice per processor that a user of the zoo's models can do nothing about."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(**kwargs)
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**kwargs)
