"""Qwen3-VL and Qwen3-VL-MoE: 16 px patches, 2x2 merger, interleaved M-RoPE, DeepStack.

* Vision: no CLS, no window attention; FoPru scores patches (one map per image or video temporal
  patch, the attention runs segment by segment over ``cu_seqlens``) and averages each 2x2 merge
  group, as for Qwen2-VL (whose views, video handling and positions this adapter inherits).
* Video: per temporal patch the processor writes ``<{t:.1f} seconds>`` text and a
  ``<|vision_start|>...<|vision_end|>`` block; the timestamp text is plain text (never pruned), the
  pads of each temporal patch are one view. Frames are sampled by tokenprune, so the processor gets
  their ``video_metadata`` with ``do_sample_frames=False`` (its own default would resample at 2 fps).
  The Qwen3-VL budget of the video preprocessor is over ``t * h * w`` (``budget="clip"``).
* DeepStack: the outputs of vision blocks ``deepstack_visual_indexes`` go through their own
  mergers and are *added* to the hidden states of the visual tokens after decoder layers 0, 1, ...
  (``Qwen3VLTextModel._deepstack_process``). A decoder loop that only calls the layers drops them,
  so each :class:`~tokenprune.adapters.base.View` (image, or video temporal patch) carries its
  tokens' features ``[levels, N, D]``;
  pre-LLM pruning cuts (or merges, with the same weights) them with the tokens, the decoder
  runner adds them after the right layers and cuts the levels still to come at in-LLM stages.
* Positions: the model's own ``get_rope_index`` (it reads ``mm_token_type_ids``; each video
  temporal patch is its own ``[1, h, w]`` block), ``[3, B, L]``; kept tokens keep theirs.
* The MoE variant's decoder layers return hidden states only (router logits are recorded by
  hooks, not returned), so they run in the same loop.
"""
from __future__ import annotations

import torch

from .qwen2_vl import QwenVLLVLM


class Qwen3VLLVLM(QwenVLLVLM):
    """Adapter for ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    mrope = True

    def _deepstack(self, out) -> torch.Tensor | None:
        """``[levels, tokens, D]``: the tower's DeepStack features (one ``[tokens, D]`` per level, in the
        order of the merged tokens), which :meth:`encode_images` slices per view like the tokens;
        ``None`` for a config without DeepStack layers."""
        levels = out.deepstack_features
        return torch.stack(levels) if levels else None

    def vision_spec(self):
        """The ViT (plain GELU MLP), its merger and one more merger per DeepStack level, for FLOPs."""
        from ..cost import VisionSpec

        vc = self.model.config.vision_config
        merged = vc.hidden_size * vc.spatial_merge_size ** 2
        merger = ((merged, merged), (merged, vc.out_hidden_size))
        return VisionSpec(width=vc.hidden_size, mlp=vc.intermediate_size, gated=False, layers=vc.depth,
                          patch_in=vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                          projector=merger * (1 + len(vc.deepstack_visual_indexes)))

    def _reference_maps(self, pixels: torch.Tensor, grid_thw: torch.Tensor, layer: int) -> list[torch.Tensor]:
        """Eager reference: ``softmax(q k^T * scale)`` of the scored block, per segment (an image, or one
        temporal patch of a video).

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
            visual(pixels.to(visual.dtype), grid_thw=grid_thw)
        finally:
            handle.remove()
        x, (cos, sin) = blk.norm1(captured["x"]), captured["pe"]
        n_heads = blk.attn.num_heads
        q, k, _ = blk.attn.qkv(x).reshape(x.shape[0], 3, n_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        out, start = [], 0
        # no attention across images, nor across a video's temporal patches
        for n in torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist():
            qi, ki = q[start:start + n].float(), k[start:start + n].float()
            probs = (torch.einsum("qhd,khd->hqk", qi, ki) * blk.attn.scaling).softmax(-1)
            out.append(probs.mean(0))
            start += n
        return out
