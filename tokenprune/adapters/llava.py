"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP-style tower with CLS, MLP projector, 1-D RoPE LLM."""
from __future__ import annotations

import math

import torch

from ..errors import OptionError
from ..pruner import PrunerNeeds
from .base import PrunableLVLM, View
from .common import eager_vision_attention, vision_recorder


class LlavaLVLM(PrunableLVLM):
    """Adapter for LLaVA-1.5-style models: one image -> ``(size/patch)^2`` tokens on a square grid."""

    family = "llava"
    model_types = ("llava",)

    def encode_images(self, batch, needs: PrunerNeeds) -> list[View]:
        cfg = self.model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise OptionError("LLaVA with several vision_feature_layers is not supported; use one layer")
        tower = self.model.model.vision_tower
        pixel_values = batch["pixel_values"].to(tower.dtype)
        with vision_recorder(tower, needs) as rec:
            out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[cfg.vision_feature_layer]  # [B, T, Dv]
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        feats = self.model.model.multi_modal_projector(hidden[:, prefix:])  # [B, N, D]
        n = feats.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise OptionError(f"LLaVA image features ({n} tokens) do not form a square grid")
        attn = rec.maps[0] if rec is not None else None
        keys = rec.keys[0].mean(1) if rec is not None and needs.vision_keys else None  # [B, T, d]
        image_pos = batch["input_ids"] == cfg.image_token_id
        views = []
        for b in range(feats.shape[0]):
            seq_index = image_pos[b].nonzero().flatten()
            views.append(View(sample=b, tokens=feats[b], grid=(side, side), seq_index=seq_index,
                              vision_attention=None if attn is None else attn[b], vision_prefix=prefix,
                              vision_features=hidden[b, prefix:] if needs.vision_features else None,
                              vision_prefix_features=hidden[b, :prefix] if needs.vision_features else None,
                              vision_keys=None if keys is None else keys[b],
                              encoder_seqs=(hidden.shape[1],)))
        return views

    def reference_vision_attention(self, batch, layer: int) -> list[torch.Tensor]:
        """Head-averaged vision attention of ``layer`` via eager attention + ``output_attentions``."""
        return list(eager_vision_attention(self.model.model.vision_tower, batch["pixel_values"], layer))
