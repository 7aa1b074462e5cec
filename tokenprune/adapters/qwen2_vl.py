"""Qwen2-VL and Qwen2.5-VL: native-resolution vision tower, 2x2 patch merge, M-RoPE (3-D) positions.

* The tower has no CLS: FoPru scores patches and averages each 2x2 merge group (the processor
  emits patches in merge order, so patch ``p`` belongs to token ``p // 4``).
* Qwen2.5-VL attends within windows except in ``fullatt_block_indexes``: scores come from the
  last full-attention block at or before the requested layer (the first one if none is), and the
  window permutation is undone (``argsort(window_index)``) before the map reaches a pruner.
* Position ids are the model's own ``get_rope_index`` (``[3, B, L]``); kept tokens keep theirs.
"""
from __future__ import annotations

import contextlib

import torch

from ..pruner import PrunerNeeds
from .attention import record_attention
from .base import PrunableLVLM, View
from .common import layer_index


class QwenVLLVLM(PrunableLVLM):
    """Adapter for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    mrope = True
    # The processor expands only <|image_pad|>, but get_rope_index finds images by <|vision_start|>:
    # a raw prompt must carry all three.
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Identity: the vision features handed to pruners are already the merger's (projector's) outputs."""
        return features

    def _score_block(self, layer: int) -> int:
        visual = self.model.model.visual
        idx = layer_index(layer, len(visual.blocks))
        full = sorted(getattr(visual, "fullatt_block_indexes", None) or [])
        if not full:  # Qwen2-VL: every block attends over the whole image
            return idx
        before = [i for i in full if i <= idx]
        return before[-1] if before else full[0]

    def _patch_order(self, grid_thw: torch.Tensor) -> list[torch.Tensor] | None:
        """Per image, the original patch index at each position of the recorded (windowed) order."""
        visual = self.model.model.visual
        if not getattr(visual, "fullatt_block_indexes", None):
            return None
        from transformers.vision_utils import get_vision_window_index

        unit = visual.spatial_merge_size ** 2
        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        orders, start = [], 0
        for n_units in (grid_thw.prod(-1) // unit).tolist():
            local = window_index[start:start + n_units] - start  # windows never cross images
            orders.append((local[:, None] * unit + torch.arange(unit, device=local.device)).flatten())
            start += n_units
        return orders

    def encode_images(self, batch, needs: PrunerNeeds) -> list[View]:
        visual = self.model.model.visual
        grid_thw = batch["image_grid_thw"]
        record = contextlib.nullcontext(None)
        if needs.vision_attention_layer is not None:
            block = visual.blocks[self._score_block(needs.vision_attention_layer)]
            record = record_attention(block.attn, rows="all")
        with record as rec:
            out = visual(batch["pixel_values"].to(visual.dtype), grid_thw=grid_thw)
        merge = visual.spatial_merge_size
        sizes = (grid_thw.prod(-1) // merge ** 2).tolist()
        feats = torch.split(out.pooler_output, sizes)
        maps = None
        if rec is not None:
            # one [P, P] map per image (attention runs image by image), on the block's device: to ours
            maps = [m[0].to(grid_thw.device) for m in rec.maps]
            orders = self._patch_order(grid_thw)
            if orders is not None:
                inverse = [torch.argsort(o) for o in orders]
                maps = [m[inv][:, inv] for m, inv in zip(maps, inverse)]
        windows = self._window_lengths(grid_thw)
        image_pos = batch["input_ids"] == self.model.config.image_token_id
        views, img = [], 0
        for b in range(image_pos.shape[0]):
            seq_index = image_pos[b].nonzero().flatten()
            _, h, w = grid_thw[img].tolist()
            views.append(View(sample=b, tokens=feats[img], grid=(h // merge, w // merge), seq_index=seq_index,
                              vision_attention=None if maps is None else maps[img], patch_merge=merge * merge,
                              # the merger is the projector, inside the tower: act on its outputs
                              vision_features=feats[img] if needs.vision_features else None,
                              encoder_seqs=(h * w,), encoder_windows=windows[img]))
            img += 1
        return views

    def _window_lengths(self, grid_thw: torch.Tensor) -> list[tuple[int, ...]]:
        """Per image, the patch counts of its attention windows (empty without windowed blocks)."""
        visual = self.model.model.visual
        if not getattr(visual, "fullatt_block_indexes", None):
            return [()] * len(grid_thw)
        from transformers.vision_utils import get_vision_window_index

        _, cu = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                        window_size=visual.window_size, patch_size=visual.patch_size)
        lengths = [n for n in torch.as_tensor(cu).diff().tolist() if n > 0]
        out, start = [], 0
        for total in grid_thw.prod(-1).tolist():  # windows never cross images
            mine, acc = [], 0
            while acc < total:
                mine.append(lengths[start])
                acc += lengths[start]
                start += 1
            out.append(tuple(mine))
        return out

    def position_ids(self, batch) -> torch.Tensor:
        positions, _ = self.model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
        )
        return positions

    @torch.no_grad()
    def reference_vision_attention(self, batch, layer: int) -> list[torch.Tensor]:
        """Eager reference: q.k^T softmax of the scoring block, image by image, in original order.

        Qwen vision blocks return attention *outputs*, never probabilities, so the reference
        re-derives q and k from the block's own ``qkv`` projection and rotary embedding.
        """
        visual = self.model.model.visual
        idx = self._score_block(layer)
        captured = {}
        handle = visual.blocks[idx].register_forward_pre_hook(
            lambda mod, args, kwargs: captured.update(x=args[0], pe=kwargs["position_embeddings"]), with_kwargs=True)
        try:
            visual(batch["pixel_values"].to(visual.dtype), grid_thw=batch["image_grid_thw"])
        finally:
            handle.remove()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        blk = visual.blocks[idx]
        x, (cos, sin) = captured["x"], captured["pe"]
        if getattr(visual, "fullatt_block_indexes", None):
            # Undo the window permutation on the block's inputs, the way HF's merger undoes it on
            # its outputs (unit level), so this reference does not share the adapter's arithmetic.
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                batch["image_grid_thw"], spatial_merge_size=visual.spatial_merge_size,
                window_size=visual.window_size, patch_size=visual.patch_size)
            reverse = torch.argsort(window_index)
            unit = visual.spatial_merge_size ** 2
            x, cos, sin = (t.reshape(-1, unit, t.shape[-1])[reverse].reshape(-1, t.shape[-1]) for t in (x, cos, sin))
        x = blk.norm1(x)
        n_heads = blk.attn.num_heads
        q, k, _ = blk.attn.qkv(x).reshape(x.shape[0], 3, n_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        probs = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * blk.attn.scaling
        out, start = [], 0
        for n in batch["image_grid_thw"].prod(-1).tolist():
            out.append(probs[:, start:start + n, start:start + n].softmax(-1).mean(0))
            start += n
        return out
