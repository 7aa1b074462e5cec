"""Tiny Qwen3-VL and Qwen3-VL-MoE models (DeepStack, 16 px patches, interleaved M-RoPE), built in code.

Sizes are chosen so that the tests see what matters on real checkpoints:

* rope theta 100 (the real models use 5e6 with head_dim 128): with a 16-wide head and a large
  theta every rotary angle is ~0, so a wrong position id would change nothing measurable;
* three DeepStack levels (vision blocks 0, 1, 2 of 4) feeding decoder layers 0, 1 and 2 of 4, so
  an in-LLM pruner acting before layer 1 or 2 must slice the levels still to come;
* the image processor upscales the test images (96x96 -> 5x5, 80x112 -> 5x6 merged tokens), so
  grids are not degenerate for pooling or row selection.
"""
from __future__ import annotations

import torch

from .tiny_parts import QWEN_TEMPLATE, _finish, _qwen_ids, _text_config, tiny_tokenizer, without_video

PATCH = 16
# Vision markers as special tokens, as in Qwen's tokenizers: they split from adjacent text (the
# "<0.5 seconds>" timestamps before each video temporal patch) instead of merging into one unknown word.
QWEN_SPECIAL_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                       "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
DEEPSTACK = [0, 1, 2]  # vision blocks whose (merged) outputs are added after decoder layers 0, 1, 2


def _processor(tok, patch_size: int = PATCH, min_tokens: int = 25, max_tokens: int = 64):
    """``Qwen3VLProcessor`` with a PIL image processor (no torchvision) emitting ``min_tokens`` to
    ``max_tokens`` merged tokens per image, and no video processor (the adapter attaches
    tokenprune's torchvision-free one).

    Videos: Qwen3-VL's budget is over ``t * h * w``; here 8 to 256 merged tokens' worth of pixels
    (``t`` in frames, so 4 frames of up to 8x8 tokens stay as they are), passed to the video
    processor on every call through the processor's ``videos_kwargs`` (transformers' defaults,
    128 to 768 tokens, would make tiny test clips slow). A clip of two equal frames the size of an
    image (25 to 64 tokens) is not resized, so it can match the image path exactly.
    """
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = (patch_size * 2) ** 2  # pixels of one merged (2x2 patch) token
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2,
        min_pixels=unit * min_tokens, max_pixels=unit * max_tokens,
        size={"shortest_edge": unit * min_tokens, "longest_edge": unit * max_tokens},
    )
    processor = without_video(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tok,
                                                video_processor=None, chat_template=QWEN_TEMPLATE)
    processor.videos_kwargs = {**Qwen3VLProcessor.videos_kwargs,
                               "size": {"shortest_edge": unit * 8, "longest_edge": unit * 256}}
    return processor


def _configs(tok, text: dict | None, vision: dict | None, patch_size: int) -> tuple[dict, dict]:
    text_cfg = _text_config(
        len(tok), head_dim=16,
        # mrope_section sums to head_dim / 2; interleaved (T, H, W, T, H, W, T, T) over the 8 frequencies
        rope_parameters={"rope_type": "default", "rope_theta": 100.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
    )
    text_cfg.update(text or {})
    vision_cfg = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=text_cfg["hidden_size"],
                      patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      num_position_embeddings=64, deepstack_visual_indexes=list(DEEPSTACK))
    vision_cfg.update(vision or {})
    return text_cfg, vision_cfg


def tiny_qwen3_vl(seed: int = 0, patch_size: int = PATCH, attn_implementation: str = "sdpa",
                  text: dict | None = None, vision: dict | None = None):
    """A tiny ``Qwen3VLForConditionalGeneration`` and its processor: 4 decoder layers (width 64,
    GQA 4/2 heads of 16, q/k norms), a 4-block ViT (width 32, 16 px patches, 2x2 merger) whose
    blocks 0-2 feed DeepStack levels 0-2. ``text`` / ``vision`` override config fields."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = tiny_tokenizer(extra_special_tokens=dict(QWEN_SPECIAL_TOKENS))
    torch.manual_seed(seed)
    text_cfg, vision_cfg = _configs(tok, text, vision, patch_size)
    config = Qwen3VLConfig(vision_config=vision_cfg, text_config=text_cfg, **_qwen_ids(tok),
                           attn_implementation=attn_implementation, tie_word_embeddings=False)
    return _finish(Qwen3VLForConditionalGeneration(config), seed), _processor(tok, patch_size)


def tiny_qwen3_vl_moe(seed: int = 0, patch_size: int = PATCH, attn_implementation: str = "sdpa",
                      text: dict | None = None, vision: dict | None = None):
    """A tiny ``Qwen3VLMoeForConditionalGeneration``: as :func:`tiny_qwen3_vl`, every decoder MLP a
    sparse block of 4 experts (width 64), 2 active per token."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    tok = tiny_tokenizer(extra_special_tokens=dict(QWEN_SPECIAL_TOKENS))
    torch.manual_seed(seed)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
               mlp_only_layers=[], tie_word_embeddings=False)
    text_cfg, vision_cfg = _configs(tok, {**moe, **(text or {})}, vision, patch_size)
    config = Qwen3VLMoeConfig(vision_config=vision_cfg, text_config=text_cfg, **_qwen_ids(tok),
                              attn_implementation=attn_implementation, tie_word_embeddings=False)
    model = Qwen3VLMoeForConditionalGeneration(config)
    # A wider router than the init's std 0.02: near-uniform routing probabilities make near-ties, where
    # a 1e-7 difference (batch vs alone) could flip an expert choice; a trained router is decisive too.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                torch.nn.init.normal_(gate.weight, std=0.5)
    return _finish(model, seed), _processor(tok, patch_size)
