"""Qwen3-VL and Qwen3-VL-MoE: 16 px patches, 2x2 merger, interleaved M-RoPE, DeepStack.

* Vision: no CLS, no window attention; FoPru scores patches (one map per image, the attention
  runs image by image over ``cu_seqlens``) and averages each 2x2 merge group, as for Qwen2-VL.
* DeepStack: the outputs of vision blocks ``deepstack_visual_indexes`` go through their own
  mergers and are *added* to the hidden states of the visual tokens after decoder layers 0, 1, ...
  (``Qwen3VLTextModel._deepstack_process``). A decoder loop that only calls the layers drops them,
  so each :class:`~tokenprune.adapters.base.View` carries its tokens' features ``[levels, N, D]``;
  pre-LLM pruning cuts (or merges, with the same weights) them with the tokens, the decoder
  runner adds them after the right layers and cuts the levels still to come at in-LLM stages.
* Positions: the model's own ``get_rope_index`` (it reads ``mm_token_type_ids``), ``[3, B, L]``;
  kept tokens keep theirs.
* The MoE variant's decoder layers return hidden states only (router logits are recorded by
  hooks, not returned), so they run in the same loop.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..pruner import PrunerNeeds
from .base import View
from .qwen2_vl import QwenVLLVLM


class Qwen3VLLVLM(QwenVLLVLM):
    """Adapter for ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    mrope = True

    def encode_images(self, batch, needs: PrunerNeeds) -> list[View]:
        """Qwen2-VL's views (tokens, grid, scores), each with its DeepStack features ``[levels, N, D]``.

        The vision tower returns the DeepStack features of every image in one ``[total, D]`` tensor per
        level, in the order of the merged tokens; they are split per image like the tokens.
        """
        visual = self.model.model.visual
        captured: list = []
        handle = visual.register_forward_hook(lambda module, args, out: captured.append(out.deepstack_features))
        try:
            views = super().encode_images(batch, needs)
        finally:
            handle.remove()
        levels = captured[0]
        if not levels:  # a config without DeepStack layers
            return views
        sizes = (batch["image_grid_thw"].prod(-1) // visual.spatial_merge_size ** 2).tolist()
        per_image = torch.stack(levels).split(sizes, dim=1)  # each [levels, N_i, D]
        # super() makes one view per image, in image order
        return [replace(v, deepstack=deep) for v, deep in zip(views, per_image)]

    def vision_spec(self):
        """The ViT (plain GELU MLP), its merger and one more merger per DeepStack level, for FLOPs."""
        from ..cost import VisionSpec

        vc = self.model.config.vision_config
        merged = vc.hidden_size * vc.spatial_merge_size ** 2
        merger = ((merged, merged), (merged, vc.out_hidden_size))
        return VisionSpec(width=vc.hidden_size, mlp=vc.intermediate_size, gated=False, layers=vc.depth,
                          patch_in=vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                          projector=merger * (1 + len(vc.deepstack_visual_indexes)))

    @torch.no_grad()
    def reference_vision_attention(self, batch, layer: int) -> list[torch.Tensor]:
        """Eager reference: ``softmax(q k^T * scale)`` of the scored block, image by image.

        Re-derived from the block's input (captured by a pre-hook), its own ``norm1``, ``qkv``
        projection and the Qwen3-VL modeling file's vision rotary, in fp32 -- not the recording path.
        """
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

        visual = self.model.model.visual
        blk = visual.blocks[self._score_block(layer)]
        captured = {}
        handle = blk.register_forward_pre_hook(
            lambda mod, args, kwargs: captured.update(x=args[0], pe=kwargs["position_embeddings"]), with_kwargs=True)
        try:
            visual(batch["pixel_values"].to(visual.dtype), grid_thw=batch["image_grid_thw"])
        finally:
            handle.remove()
        x, (cos, sin) = blk.norm1(captured["x"]), captured["pe"]
        n_heads = blk.attn.num_heads
        q, k, _ = blk.attn.qkv(x).reshape(x.shape[0], 3, n_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        out, start = [], 0
        for n in batch["image_grid_thw"].prod(-1).tolist():  # no attention across images
            qi, ki = q[start:start + n].float(), k[start:start + n].float()
            probs = (torch.einsum("qhd,khd->hqk", qi, ki) * blk.attn.scaling).softmax(-1)
            out.append(probs.mean(0))
            start += n
        return out
