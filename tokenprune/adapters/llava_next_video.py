"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT's anyres images, plus videos.

Images take LLaVA-NeXT's path unchanged (:class:`~tokenprune.adapters.llava_next.LlavaNextLVLM`:
base view, unpadded high-res view, row newlines). Videos (``pixel_values_videos [V, T, 3, px, px]``)
follow the model's ``get_video_features``: the CLIP tower runs on every frame alone, the CLS token is
dropped (``vision_feature_select_strategy="default"``), the ``s x s`` patch features are pooled by the
``vision_resampler`` (``AvgPool2d``, stride 2: ``s/2 x s/2``) BEFORE the projector, and the frames'
tokens follow one another with no newline: ``<video>`` x ``T * (s/2)^2``. One view per frame (grid
``(s/2, s/2)``, ``View.frame`` / ``time`` / ``clip``).

Because the pooling comes before the projector, a frame's ``vision_features`` are the pooled features
(exactly what the projector reads: projecting them gives the tokens), unlike LLaVA-OneVision, which
pools projected tokens. Average pooling is linear, ``f'_a = sum_q P[a, q] f_q`` with ``P`` ``[(s/2)^2,
s^2]`` (four weights of 1/4 per row) read off the model's own pooling layer applied to the identity;
the frame's vision attention map is mapped as LLaVA-OneVision's downsampling is, ``A' = P A P^T``
(CLS row ``A[0] P^T``, column ``P A[:, 0]``, corner ``A[0, 0]``), in token order, and its keys are
``P`` applied to the patch keys (CLS key kept first). Max or conv pooling is not linear: videos then
run, but a pruner that needs vision attention or keys is refused in one line.

``View.time``: seconds, from the batch's ``tp_video_times`` ``[V, T]`` that :meth:`PrunableLVLM.prepare`
adds (each :class:`~tokenprune.media.Video`'s ``times``); drop ``tp_*`` entries before calling the Hugging
Face model. ``None`` for a batch built without it.
"""
from __future__ import annotations

import math

import torch

from ..errors import OptionError
from ..pruner import PrunerNeeds
from .base import VIDEO_TIMES, View
from .common import refuse_in_vision_video, vision_recorder
from .llava import image_spans
from .llava_next import LlavaNextLVLM

def pool_map(maps: torch.Tensor, weights: torch.Tensor, prefix: int) -> torch.Tensor:
    """Per-frame attention maps ``[F, prefix + n, prefix + n]`` -> ``[F, prefix + m, prefix + m]`` over tokens
    pooled by the linear map ``weights`` ``[m, n]``: patches ``W A W^T``, prefix rows ``A[:prefix] W^T``,
    prefix columns ``W A[:, :prefix]``, prefix corner unchanged (token order kept: row ``a`` is token ``a``)."""
    w = weights.to(maps.dtype)
    patches = w @ maps[:, prefix:, prefix:] @ w.T
    if prefix == 0:
        return patches
    top = torch.cat([maps[:, :prefix, :prefix], maps[:, :prefix, prefix:] @ w.T], 2)
    rest = torch.cat([w @ maps[:, prefix:, :prefix], patches], 2)
    return torch.cat([top, rest], 1)


class LlavaNextVideoLVLM(LlavaNextLVLM):
    """Adapter for LLaVA-NeXT-Video: images as LLaVA-NeXT, videos one view per frame (see the module docstring)."""

    family = "llava_next_video"
    model_types = ("llava_next_video",)

    def video_processor(self):
        """Frames resized (shortest edge) and centre-cropped as the image processor's ``size`` / ``crop_size``
        say (the tower's ``image_size``), normalised with its mean / std
        (:class:`~tokenprune.media.processors.frames.FramesProcessor`), as transformers'
        ``LlavaNextVideoVideoProcessor`` lays them out: ``pixel_values_videos [V, T, 3, px, px]``."""
        from ..media.processors.frames import FramesProcessor

        ip = self.processor.image_processor
        crop = getattr(ip, "crop_size", None)
        crop_frames = crop is not None and getattr(ip, "do_center_crop", True)
        return FramesProcessor.from_image_processor(ip, do_center_crop=crop_frames)

    def pooling_matrix(self) -> torch.Tensor:
        """``[m, s^2]`` float32 (CPU): the ``vision_resampler``'s average pooling of one frame's ``s x s`` patch
        features as a matrix, ``m = (s // stride)^2``, read off the model's pooling layer applied to the identity.

        Raises:
            OptionError: the resampler pools by max or conv (not linear).
        """
        cfg = self.model.config
        if cfg.spatial_pool_mode != "average":
            raise OptionError(f"LLaVA-NeXT-Video with spatial_pool_mode={cfg.spatial_pool_mode!r} pools frames "
                              "non-linearly, so vision attention / keys cannot follow the tokens; use a pruner that "
                              "needs neither (e.g. divprune, fastv, random)")
        s = cfg.vision_config.image_size // cfg.vision_config.patch_size
        eye = torch.eye(s * s).view(s * s, 1, s, s)
        pool = self.model.model.vision_resampler.pool
        with torch.no_grad():
            pooled = pool(eye)  # [s^2, 1, s', s']
        return pooled.flatten(1).T.contiguous()

    def encode_images(self, batch, needs: PrunerNeeds) -> list[View]:
        """Every view of the batch, per sample in sequence order: LLaVA-NeXT's image views, and per video
        one view per frame (tokens ``[(s/2)^2, D]``, grid ``(s/2, s/2)``); ``[]`` without images or videos."""
        views = super().encode_images(batch, needs) if batch.get("pixel_values") is not None else []
        if batch.get("pixel_values_videos") is not None:
            videos = self._video_views(batch, needs)
            if views:  # both kinds: merge in sequence order
                views += videos
                first = torch.stack([v.seq_index[0] for v in views]).tolist()  # one host sync
                order = sorted(range(len(views)), key=lambda i: (views[i].sample, first[i]))
                views = [views[i] for i in order]
            else:
                views = videos
        return views

    def _video_views(self, batch, needs: PrunerNeeds) -> list[View]:
        """One view per frame: tokens ``[m, D]``, features ``[m, Dv]`` (pooled: what the projector reads),
        maps ``[prefix + m]^2`` (``P A P^T``), keys ``[prefix + m, d]``; ``pixel_values_videos`` ``[V, T, 3, px, px]``."""
        cfg = self.model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise OptionError("LLaVA-NeXT-Video with several vision_feature_layers is not supported; use one layer")
        inner = self.model.model
        tower = inner.vision_tower
        refuse_in_vision_video(self.family, needs)
        pixels = batch["pixel_values_videos"]
        n_videos, t = pixels.shape[:2]
        weights = self.pooling_matrix() if needs.vision_attention_layer is not None else None  # refuse before the tower
        with vision_recorder(tower, needs, all_rows=True) as rec:  # P A P^T needs every row
            out = tower(pixels.flatten(0, 1).to(tower.dtype), output_hidden_states=True, return_dict=True)
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        hidden = out.hidden_states[cfg.vision_feature_layer]  # [V*T, S, Dv]
        pooled_raw = inner.vision_resampler(hidden[:, prefix:])  # [V*T, m, Dv]: what the projector reads
        tokens = inner.multi_modal_projector(pooled_raw)  # [V*T, m, D]
        home = batch["input_ids"].device
        tokens = tokens.to(home)
        per_frame = tokens.shape[1]
        side = math.isqrt(per_frame)
        maps = keys = received = None
        if rec is not None:
            weights = weights.to(home)
            maps = pool_map(rec.maps[0].to(home), weights, prefix)
            if rec.maps[0].shape[1] == rec.maps[0].shape[2]:  # all rows: each raw query counts once
                received = rec.maps[0].to(home).mean(1)[:, prefix:] @ weights.T.to(rec.maps[0].dtype)
            if needs.vision_keys:
                k = rec.keys[0].mean(1).to(home)  # [V*T, S, d]
                keys = torch.cat([k[:, :prefix], weights.to(k.dtype) @ k[:, prefix:]], 1)
        if needs.vision_features:
            pooled_raw, hidden = pooled_raw.to(home), hidden.to(home)
        times = batch.get(VIDEO_TIMES)
        times = None if times is None else times.tolist()
        seq_len = hidden.shape[1]
        views: list[View] = []
        spans = image_spans(batch["input_ids"], cfg.video_token_id, [t * per_frame] * n_videos)
        for v, (b, j, seq) in enumerate(spans):
            for f in range(t):
                i = v * t + f
                views.append(View(
                    sample=b, tokens=tokens[i], grid=(side, side), seq_index=seq[f * per_frame:(f + 1) * per_frame],
                    vision_attention=None if maps is None else maps[i], vision_prefix=prefix,
                    vision_features=pooled_raw[i] if needs.vision_features else None,
                    vision_prefix_features=hidden[i, :prefix] if needs.vision_features else None,
                    vision_keys=None if keys is None else keys[i], encoder_seqs=(seq_len,),
                    vision_received=None if received is None else received[i],
                    patches=seq_len - prefix,  # every patch is embedded; pooling comes after the tower
                    image=None, clip=j, frame=f, time=None if times is None else float(times[v][f])))
        return views
