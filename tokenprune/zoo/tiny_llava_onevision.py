"""A tiny ``LlavaOnevisionForConditionalGeneration`` built from configs in code (no hub).

SigLIP tower (no CLS), ``crop_size / patch_size`` squared tokens per crop (default 5x5 = 25, odd like
the real 27x27 = 729), anyres pinpoints of 1x1 / 1x2 / 2x1 / 2x2 crops and ``anyres_max_3``: a
stitched, unpadded high-res grid of more than ``1.1^2 * 3 * 25`` tokens is bilinearly downsampled
(as ``anyres_max_9`` does with 729-token crops). On the test images: 96x96 -> 2x2 crops, a 10x10
grid downsampled to 8x8; 80x112 -> 2x2 crops, unpadded to 8x10, kept as is.
"""
from __future__ import annotations

import torch

from .tiny_parts import LLAVA_TEMPLATE, _finish, _text_config, tiny_tokenizer, without_video


def tiny_llava_onevision(seed: int = 0, crop_size: int = 40, patch_size: int = 8, max_num_patches: int = 3,
                         attn_implementation: str = "sdpa", strategy: str = "full", vision: dict | None = None,
                         text: dict | None = None):
    """``(model, processor)``: a tiny LLaVA-OneVision with a SigLIP tower and a Qwen2 LLM.

    Args:
        seed: weight initialisation seed.
        crop_size: pixels per crop side (the tower's ``image_size``).
        patch_size: SigLIP patch size; ``(crop_size // patch_size)^2`` tokens per crop.
        max_num_patches: the ``N`` of ``vision_aspect_ratio="anyres_max_N"`` (model and processor).
        attn_implementation: of every sub-model.
        strategy: ``vision_feature_select_strategy``; ``"default"`` drops a CLS token, so it goes with a
            CLS tower (``vision=dict(model_type="clip_vision_model")``), tests of the prefix path only.
        vision / text: override vision / text config fields.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = tiny_tokenizer(extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    torch.manual_seed(seed)
    side = crop_size // patch_size
    pinpoints = [[crop_size, crop_size], [crop_size, crop_size * 2], [crop_size * 2, crop_size],
                 [crop_size * 2, crop_size * 2]]
    aspect = f"anyres_max_{max_num_patches}"
    config = LlavaOnevisionConfig(
        vision_config={
            **dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, image_size=crop_size, patch_size=patch_size, vision_use_head=False),
            **(vision or {}),
        },
        text_config=dict(model_type="qwen2", **_text_config(len(tok), **(text or {}))),
        image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy=strategy, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=aspect, attn_implementation=attn_implementation,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    torch.nn.init.normal_(model.model.image_newline)  # real checkpoints have a trained newline
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": crop_size, "width": crop_size}, image_grid_pinpoints=pinpoints,
    )
    processor = without_video(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, video_processor=None,
        num_image_tokens=side * side + (strategy == "default"),  # the processor counts a CLS, then drops it
        vision_feature_select_strategy=strategy, vision_aspect_ratio=aspect, chat_template=LLAVA_TEMPLATE,
    )
    return _finish(model, seed), processor
