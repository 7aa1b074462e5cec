"""A tiny ``LlavaNextVideoForConditionalGeneration`` built from configs in code (no hub).

CLIP tower with CLS at ``crop_size`` px (default 32 px, patch 4: 8x8 patches per crop or frame), a
Llama LLM, LLaVA-NeXT anyres pinpoints of 1x2 / 2x1 / 2x2 crops for images, and the video path's
average pooling, stride 2: a frame is 4x4 = 16 tokens. The processor is
``LlavaNextVideoProcessor`` with the PIL image processor and no video processor (transformers' needs
torchvision): the adapter attaches tokenprune's frames preprocessor on first use
(:meth:`tokenprune.adapters.llava_next_video.LlavaNextVideoLVLM.video_processor`).
"""
from __future__ import annotations

import torch

from .tiny_parts import LLAVA_TEMPLATE, _finish, _text_config, tiny_tokenizer, without_video


def tiny_llava_next_video(seed: int = 0, crop_size: int = 32, patch_size: int = 4, pool_mode: str = "average",
                          attn_implementation: str = "sdpa", vision: dict | None = None, text: dict | None = None):
    """``(model, processor)``: a tiny LLaVA-NeXT-Video.

    Args:
        seed: weight initialisation seed.
        crop_size: pixels per crop / frame side (the tower's ``image_size``).
        patch_size: CLIP patch size; ``(crop_size // patch_size)^2`` patches per crop, a quarter of
            that per video frame after pooling (``crop_size // patch_size`` should be even).
        pool_mode: the video resampler's ``spatial_pool_mode`` (``"average"``, ``"max"``, ``"conv"``).
        attn_implementation: of every sub-model.
        vision / text: override vision / text config fields.
    """
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tiny_tokenizer(extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    torch.manual_seed(seed)
    pinpoints = [[crop_size, crop_size * 2], [crop_size * 2, crop_size], [crop_size * 2, crop_size * 2]]
    config = LlavaNextVideoConfig(
        vision_config={
            **dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, image_size=crop_size, patch_size=patch_size, projection_dim=32),
            **(vision or {}),
        },
        text_config=dict(model_type="llama", **_text_config(len(tok), **(text or {}))),
        image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
        spatial_pool_mode=pool_mode, spatial_pool_stride=2, attn_implementation=attn_implementation,
    )
    model = LlavaNextVideoForConditionalGeneration(config)
    torch.nn.init.normal_(model.model.image_newline)  # real checkpoints have a trained newline
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop_size}, crop_size={"height": crop_size, "width": crop_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = without_video(LlavaNextVideoProcessor)(
        video_processor=None, image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1,
    )
    return _finish(model, seed), processor
