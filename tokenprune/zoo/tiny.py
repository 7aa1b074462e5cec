"""Tiny randomly initialised LVLMs of every supported family, built from configs in code.

No hub access: the tokenizer is a word-level one made here with ``tokenizers``, and each
processor is assembled from its parts. The models are real transformers classes, so adapters
are tested on exactly the code they run on with real weights; only sizes differ.
"""
from __future__ import annotations

import torch

from .tiny_parts import (  # noqa: F401  (re-exported: tests and scripts import them from here)
    INTERNVL_TEMPLATE, LLAVA_TEMPLATE, QWEN_TEMPLATE, SPECIAL, WORDS, _finish, _qwen_ids, _text_config, tiny_tokenizer,
    without_video,
)

def tiny_llava(seed: int = 0, image_size: int = 64, patch_size: int = 8, attn_implementation: str = "sdpa",
               vision: dict | None = None, text: dict | None = None):
    """A tiny ``LlavaForConditionalGeneration`` (CLIP tower with CLS, Llama LLM) and its processor.

    ``image_size // patch_size`` squared visual tokens per image (default 8x8 = 64); ``vision`` /
    ``text`` override config fields (see :func:`mid_llava` for a realistic size).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from .image_processors import clip_image_processor

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config={
            **dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=32),
            **(vision or {}),
        },
        text_config=dict(model_type="llama", **_text_config(len(tok), **(text or {}))),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", attn_implementation=attn_implementation,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = clip_image_processor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1,
    )
    return _finish(model, seed), processor


def _timm_importable() -> bool:
    """timm imports torchvision, which fails beside a CPU torch (docs/adapters.md): test it only where it works."""
    try:
        import timm  # noqa: F401
    except Exception:  # noqa: BLE001 -- ImportError, or torchvision's RuntimeError
        return False
    return True


FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl", "qwen3_vl", "qwen3_vl_moe",
            "llava_onevision") + (("timm_lvlm",) if _timm_importable() else ())


# Newer families live in their own modules (one builder each); imported on use.
def tiny_qwen3_vl(seed: int = 0, **kw):
    """A tiny ``Qwen3VLForConditionalGeneration`` (DeepStack) and its processor; see :mod:`.tiny_qwen3_vl`."""
    from .tiny_qwen3_vl import tiny_qwen3_vl as build

    return build(seed=seed, **kw)


def tiny_qwen3_vl_moe(seed: int = 0, **kw):
    """A tiny ``Qwen3VLMoeForConditionalGeneration`` and its processor; see :mod:`.tiny_qwen3_vl`."""
    from .tiny_qwen3_vl import tiny_qwen3_vl_moe as build

    return build(seed=seed, **kw)


def tiny_llava_onevision(seed: int = 0, **kw):
    """A tiny ``LlavaOnevisionForConditionalGeneration`` and its processor; see :mod:`.tiny_llava_onevision`."""
    from .tiny_llava_onevision import tiny_llava_onevision as build

    return build(seed=seed, **kw)


def tiny_timm_lvlm(seed: int = 0, **kw):
    """A tiny timm-backboned LVLM (timm ViT + projector + Llama); see :mod:`.tiny_timm_lvlm`."""
    from .tiny_timm_lvlm import tiny_timm_lvlm as build

    return build(seed=seed, **kw)


@torch.no_grad()
def eager_vision_attention(lvlm, batch, layer: int) -> list[torch.Tensor]:
    """Reference vision attention via eager attention + ``output_attentions`` (slow, tests only).

    Returns one ``[T, T]`` head-averaged map per view, in the layout the adapter hands to
    pruners (prefix tokens first, patches in merge order).
    """
    return lvlm.reference_vision_attention(batch, layer)


def mid_llava(seed: int = 0):
    """A randomly initialised LLaVA of realistic shape: CLIP-B/14 tower at 336 px (24x24 = 576
    visual tokens, 12 layers, width 768) and a 12-layer Llama of width 768 (GQA 12/4 heads)."""
    return tiny_llava(
        seed=seed, image_size=336, patch_size=14,
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4),
    )


def _qwen_processor(tok, patch_size: int, processor_cls=None):
    """``processor_cls`` (default ``Qwen2VLProcessor``) with a PIL image processor of 4 to 64 merged
    tokens per image and no video processor (the adapter attaches tokenprune's torchvision-free one).

    Videos get the same per-frame budget as images (4 to 64 tokens per frame), handed to the video
    processor on every call through the processor's ``videos_kwargs`` (transformers' per-processor
    defaults): transformers' video defaults (128 to 768 tokens per frame) would make tiny test clips
    slow, and a clip of two equal frames could not match the image path.
    """
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = (patch_size * 2) ** 2  # pixels of one merged (2x2 patch) token
    size = {"shortest_edge": unit * 4, "longest_edge": unit * 64}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2,
        min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"], size=dict(size),
    )
    cls = processor_cls or Qwen2VLProcessor
    processor = without_video(cls)(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                   chat_template=QWEN_TEMPLATE)
    processor.videos_kwargs = {**getattr(cls, "videos_kwargs", {}), "size": dict(size)}
    return processor


def tiny_qwen2_vl(seed: int = 0, patch_size: int = 8, vision: dict | None = None, text: dict | None = None):
    """A tiny ``Qwen2VLForConditionalGeneration``: native resolution (up to 64 merged tokens), M-RoPE.

    ``vision`` / ``text`` override config fields (``benchmarks/speed/video_speed.py`` builds a mid-size one).
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    # Vision markers as special tokens, as in Qwen's tokenizers: they split from adjacent text (a Qwen3-VL
    # timestamp "<0.5 seconds>" or the prompt) instead of merging into one unknown word.
    tok = tiny_tokenizer(extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                               "vision_start_token": "<|vision_start|>",
                                               "vision_end_token": "<|vision_end|>"})
    torch.manual_seed(seed)
    text_config = _text_config(len(tok), **{"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                "mrope_section": [2, 3, 3]}, **(text or {})})
    config = Qwen2VLConfig(
        vision_config={**dict(depth=3, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=patch_size,
                              spatial_merge_size=2, temporal_patch_size=2, in_channels=3), **(vision or {})},
        text_config=text_config, **_qwen_ids(tok), attn_implementation="sdpa",
    )
    return _finish(Qwen2VLForConditionalGeneration(config), seed), _qwen_processor(tok, patch_size)


def tiny_qwen2_5_vl(seed: int = 0, patch_size: int = 8):
    """A tiny ``Qwen2_5_VLForConditionalGeneration``: windowed vision attention except block 1."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # Vision markers as special tokens, as in Qwen's tokenizers: they split from adjacent text (a Qwen3-VL
    # timestamp "<0.5 seconds>" or the prompt) instead of merging into one unknown word.
    tok = tiny_tokenizer(extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                               "vision_start_token": "<|vision_start|>",
                                               "vision_end_token": "<|vision_end|>"})
    torch.manual_seed(seed)
    text = _text_config(len(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                           patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           window_size=patch_size * 4, fullatt_block_indexes=[1]),
        text_config=text, **_qwen_ids(tok), attn_implementation="sdpa",
    )
    from transformers import Qwen2_5_VLProcessor  # writes second_per_grid_ts for videos

    return _finish(Qwen2_5_VLForConditionalGeneration(config), seed), _qwen_processor(tok, patch_size,
                                                                                      Qwen2_5_VLProcessor)


def tiny_internvl(seed: int = 0, tile_size: int = 32, patch_size: int = 4, max_tiles: int = 4):
    """A tiny ``InternVLForConditionalGeneration``: up to ``max_tiles`` tiles + a thumbnail per image,
    each ``(tile/patch)^2 / 4`` tokens after pixel shuffle (default 16 on a 4x4 grid)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = tiny_tokenizer(extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    })
    torch.manual_seed(seed)
    n_tokens = (tile_size // patch_size) ** 2 // 4
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                           image_size=[tile_size, tile_size], patch_size=[patch_size, patch_size]),
        text_config=dict(model_type="qwen2", **_text_config(len(tok))),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=n_tokens,
        vision_feature_layer=-1, attn_implementation="sdpa", tie_word_embeddings=False,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size}, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
    )
    processor = without_video(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tok, video_processor=None, image_seq_length=n_tokens,
        chat_template=INTERNVL_TEMPLATE,
    )
    return _finish(InternVLForConditionalGeneration(config), seed), processor


def tiny_llava_next(seed: int = 0, crop_size: int = 32, patch_size: int = 8):
    """A tiny ``LlavaNextForConditionalGeneration``: anyres with 1x2 / 2x1 / 2x2 crop grids of 4x4 tokens."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    pinpoints = [[crop_size, crop_size * 2], [crop_size * 2, crop_size], [crop_size * 2, crop_size * 2]]
    config = LlavaNextConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, image_size=crop_size, patch_size=patch_size, projection_dim=32,
        ),
        text_config=dict(model_type="llama", **_text_config(len(tok))),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints, attn_implementation="sdpa",
    )
    model = LlavaNextForConditionalGeneration(config)
    torch.nn.init.normal_(model.model.image_newline)  # real checkpoints have a trained newline
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop_size}, crop_size={"height": crop_size, "width": crop_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1,
    )
    return _finish(model, seed), processor
