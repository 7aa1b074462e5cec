"""InternVL (``InternVLForConditionalGeneration``): tiles + thumbnail, InternViT with CLS, pixel shuffle.

Each tile is a view, pruned on its own (a per-tile budget, proportional by construction). Pixel
shuffle (0.5) folds 2x2 patches into one token; where each patch goes is read off the model's
own ``pixel_shuffle`` applied to patch indices, so the attention map handed to a pruner is in
merge order (patch ``p`` -> token ``p // 4``) without re-deriving the reshape arithmetic.

Several images per sample: each image is ``<img>`` + its tiles' ``<IMG_CONTEXT>`` tokens (tiles, then
the thumbnail) + ``</img>``; a run of consecutive context tokens is one image. Video: InternVL has no
video tower, the processor puts each sampled frame into ``pixel_values`` as ONE tile and writes
``Frame{i}: <img>`` + one tile's context tokens + ``</img>`` per frame, joined by newlines; so a frame
is a single-tile view (the InternViT attends within it only, as within any tile) and the ``Frame{i}:``
text and the ``<img>``/``</img>`` markers are text tokens, never pruned.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import OptionError
from ..pruner import PrunerNeeds
from .base import VIDEO_SAMPLES, VIDEO_TIMES, PrunableLVLM, View
from .common import eager_vision_attention, vision_recorder


class InternVLLVLM(PrunableLVLM):
    """Adapter for ``InternVLForConditionalGeneration`` (InternVL 2.5 / 3 in transformers format)."""

    family = "internvl"
    model_types = ("internvl",)

    def video_inputs(self, videos: Sequence[Any]) -> dict[str, Any]:
        """``videos=[frames ...]`` and ``do_sample_frames=False`` (each Video is sampled already; this also
        stops a hub video processor that samples by default from resampling it).

        Raises:
            OptionError: the videos have different frame counts (the HF processor cannot batch them).
        """
        counts = sorted({int(v.num_frames) for v in videos})
        if len(counts) > 1:
            raise OptionError(f"InternVL's processor batches videos of one frame count only, got {counts}: sample "
                              "every video to the same number of frames, or put them in separate batches")
        return {**super().video_inputs(videos), "do_sample_frames": False}

    def video_processor(self) -> Any:
        """A torchvision-free stand-in for ``InternVLVideoProcessor``: frames resized to the image processor's
        tile size and normalised with its mean/std (see :mod:`tokenprune.media.processors.internvl`)."""
        from ..media.processors.internvl import internvl_video_processor

        return internvl_video_processor(self.processor.image_processor)

    def _merge_order(self, side: int) -> torch.Tensor:
        """``[side*side]`` patch indices in merge order (4 consecutive patches = one token)."""
        ratio = self.model.config.downsample_ratio
        index = torch.arange(side * side, dtype=torch.float32).view(1, side, side, 1)
        shuffled = self.model.model.pixel_shuffle(index, scale_factor=ratio)  # [1, s', s', 1/ratio^2]
        return shuffled.reshape(-1).long()

    def encode_images(self, batch, needs: PrunerNeeds) -> list[View]:
        """Every tile and frame of the batch as a :class:`View`, in sequence order.

        An image gives one view per tile (its tiles, then its thumbnail), ``image`` = its index among
        the sample's images; a video gives one single-tile view per frame, ``clip=0``, ``frame`` = the
        frame's index, ``time`` = its time in seconds (from ``tp_video_times``, see :meth:`PrunableLVLM.prepare`; a
        batch without that entry is read as images only). Each view: ``grid`` = the tile's token grid
        ``(s, s)``, ``seq_index`` = its ``<IMG_CONTEXT>`` positions, vision attention / features / keys
        of that tile alone (the InternViT runs on each tile, so each frame, separately).
        """
        cfg = self.model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise OptionError("InternVL with several vision_feature_layers is not supported; use one layer")
        tower = self.model.model.vision_tower
        projector_input: list[torch.Tensor] = []
        handle = None
        if needs.vision_features:  # the pixel-shuffled features, as the projector (mlp1) reads them
            handle = self.model.model.multi_modal_projector.register_forward_pre_hook(
                lambda mod, args: projector_input.append(args[0]))
        try:
            with vision_recorder(tower, needs) as rec:
                feats = self.model.model.get_image_features(
                    pixel_values=batch["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
                    vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                ).pooler_output  # [tiles, n, D]
        finally:
            if handle is not None:
                handle.remove()
        raw = projector_input[0].reshape(feats.shape[0], feats.shape[1], -1) if projector_input else None
        tiles, n, _ = feats.shape
        side = math.isqrt(n)
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        merge = round(1 / cfg.downsample_ratio ** 2)
        maps, keys = None, None
        if rec is not None:
            att = rec.maps[0]  # [tiles, rows, T] over CLS + patches in raster order
            order = torch.cat([torch.arange(prefix), prefix + self._merge_order(math.isqrt(att.shape[-1] - prefix))])
            order = order.to(att.device)
            maps = att[:, :, order]
            if att.shape[1] == att.shape[2]:  # all rows: permute them too
                maps = maps[:, order]
            if needs.vision_keys:  # head mean, merge order, each token's patches averaged
                k = rec.keys[0].mean(1)[:, order]  # [tiles, T, d]
                keys = torch.cat([k[:, :prefix], k[:, prefix:].unflatten(1, (-1, merge)).mean(2)], 1)
        image_pos = batch["input_ids"] == cfg.image_token_id
        # Nothing in the token ids tells a video frame from a one-tile image: the batch rows holding a video
        # (and its frame times) come from the entries PrunableLVLM.prepare adds.
        times: list[list[float] | None] = [None] * image_pos.shape[0]
        if batch.get(VIDEO_TIMES) is not None:
            for row, clip_times in zip(batch[VIDEO_SAMPLES].tolist(), batch[VIDEO_TIMES].tolist()):
                times[row] = [t for t in clip_times if t == t]  # NaN pads shorter clips
        views, tile = [], 0

        def view(b: int, chunk: torch.Tensor, tile: int, **where: Any) -> View:
            return View(sample=b, tokens=feats[tile], grid=(side, side), seq_index=chunk,
                        vision_attention=None if maps is None else maps[tile],
                        vision_features=None if raw is None else raw[tile],
                        vision_keys=None if keys is None else keys[tile],
                        vision_prefix=prefix, patch_merge=merge, encoder_seqs=(prefix + n * merge,), **where)

        for b in range(image_pos.shape[0]):
            seq = image_pos[b].nonzero().flatten()
            # One run of consecutive context tokens per image (its tiles, then its thumbnail) or per frame:
            # runs are separated by at least the </img> and <img> markers.
            cuts = ((seq[1:] - seq[:-1]) != 1).nonzero().flatten() + 1
            runs = list(torch.tensor_split(seq, cuts.tolist())) if seq.numel() else []
            if times[b] is not None and len(runs) != len(times[b]):
                raise RuntimeError(f"sample {b}: {len(times[b])} video frames but {len(runs)} frame spans "
                                   "in the prompt")
            for i, run in enumerate(runs):
                if run.numel() % n:
                    raise RuntimeError(f"sample {b}: a span of {run.numel()} image tokens is not a whole number "
                                       f"of {n}-token tiles")
                for chunk in run.split(n):
                    if times[b] is None:
                        views.append(view(b, chunk, tile, image=i))
                    elif run.numel() != n:
                        raise RuntimeError(f"sample {b}: video frame {i} spans {run.numel()} tokens, "
                                           f"not one tile of {n}")
                    else:
                        views.append(view(b, chunk, tile, image=None, clip=0, frame=i, time=times[b][i]))
                    tile += 1
        if tile != tiles:
            raise RuntimeError(f"{tiles} tiles encoded but {tile} placed in the prompt")
        return views

    @torch.no_grad()
    def reference_vision_attention(self, batch, layer: int) -> list[torch.Tensor]:
        """Eager ``output_attentions`` reference, permuted into merge order with explicit 2x2 arithmetic."""
        att = eager_vision_attention(self.model.model.vision_tower, batch["pixel_values"], layer)  # [tiles, T, T]
        side = math.isqrt(att.shape[-1] - 1)
        # Token (i, j) covers patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
        i, j = torch.meshgrid(torch.arange(side // 2), torch.arange(side // 2), indexing="ij")
        rows = torch.stack([2 * i, 2 * i, 2 * i + 1, 2 * i + 1], -1).reshape(-1)
        cols = torch.stack([2 * j, 2 * j + 1, 2 * j, 2 * j + 1], -1).reshape(-1)
        order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + rows * side + cols])
        return list(att[:, order][:, :, order])
