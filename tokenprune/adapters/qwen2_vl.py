"""Qwen2-VL and Qwen2.5-VL: native-resolution vision tower, 2x2 patch merge, M-RoPE (3-D) positions.

* The tower has no CLS: FoPru scores patches and averages each 2x2 merge group (the processor
  emits patches in merge order, so patch ``p`` belongs to token ``p // 4``).
* Qwen2.5-VL attends within windows except in ``fullatt_block_indexes``: scores come from the
  last full-attention block at or before the requested layer (the first one if none is), and the
  window permutation is undone (``argsort(window_index)``) before the map reaches a pruner.
* Position ids are the model's own ``get_rope_index`` (``[3, B, L]``, with ``video_grid_thw`` and
  Qwen2.5-VL's ``second_per_grid_ts``); kept tokens keep theirs. ``position_policy="compact"``
  renumbers the 3-D values in use (:func:`~tokenprune.adapters.decoder.compact_positions`); for
  video no official code does that, and no built-in pruner asks for it on M-RoPE models.

Images, multi-image prompts and videos (see :mod:`tokenprune.adapters.visuals`):

* every image is one :class:`~tokenprune.adapters.base.View` (``image`` = its index in the sample);
* a video is ``t`` temporal patches of 2 frames each; the ViT attends within one temporal patch
  only (``cu_seqlens`` per temporal patch, windows never cross one), so each temporal patch is one
  View: grid ``(h/2, w/2)``, its ``<|video_pad|>`` positions, ``frame = 2k``, ``time`` = that
  frame's time in seconds, ``clip`` = the video's index in the sample, its own vision attention map
  and encoder sequence. Times come from the :class:`tokenprune.media.Video` objects:
  :meth:`PrunableLVLM.prepare` stores them in the batch as ``tp_video_times`` ``[videos, max T]`` (NaN-padded), an entry the
  Hugging Face model never sees (drop ``tp_*`` keys before calling it);
* images and videos go through the tower in separate calls, as the Hugging Face model does, so
  features are bit-identical to its own;
* videos without torchvision: :meth:`video_processor` is
  :class:`tokenprune.media.processors.qwen.QwenVideoProcessor` with the checkpoint's saved video
  settings (else transformers' defaults); frames are handed over already sampled, with their
  ``VideoMetadata`` (``do_sample_frames=False``), which Qwen2.5-VL's ``second_per_grid_ts`` and
  Qwen3-VL's timestamps are computed from.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch

from ..pruner import PrunerNeeds
from .attention import record_attention
from .base import VIDEO_TIMES, PrunableLVLM, View
from .common import layer_index

# Settings of a checkpoint's saved video processor that QwenVideoProcessor takes.
_VIDEO_SETTINGS = ("size", "min_pixels", "max_pixels", "image_mean", "image_std", "cap_pixels_per_frame",
                   "max_video_tokens")


class QwenVLLVLM(PrunableLVLM):
    """Adapter for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    mrope = True
    # The processor expands only <|image_pad|> / <|video_pad|>, but get_rope_index finds a visual
    # block by <|vision_start|>: a raw prompt must carry all three.
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    video_placeholder = "<|vision_start|><|video_pad|><|vision_end|>"

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Identity: the vision features handed to pruners are already the merger's (projector's) outputs."""
        return features

    # -- video input --------------------------------------------------------------------------------
    def video_processor(self) -> Any:
        """A :class:`~tokenprune.media.processors.qwen.QwenVideoProcessor` for this model: patch, merge
        and temporal sizes from the vision config; pixel budget and normalisation from the checkpoint's
        saved video processor settings (resolved as transformers does: ``processor_config.json``,
        ``video_preprocessor_config.json``, ``preprocessor_config.json``), else the image processor's
        mean / std and transformers' video defaults for the family. A processor may also pass
        ``videos_kwargs`` (e.g. ``size``) per call, as the tiny zoo models do."""
        from ..media.processors.qwen import QwenVideoProcessor

        vc = self.model.config.vision_config
        image_processor = getattr(self.processor, "image_processor", None)
        settings = {"image_mean": getattr(image_processor, "image_mean", None),
                    "image_std": getattr(image_processor, "image_std", None), **self._saved_video_settings()}
        return QwenVideoProcessor.for_family(
            self.family, patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
            merge_size=vc.spatial_merge_size, **settings)

    def _saved_video_settings(self) -> dict[str, Any]:
        """The pixel budget and normalisation of the checkpoint's saved video processor, ``{}`` if none."""
        name = getattr(self.tokenizer, "name_or_path", None)
        if not name:
            return {}
        try:  # transformers' own resolution of a video processor's settings (no torchvision needed)
            from transformers.video_processing_utils import BaseVideoProcessor

            settings, _ = BaseVideoProcessor.get_video_processor_dict(name)
        except Exception:  # noqa: BLE001 -- no saved settings (or unreachable): transformers' defaults
            return {}
        return {k: settings[k] for k in _VIDEO_SETTINGS if settings.get(k) is not None}

    def video_inputs(self, videos: Sequence[Any]) -> dict[str, Any]:
        """``videos`` (frames), their ``video_metadata`` (source fps, frame indices: Qwen2.5-VL's
        ``second_per_grid_ts``, Qwen3-VL's timestamps) and ``do_sample_frames=False``: the frames are
        already the sampler's."""
        if getattr(self.processor, "video_processor", None) is None:
            self.processor.video_processor = self.video_processor()
        return {"videos": [v.frames for v in videos], "video_metadata": [v.metadata() for v in videos],
                "do_sample_frames": False}

    # -- vision ---------------------------------------------------------------------------------------
    def _score_block(self, layer: int) -> int:
        visual = self.model.model.visual
        idx = layer_index(layer, len(visual.blocks))
        full = sorted(getattr(visual, "fullatt_block_indexes", None) or [])
        if not full:  # Qwen2-VL: every block attends over the whole image
            return idx
        before = [i for i in full if i <= idx]
        return before[-1] if before else full[0]

    @staticmethod
    def _segments(grid_thw: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """``(entry, k, h, w)`` per attention segment of a tower call: one per temporal patch ``k`` of
        each image / video ``entry`` (an image is one), in the tower's order."""
        return [(i, k, h, w) for i, (t, h, w) in enumerate(grid_thw.tolist()) for k in range(t)]

    def _patch_order(self, grid_thw: torch.Tensor) -> list[torch.Tensor] | None:
        """Per segment (temporal patch), the original patch index at each position of the recorded
        (windowed) order; ``None`` without windowed blocks."""
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
        for _, _, h, w in self._segments(grid_thw):
            n_units = h * w // unit
            local = window_index[start:start + n_units] - start  # windows never cross temporal patches
            orders.append((local[:, None] * unit + torch.arange(unit, device=local.device)).flatten())
            start += n_units
        return orders

    def _window_lengths(self, grid_thw: torch.Tensor) -> list[tuple[int, ...]]:
        """Per segment (temporal patch), the patch counts of its attention windows (empty without
        windowed blocks)."""
        segments = self._segments(grid_thw)
        visual = self.model.model.visual
        if not getattr(visual, "fullatt_block_indexes", None):
            return [()] * len(segments)
        from transformers.vision_utils import get_vision_window_index

        _, cu = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                        window_size=visual.window_size, patch_size=visual.patch_size)
        lengths = [n for n in torch.as_tensor(cu).diff().tolist() if n > 0]
        out, start = [], 0
        for _, _, h, w in segments:  # windows never cross temporal patches
            mine, acc = [], 0
            while acc < h * w:
                mine.append(lengths[start])
                acc += lengths[start]
                start += 1
            out.append(tuple(mine))
        return out

    def _deepstack(self, out: Any) -> torch.Tensor | None:
        """``[levels, tokens, D]`` DeepStack features of a tower output (Qwen3-VL), ``None`` here."""
        return None

    def _run_tower(self, pixels: torch.Tensor, grid_thw: torch.Tensor, needs: PrunerNeeds):
        """One tower call (as the model's ``get_image_features`` / ``get_video_features``):
        ``(tokens [N, D], deepstack [levels, N, D] or None, maps)``, ``maps`` one ``[P, P]`` attention
        map per segment in original patch order (``None`` if not asked)."""
        visual = self.model.model.visual
        record = contextlib.nullcontext(None)
        if needs.vision_attention_layer is not None:
            block = visual.blocks[self._score_block(needs.vision_attention_layer)]
            record = record_attention(block.attn, rows="all")
        with record as rec:
            out = visual(pixels.to(visual.dtype), grid_thw=grid_thw)
        maps = None
        if rec is not None:
            # one map per segment (attention runs temporal patch by temporal patch), on the block's device
            maps = [m[0].to(grid_thw.device) for m in rec.maps]
            orders = self._patch_order(grid_thw)
            if orders is not None:
                inverse = [torch.argsort(o) for o in orders]
                maps = [m[inv][:, inv] for m, inv in zip(maps, inverse)]
        return out.pooler_output, self._deepstack(out), maps

    def encode_images(self, batch, needs: PrunerNeeds) -> list[View]:
        """Views of every image and every video temporal patch, in sequence order per sample."""
        visual = self.model.model.visual
        merge = visual.spatial_merge_size
        frames_per_patch = self.model.config.vision_config.temporal_patch_size
        config = self.model.config
        times = batch.get(VIDEO_TIMES)
        views: list[View] = []
        for kind, pix_key, grid_key, token_id in (
                ("image", "pixel_values", "image_grid_thw", config.image_token_id),
                ("video", "pixel_values_videos", "video_grid_thw", config.video_token_id)):
            if batch.get(pix_key) is None:
                continue
            grid_thw = batch[grid_key]
            tokens, deep, maps = self._run_tower(batch[pix_key], grid_thw, needs)
            segments = self._segments(grid_thw)
            sizes = [h * w // merge ** 2 for _, _, h, w in segments]
            windows = self._window_lengths(grid_thw)
            # The placeholders, row-major, are filled with the tokens in order (the model's masked_scatter).
            where = (batch["input_ids"] == token_id).nonzero()
            if where.shape[0] != sum(sizes):
                raise RuntimeError(f"{where.shape[0]} {kind} placeholders for {sum(sizes)} {kind} tokens")
            feats, places = tokens.split(sizes), where.split(sizes)
            deeps = deep.split(sizes, dim=1) if deep is not None else [None] * len(sizes)
            counts: dict[int, int] = {}  # images / videos seen per sample
            entry_index: dict[int, int] = {}
            for j, ((entry, k, h, w), feat, place) in enumerate(zip(segments, feats, places)):
                sample = int(place[0, 0])
                if entry not in entry_index:
                    entry_index[entry] = counts.get(sample, 0)
                    counts[sample] = entry_index[entry] + 1
                time = None
                if kind == "video" and times is not None:
                    t = float(times[entry, k * frames_per_patch])
                    time = None if math.isnan(t) else t
                views.append(View(
                    sample=sample, tokens=feat, grid=(h // merge, w // merge), seq_index=place[:, 1],
                    vision_attention=None if maps is None else maps[j], patch_merge=merge * merge,
                    # the merger is the projector, inside the tower: act on its outputs
                    vision_features=feat if needs.vision_features else None,
                    encoder_seqs=(h * w,), encoder_windows=windows[j], deepstack=deeps[j],
                    image=entry_index[entry] if kind == "image" else None,
                    clip=entry_index[entry] if kind == "video" else None,
                    frame=k * frames_per_patch if kind == "video" else None, time=time))
        views.sort(key=lambda v: (v.sample, int(v.seq_index[0])))
        return views

    def position_ids(self, batch) -> torch.Tensor:
        """The model's own ``get_rope_index`` over the full batch: ``[3, B, L]``."""
        extra = {}
        if batch.get("second_per_grid_ts") is not None:  # Qwen2.5-VL videos: temporal positions in seconds
            extra["second_per_grid_ts"] = batch["second_per_grid_ts"]
        positions, _ = self.model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
            attention_mask=batch["attention_mask"], **extra,
        )
        return positions

    @torch.no_grad()
    def reference_vision_attention(self, batch, layer: int) -> list[torch.Tensor]:
        """Eager reference: q.k^T softmax of the scoring block, per image then per video temporal patch
        (the tower's segments), in original patch order.

        Qwen vision blocks return attention *outputs*, never probabilities, so the reference
        re-derives q and k from the block's own ``qkv`` projection and rotary embedding.
        """
        out = []
        for pix_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if batch.get(pix_key) is not None:
                out += self._reference_maps(batch[pix_key], batch[grid_key], layer)
        return out

    def _reference_maps(self, pixels: torch.Tensor, grid_thw: torch.Tensor, layer: int) -> list[torch.Tensor]:
        visual = self.model.model.visual
        idx = self._score_block(layer)
        captured = {}
        handle = visual.blocks[idx].register_forward_pre_hook(
            lambda mod, args, kwargs: captured.update(x=args[0], pe=kwargs["position_embeddings"]), with_kwargs=True)
        try:
            visual(pixels.to(visual.dtype), grid_thw=grid_thw)
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
                grid_thw, spatial_merge_size=visual.spatial_merge_size,
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
        # one segment per temporal patch: h * w patches each (an image is one temporal patch)
        for n in torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist():
            out.append(probs[:, start:start + n, start:start + n].softmax(-1).mean(0))
            start += n
        return out
