"""timm-backboned LVLMs (:mod:`tokenprune.adapters.timm_modeling`): a timm ViT, a projector, an HF causal LM.

* One ``h x w`` grid per image (the ViT's patch grid); prefix tokens (CLS, registers) are dropped
  before the projector and form the attention map's prefix rows / columns.
* FoPru's vision attention: timm's ``Attention`` runs fused SDPA, which returns no probabilities.
  A forward hook on the scored block's ``qkv`` projection takes the q / k it computed anyway
  (after the block's ``q_norm`` / ``k_norm``) and the adapter forms ``softmax(q k^T * scale)`` for
  the rows the pruner asked for, head-averaged. Only that one block is touched, and it keeps its
  fused kernel; no block switches to the unfused path.
* 1-D RoPE positions of the causal LM (kept tokens keep theirs).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import OptionError
from ..pruner import PrunerNeeds
from .attention import head_mean_probs
from .base import PrunableLVLM, View
from .common import layer_index
from .timm_modeling import MODEL_TYPE


class _QKVRecorder:
    """What :func:`record_timm_attention` captured: ``maps`` ``[B, rows, T]``, ``keys`` ``[B, H, T, d]``."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []


@contextlib.contextmanager
def record_timm_attention(attn: nn.Module, rows: str = "all", n_prefix: int = 1,
                          keys: bool = False) -> Iterator[_QKVRecorder]:
    """Record the head-averaged attention probabilities of a timm ``Attention`` while it runs.

    ``rows``: ``"all"`` query rows or the first ``n_prefix`` (``"prefix"``); ``keys``: also keep the
    (normed) keys. The module's own forward (fused or not) is untouched: a hook on its ``qkv``
    linear reads the projection it computes anyway.
    """
    for name in ("qkv", "q_norm", "k_norm", "num_heads", "head_dim", "scale"):
        if not hasattr(attn, name):
            raise OptionError(f"vision attention is read from timm's Attention (a fused qkv projection); "
                              f"{type(attn).__name__} has no {name!r}")
    rec = _QKVRecorder()

    def hook(module, args, qkv: torch.Tensor) -> None:
        b, n, _ = qkv.shape
        q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)  # [B, H, T, d], as the module computes them
        if rows == "prefix":
            q = q[:, :, :n_prefix]
        rec.maps.append(head_mean_probs(q, k, None, attn.scale))
        if keys:
            rec.keys.append(k)

    handle = attn.qkv.register_forward_hook(hook)
    try:
        yield rec
    finally:
        handle.remove()


class TimmLVLM(PrunableLVLM):
    """Adapter for :class:`~tokenprune.adapters.timm_modeling.TimmLVLMForConditionalGeneration`
    (the Prismatic / OpenVLA layout: timm ViT -> projector -> HF causal LM)."""

    family = "timm_lvlm"
    model_types = (MODEL_TYPE,)

    def decoder(self) -> tuple[nn.Module, nn.Module]:
        lm = self.model.language_model
        return lm.model, lm.lm_head

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.projector(features)

    def vision_spec(self):
        from ..cost import VisionSpec

        vit = self.model.vision_tower
        block = vit.blocks[0]
        patch = vit.patch_embed.patch_size
        proj = [m for m in self.model.projector.modules() if isinstance(m, nn.Linear)]
        return VisionSpec(width=vit.embed_dim, mlp=block.mlp.fc1.out_features, gated=False,
                          layers=self.model.feature_block() + 1,  # the tower runs up to the feature block
                          patch_in=vit.patch_embed.proj.in_channels * patch[0] * patch[1],
                          projector=tuple((m.in_features, m.out_features) for m in proj))

    def encode_images(self, batch, needs: PrunerNeeds) -> list[View]:
        model = self.model
        vit = model.vision_tower
        prefix = vit.num_prefix_tokens
        feature_block = model.feature_block()
        record = contextlib.nullcontext(None)
        last = feature_block
        if needs.vision_attention_layer is not None:
            score_block = layer_index(needs.vision_attention_layer, len(vit.blocks))
            last = max(last, score_block)
            rows = "prefix" if needs.vision_attention_rows == "prefix" and prefix > 0 else "all"
            record = record_timm_attention(vit.blocks[score_block].attn, rows=rows, n_prefix=prefix,
                                           keys=needs.vision_keys)
        pixels = batch["pixel_values"]
        with record as rec:
            if last == feature_block:
                hidden = model.vision_hidden(pixels)  # [B, T, Dv]
            else:  # the scored block lies after the feature block: run on, keeping the features
                hidden = model.vision_hidden(pixels)
                x = hidden
                for block in vit.blocks[feature_block + 1:last + 1]:
                    x = block(x)
        feats = model.projector(hidden[:, prefix:])  # [B, N, D]
        grid = tuple(vit.patch_embed.grid_size)
        if grid[0] * grid[1] != feats.shape[1]:
            raise OptionError(f"the ViT gave {feats.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid; "
                              "dynamic image sizes are not supported")
        attn = rec.maps[0] if rec is not None else None
        keys = rec.keys[0].mean(1) if rec is not None and needs.vision_keys else None  # [B, T, d]
        image_pos = batch["input_ids"] == model.config.image_token_id
        views = []
        for b in range(feats.shape[0]):
            views.append(View(sample=b, tokens=feats[b], grid=grid, seq_index=image_pos[b].nonzero().flatten(),
                              vision_attention=None if attn is None else attn[b], vision_prefix=prefix,
                              vision_features=hidden[b, prefix:] if needs.vision_features else None,
                              vision_prefix_features=hidden[b, :prefix] if needs.vision_features else None,
                              vision_keys=None if keys is None else keys[b], encoder_seqs=(hidden.shape[1],)))
        return views

    @torch.no_grad()
    def reference_vision_attention(self, batch, layer: int) -> list[torch.Tensor]:
        """Reference: timm's own unfused path on the scored block (``fused_attn=False``), whose
        softmaxed ``attn`` is read where it enters ``attn_drop``; head-averaged, one ``[T, T]`` per image."""
        vit = self.model.vision_tower
        attn = vit.blocks[layer_index(layer, len(vit.blocks))].attn
        seen: list[torch.Tensor] = []
        handle = attn.attn_drop.register_forward_hook(lambda mod, args, out: seen.append(args[0].float().mean(1)))
        fused, attn.fused_attn = attn.fused_attn, False
        try:
            self.model.vision_hidden(batch["pixel_values"], last_block=len(vit.blocks) - 1)
        finally:
            attn.fused_attn = fused
            handle.remove()
        return list(seen[0])
