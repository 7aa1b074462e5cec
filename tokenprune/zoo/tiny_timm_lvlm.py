"""A tiny timm-backboned LVLM (timm ViT with CLS -> MLP projector -> Llama), built in code.

The ViT is ``timm.create_model("vit_tiny_patch16_224", pretrained=False, ...)`` shrunk to a 64 px
input, 8 px patches (an 8 x 8 grid = 64 visual tokens), 3 blocks of width 32; the LLM is the tiny
Llama the other tiny families use, with a small rope theta so that position bugs show.
"""
from __future__ import annotations

import torch

from .tiny_parts import LLAVA_TEMPLATE, _finish, _text_config, tiny_tokenizer


def tiny_timm_lvlm(seed: int = 0, image_size: int = 64, patch_size: int = 8, reg_tokens: int = 0):
    """``(TimmLVLMForConditionalGeneration, TimmLVLMProcessor)``; ``reg_tokens`` adds register tokens
    to the ViT's prefix (after its CLS)."""
    from ..adapters.timm_modeling import TimmLVLMConfig, TimmLVLMForConditionalGeneration, TimmLVLMProcessor

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = TimmLVLMConfig(
        vision_model="vit_tiny_patch16_224",
        vision_kwargs=dict(img_size=image_size, patch_size=patch_size, embed_dim=32, depth=3, num_heads=4,
                           reg_tokens=reg_tokens),
        text_config=dict(model_type="llama", **_text_config(len(tok), rope_theta=100.0)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
    )
    model = TimmLVLMForConditionalGeneration(config)
    processor = TimmLVLMProcessor.from_timm(model.vision_tower, tok, chat_template=LLAVA_TEMPLATE,
                                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
    return _finish(model, seed), processor
