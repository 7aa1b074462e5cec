"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP, anyres with ``anyres_max_N``.

The image path mirrors the model's own ``get_image_features`` + ``pack_image_features``: every crop
goes through the tower and the projector (``(image_size / patch_size)^2`` tokens each: 729 for
SigLIP-so400m at 384 px, no CLS), then, per image, three views:

* the base view: the whole image resized, ``s x s`` tokens;
* the high-res view: the crops stitched into one grid, unpadded to the image's aspect ratio
  (``H x W``) and, when ``H * W > 1.1^2 * N * s^2`` for ``vision_aspect_ratio="anyres_max_N"``,
  bilinearly downsampled to ``H' x W' = (H // r) x (W // r)``, ``r = sqrt(H W / (N s^2))``;
* the newline embedding ending each high-res row: placed, never pruned (as in LLaVA-NeXT).

Vision attention follows the features through the same linear maps. Unpadding selects stitched
tokens; bilinear downsampling makes each token ``t'_a = sum_p W[a, p] t_p`` with ``W = Wh (x) Ww``
(one weight matrix per axis, read off ``torch.nn.functional.interpolate`` itself). The high-res
map is ``A' = W A W^T`` where ``A`` is the crops' block-diagonal map over the unpadded grid: the
map's query rows and key columns are interpolated exactly as the tokens are, so a token's column
mean is the bilinear blend of its sources' received attention (weighted by how much of each query
survives), and without downsampling ``W`` is the unpadding selection, giving LLaVA-NeXT's
block-diagonal composition unchanged. ``A'`` is computed crop by crop on the rectangle of output
tokens each crop touches (never the full ``(crops * s^2)^2`` map). Vision features and keys of a
downsampled view are interpolated the same way; a pruner that merges *before* the projector
(VisionZip) therefore projects interpolated features, where the model interpolates projected
ones (they differ by the projector's non-linearity).

Multi-image samples (a list of images per sample; the processor's ``batch_num_images > 1``): each
image is one base crop + one newline, no anyres (the model's ``get_image_features`` decides so);
:meth:`LlavaOnevisionLVLM.image_inputs` hands the processor each sample's images as one nested list, so
that it writes ``batch_num_images``. Every image's views carry ``View.image``, its index in the prompt.

Videos (``pixel_values_videos [V, T, 3, px, px]``): ``get_video_features`` runs the tower on every
frame, projects the ``s x s`` tokens, then ``apply_pooling`` interpolates each frame bilinearly to
``p x p``, ``p = ceil(s / 2)`` (27 -> 14 at 384 px), and appends ONE ``image_newline`` after all
frames: ``<video>`` x ``(T p^2 + 1)``. One view per frame (grid ``(p, p)``, ``View.frame`` /
``time`` / ``clip``), then the newline as a ``prunable=False`` view. Pooling is linear,
``t'_a = sum_q P[a, q] t_q`` with ``P`` ``[p^2, s^2]`` read off ``F.interpolate`` applied to the
identity (the op the model runs); a frame's vision attention is therefore mapped as the high-res
view's is, ``A' = P A P^T`` (prefix row ``A[0] P^T``, column ``P A[:, 0]``), in token order, and its
vision features and keys are ``P`` applied to the frame's (a pre-projector merge projects pooled
features where the model pools projected ones, as for the high-res view). Frames never attend to
each other in the tower. ``View.time`` comes from the ``tp_video_times`` ``[V, T]`` entry that
:meth:`PrunableLVLM.prepare` adds to the batch (each :class:`~tokenprune.media.Video`'s ``times``; drop ``tp_*``
entries before calling the Hugging Face model), ``None`` without it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from ..errors import OptionError
from ..pruner import PrunerNeeds
from .base import View
from .common import eager_vision_attention, refuse_in_vision_video, vision_recorder
from .llava import image_spans
from .llava_next import LlavaNextLVLM, _stitch
from .base import VIDEO_TIMES
from .llava_next_video import pool_map


def max_num_patches(vision_aspect_ratio: str) -> int:
    """``N`` of ``"anyres_max_N"``, parsed as the model does (``str.strip`` of those characters)."""
    try:
        return int(vision_aspect_ratio.strip("anyres_max_"))
    except ValueError:
        raise OptionError(f"LLaVA-OneVision vision_aspect_ratio {vision_aspect_ratio!r} is not supported; "
                          "use 'anyres_max_N'") from None


@dataclass(frozen=True)
class HighRes:
    """Host-side layout of one image's high-res view.

    ``crops = (nph, npw)`` crops of ``side x side`` tokens stitched into ``nph*side x npw*side``;
    unpadding keeps rows ``top:top+h``, columns ``left:left+w``; ``out = (h', w')`` is the view's
    grid, ``(h, w)`` unless downsampled.
    """

    crops: tuple[int, int]
    side: int
    top: int
    left: int
    unpadded: tuple[int, int]
    out: tuple[int, int]

    @property
    def downsampled(self) -> bool:
        return self.out != self.unpadded


def high_res_layout(size: tuple[int, int], pinpoints: list, crop_px: int, side: int, max_patches: int) -> HighRes:
    """The high-res layout of an image of ``size = (height, width)``, computed as the model does.

    Unpadding is the model's own ``unpad_image`` applied to a grid of row / column indices;
    the downsampling target is ``pack_image_features``' arithmetic.
    """
    nph, npw = get_anyres_image_grid_shape(list(size), pinpoints, crop_px)
    rows, cols = torch.meshgrid(torch.arange(nph * side), torch.arange(npw * side), indexing="ij")
    kept = unpad_image(torch.stack([rows, cols]), list(size))  # [2, h, w]
    h, w = kept.shape[1:]
    ratio = math.sqrt(h * w / (max_patches * side ** 2))
    out = (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)
    return HighRes((nph, npw), side, int(kept[0, 0, 0]), int(kept[1, 0, 0]), (h, w), out)


def _axis_weights(layout: HighRes, axis: int) -> torch.Tensor:
    """``[out, crops * side]`` (CPU, float32): output row (``axis=0``) or column of the view as a linear
    combination of stitched rows / columns -- unpadding's selection, then bilinear interpolation's
    weights, read off ``F.interpolate`` applied to an identity (the op the features go through)."""
    n_full = layout.crops[axis] * layout.side
    start = layout.top if axis == 0 else layout.left
    n_in, n_out = layout.unpadded[axis], layout.out[axis]
    select = torch.eye(n_full)[start:start + n_in]  # [n_in, n_full]
    if n_out == n_in:
        return select
    eye = torch.eye(n_in).view(1, n_in, n_in, 1)  # channel c = the one-hot row c
    interp = F.interpolate(eye, [n_out, 1], mode="bilinear")[0, :, :, 0].T  # [n_out, n_in]
    return interp @ select


def _crop_factors(layout: HighRes, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per crop row (``axis=0``) or column: ``([k, r, side] weights, [k, r] output indices)`` of the
    ``r`` (padded to the largest) output rows / columns that crop block touches; padding rows carry
    zero weight."""
    weights = _axis_weights(layout, axis)
    k, s = layout.crops[axis], layout.side
    blocks = weights.view(weights.shape[0], k, s).permute(1, 0, 2)  # [k, out, side]
    touched = blocks.ne(0).any(-1)  # [k, out], contiguous runs (interpolation is local)
    first = touched.int().argmax(1)
    count = touched.sum(1)
    r = max(int(count.max()), 1)
    offsets = torch.arange(r)
    index = (first[:, None] + offsets).clamp(max=weights.shape[0] - 1)  # [k, r]
    factors = blocks.gather(1, index[:, :, None].expand(-1, -1, s)) * (offsets < count[:, None])[:, :, None]
    return factors, index


def compose_high_res(maps: torch.Tensor, layout: HighRes, prefix: int) -> torch.Tensor:
    """The crops' maps ``[c, T, T]`` (``T = prefix + side^2``) -> the high-res view's map
    ``[prefix + h'w', prefix + h'w']``: ``W A W^T`` with ``A`` block-diagonal over crops and ``W`` the
    view's unpadding + downsampling map, evaluated crop by crop on the output rectangle each crop touches.

    The prefix row holds the crops' CLS->patch attention mapped by ``W`` (LLaVA-NeXT's convention:
    each patch's own crop's CLS), the prefix column patch->CLS likewise, the corner their mean.
    """
    nph, npw = layout.crops
    a, rows = _crop_factors(layout, 0)  # [nph, r, s], [nph, r]
    b, cols = _crop_factors(layout, 1)  # [npw, q, s], [npw, q]
    crop_row = torch.arange(nph * npw) // npw  # crop c = (c // npw, c % npw), raster order
    crop_col = torch.arange(nph * npw) % npw
    dev, dt = maps.device, maps.dtype
    a, b = a[crop_row].to(dev, dt), b[crop_col].to(dev, dt)
    c, r, q, s = a.shape[0], a.shape[1], b.shape[1], layout.side
    k = torch.einsum("cxp,cyq->cxypq", a, b).reshape(c, r * q, s * s)  # [c, r*q, side^2]: W per crop
    w_out = layout.out[1]
    index = (rows[crop_row][:, :, None] * w_out + cols[crop_col][:, None, :]).reshape(c, r * q).to(dev)
    n_out = layout.out[0] * w_out
    patches = k @ maps[:, prefix:, prefix:] @ k.transpose(1, 2)  # [c, r*q, r*q]
    out = torch.zeros(n_out, n_out, device=dev, dtype=dt)
    out.index_put_((index[:, :, None].expand_as(patches), index[:, None, :].expand_as(patches)), patches, accumulate=True)
    if prefix == 0:
        return out
    row = torch.zeros(n_out, device=dev, dtype=dt).index_put_(
        (index,), (k @ maps[:, 0, prefix:, None])[..., 0], accumulate=True)
    col = torch.zeros(n_out, device=dev, dtype=dt).index_put_(
        (index,), (k @ maps[:, prefix:, 0, None])[..., 0], accumulate=True)
    top = torch.cat([maps[:, 0, 0].mean().view(1), row])
    return torch.cat([top[None], torch.cat([col[:, None], out], 1)], 0)


def pack_high_res(x: torch.Tensor, layout: HighRes, size: tuple[int, int]) -> torch.Tensor:
    """Crop tokens ``[c, side^2, D]`` -> the high-res view's tokens ``[h'w', D]``, raster order:
    ``pack_image_features``' own ops (stitch, ``unpad_image``, bilinear ``interpolate``)."""
    nph, npw = layout.crops
    grid = unpad_image(_stitch(x, nph, npw, layout.side), list(size))  # [D, h, w]
    if layout.downsampled:
        grid = F.interpolate(grid[None], list(layout.out), mode="bilinear")[0]
    return grid.flatten(1).transpose(0, 1)


class LlavaOnevisionLVLM(LlavaNextLVLM):
    """Adapter for LLaVA-OneVision: single-image anyres, multi-image prompts and videos (see the
    module docstring)."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)

    def vision_spec(self):
        """The tower's FLOPs shape; every crop's (and frame's) ``s^2`` tokens are embedded and projected,
        including those unpadding drops or downsampling / pooling blends (``tokens_per_seq``)."""
        from dataclasses import replace

        vc = self.model.config.vision_config
        return replace(super().vision_spec(), tokens_per_seq=(vc.image_size // vc.patch_size) ** 2)

    def image_inputs(self, samples) -> list | None:
        """Each sample's images as one nested list (``[[a, b], [c]]``): how the processor tells a multi-image
        sample (``batch_num_images``, base views only) from single images (anyres)."""
        nested = [s.images for s in samples if s.images]
        return nested or None

    def video_processor(self):
        """Frames resized to the image processor's ``size`` (the tower's ``image_size``) and normalised with its
        mean / std (:class:`~tokenprune.media.processors.frames.FramesProcessor`): ``pixel_values_videos
        [V, T, 3, px, px]``, as transformers' ``LlavaOnevisionVideoProcessor`` lays them out."""
        from ..media.processors.frames import FramesProcessor

        return FramesProcessor.from_image_processor(self.processor.image_processor)

    def _images(self, batch) -> tuple[list[int], list[tuple[int, int]], list[int]]:
        """Per image, in the processor's order: its crop count, its ``(height, width)`` and its token count
        (host ints).

        ``batch_num_images`` (one entry per sample that shows images) as the processor writes it: an
        image of a sample with several gets one base crop (+ one newline), as ``get_image_features``
        decides; a lone image is anyres-tiled.
        """
        cfg = self.model.config
        sizes = [tuple(int(v) for v in s) for s in batch["image_sizes"].tolist()]
        per_sample = batch.get("batch_num_images")
        per_sample = [1] * len(sizes) if per_sample is None else [int(n) for n in torch.as_tensor(per_sample).tolist()]
        multi = [n != 1 for n in per_sample for _ in range(n)]
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        crops, counts = [], []
        for size, m in zip(sizes, multi):
            if m:
                crops.append(1)
                counts.append(side * side + 1)
            else:
                crops.append(image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size))
                h, w = self._layout(size).out
                counts.append(side * side + h * (w + 1))
        return crops, sizes, counts

    def _layout(self, size: tuple[int, int]) -> HighRes:
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return high_res_layout(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size, side,
                               max_num_patches(cfg.vision_aspect_ratio))

    def encode_images(self, batch, needs: PrunerNeeds) -> list[View]:
        """Every view of the batch, per sample in sequence order (``[]`` without images or videos).

        Per lone image: base ``[s^2, D]`` (grid ``(s, s)``), high-res ``[h'w', D]`` (grid ``(h', w')``),
        ``h'`` newlines; per image of a multi-image sample: base ``[s^2, D]`` + one newline; per video:
        one ``[p^2, D]`` view per frame (grid ``(p, p)``) + one newline (see the module docstring).
        """
        cfg = self.model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise OptionError("LLaVA-OneVision with several vision_feature_layers is not supported; use one layer")
        views: list[View] = []
        if batch.get("pixel_values") is not None:
            views += self._image_views(batch, needs)
        if batch.get("pixel_values_videos") is not None:
            views += self._video_views(batch, needs)
        if batch.get("pixel_values") is not None and batch.get("pixel_values_videos") is not None:
            first = torch.stack([v.seq_index[0] for v in views]).tolist()  # one host sync
            order = sorted(range(len(views)), key=lambda i: (views[i].sample, first[i]))
            views = [views[i] for i in order]
        return views

    def _image_views(self, batch, needs: PrunerNeeds) -> list[View]:
        """The images' views. Shapes: ``pixel_values`` ``[images, max_crops, 3, px, px]``; maps ``[crops, T, T]``
        per image become ``[prefix + s^2]^2`` (base) and ``[prefix + h'w']^2`` (high-res, see :func:`compose_high_res`)."""
        cfg = self.model.config
        inner = self.model.model
        tower = inner.vision_tower
        n_crops, sizes, counts = self._images(batch)
        pixels = torch.cat([p[:n] for p, n in zip(batch["pixel_values"], n_crops)]).to(tower.dtype)
        with vision_recorder(tower, needs, all_rows=True) as rec:  # composition needs every row
            out = tower(pixels, output_hidden_states=True, return_dict=True)
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        hidden = out.hidden_states[cfg.vision_feature_layer]  # [crops, T, Dv]
        raw = hidden[:, prefix:]  # what the projector reads
        keys = rec.keys[0].mean(1) if rec is not None and needs.vision_keys else None  # [crops, T, d]
        feats = inner.multi_modal_projector(raw)  # [crops, s^2, D]
        maps = rec.maps[0] if rec is not None else None  # [crops, T, T]
        home = batch["input_ids"].device  # tower and projector may compute elsewhere (device_map)
        feats, newline = feats.to(home), inner.image_newline.to(home)
        maps = None if maps is None else maps.to(home)
        keys = None if keys is None else keys.to(home)
        if needs.vision_features:
            raw, hidden = raw.to(home), hidden.to(home)
        seq_len = hidden.shape[1]
        n = feats.shape[1]
        side = math.isqrt(n)
        views: list[View] = []
        start = 0
        spans = image_spans(batch["input_ids"], cfg.image_token_id, counts)
        for (b, j, seq), crops, size in zip(spans, n_crops, sizes):
            f, sl = feats[start:start + crops], slice(start, start + crops)
            views.append(View(sample=b, tokens=f[0], grid=(side, side), seq_index=seq[:n],
                              vision_attention=None if maps is None else maps[start], vision_prefix=prefix,
                              vision_features=raw[start] if needs.vision_features else None,
                              vision_prefix_features=hidden[start, :prefix] if needs.vision_features else None,
                              vision_keys=None if keys is None else keys[start], encoder_seqs=(seq_len,), image=j))
            if crops == 1:  # an image of a multi-image sample: the base crop and one newline
                views.append(View(sample=b, tokens=newline[None], grid=(1, 1), seq_index=seq[n:n + 1],
                                  prunable=False, image=j))
            else:
                layout = self._layout(size)
                h, w = layout.out
                hi_seq = seq[n:n + h * (w + 1)].view(h, w + 1)
                k = None
                if keys is not None:  # one prefix row for the crops' CLS keys, as in the map
                    k = torch.cat([keys[sl][1:, :prefix].mean(0), pack_high_res(keys[sl][1:, prefix:], layout, size)])
                views.append(View(
                    sample=b, tokens=pack_high_res(f[1:], layout, size), grid=(h, w), seq_index=hi_seq[:, :w].flatten(),
                    vision_attention=None if maps is None else compose_high_res(maps[sl][1:], layout, prefix),
                    vision_prefix=prefix, encoder_seqs=(seq_len,) * (crops - 1), vision_keys=k, image=j,
                    vision_features=pack_high_res(raw[sl][1:], layout, size) if needs.vision_features else None))
                views.append(View(sample=b, tokens=newline[None].expand(h, -1), grid=(h, 1),
                                  seq_index=hi_seq[:, w], prunable=False, image=j))
            start += crops
        return views

    def pooling_matrix(self) -> torch.Tensor:
        """``[p^2, s^2]`` float32 (CPU): ``apply_pooling``'s bilinear interpolation of one frame's ``s x s``
        tokens to ``p x p`` as a matrix, read off ``F.interpolate`` applied to the identity (the op itself)."""
        vc = self.model.config.vision_config
        s = vc.image_size // vc.patch_size
        p = math.ceil(s / 2)  # apply_pooling's target
        eye = torch.eye(s * s).view(s * s, 1, s, s)  # channel-free basis images, one per token
        return F.interpolate(eye, size=[p, p], mode="bilinear").view(s * s, p * p).T.contiguous()

    def _video_views(self, batch, needs: PrunerNeeds) -> list[View]:
        """The videos' views: per frame ``[p^2, D]`` (grid ``(p, p)``), maps ``[prefix + p^2]^2`` (``P A P^T``),
        features ``[p^2, Dv]``, keys ``[prefix + p^2, d]``; then the video's newline (``prunable=False``).

        ``pixel_values_videos``: ``[V, T, 3, px, px]``; the tower sees ``V * T`` frames, each on its own.
        """
        cfg = self.model.config
        inner = self.model.model
        tower = inner.vision_tower
        refuse_in_vision_video(self.family, needs)
        pixels = batch["pixel_values_videos"]
        n_videos, t = pixels.shape[:2]
        with vision_recorder(tower, needs, all_rows=True) as rec:  # P A P^T needs every row
            out = tower(pixels.flatten(0, 1).to(tower.dtype), output_hidden_states=True, return_dict=True)
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        hidden = out.hidden_states[cfg.vision_feature_layer]  # [V*T, S, Dv]
        raw = hidden[:, prefix:]
        pooled = inner.apply_pooling(inner.multi_modal_projector(raw))  # [V*T, p^2, D]: the model's own ops
        home = batch["input_ids"].device
        pooled, newline = pooled.to(home), inner.image_newline.to(home)
        per_frame = pooled.shape[1]
        side = math.isqrt(per_frame)
        weights = self.pooling_matrix().to(home, hidden.dtype) if rec is not None or needs.vision_features else None
        maps = pool_map(rec.maps[0].to(home), weights, prefix) if rec is not None else None  # [V*T, T', T']
        received = None
        if rec is not None and rec.maps[0].shape[1] == rec.maps[0].shape[2]:  # all rows: each raw query counts once
            received = rec.maps[0].to(home).mean(1)[:, prefix:] @ weights.T.to(rec.maps[0].dtype)  # [V*T, T']
        keys = None
        if rec is not None and needs.vision_keys:
            k = rec.keys[0].mean(1).to(home)  # [V*T, S, d]
            keys = torch.cat([k[:, :prefix], weights.to(k.dtype) @ k[:, prefix:]], 1)
        feats = prefix_feats = None
        if needs.vision_features:
            hidden = hidden.to(home)
            feats, prefix_feats = weights @ hidden[:, prefix:], hidden[:, :prefix]
        times = batch.get(VIDEO_TIMES)
        times = None if times is None else times.tolist()
        seq_len = hidden.shape[1]
        views: list[View] = []
        spans = image_spans(batch["input_ids"], cfg.video_token_id, [t * per_frame + 1] * n_videos)
        for v, (b, j, seq) in enumerate(spans):
            for f in range(t):
                i = v * t + f
                views.append(View(
                    sample=b, tokens=pooled[i], grid=(side, side), seq_index=seq[f * per_frame:(f + 1) * per_frame],
                    vision_attention=None if maps is None else maps[i], vision_prefix=prefix,
                    vision_features=None if feats is None else feats[i],
                    vision_prefix_features=None if prefix_feats is None else prefix_feats[i],
                    vision_keys=None if keys is None else keys[i], encoder_seqs=(seq_len,),
                    vision_received=None if received is None else received[i],
                    image=None, clip=j, frame=f, time=None if times is None else float(times[v][f])))
            views.append(View(sample=b, tokens=newline[None], grid=(1, 1), seq_index=seq[-1:], prunable=False,
                              image=None, clip=j))
        return views

    @torch.no_grad()
    def reference_vision_attention(self, batch, layer: int) -> list[torch.Tensor]:
        """Eager ``output_attentions`` reference for every prunable view of the batch's images (processor
        order), in the adapter's layout.

        Independent of :func:`compose_high_res`: the dense block-diagonal map over the whole stitched
        grid, cut to the unpadded rectangle (offsets found from shapes), then ``W A W^T`` with ``W``
        the dense Kronecker product of bilinear weights written out from the formula
        (``align_corners=False``: source ``(i + 0.5) * in / out - 0.5``, clamped at 0).
        """
        cfg = self.model.config
        tower = self.model.model.vision_tower
        n_crops, sizes, _ = self._images(batch)
        pixels = torch.cat([p[:n] for p, n in zip(batch["pixel_values"], n_crops)])
        att = eager_vision_attention(tower, pixels, layer)
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        out, start = [], 0
        for crops, size in zip(n_crops, sizes):
            out.append(att[start])
            if crops > 1:
                nph, npw = get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                rows, cols = torch.meshgrid(torch.arange(nph * side), torch.arange(npw * side), indexing="ij")
                crop = ((rows // side) * npw + cols // side).flatten()
                token = ((rows % side) * side + cols % side).flatten()
                m = att[start + 1:start + crops]
                full = m[crop[:, None], prefix + token[:, None], prefix + token[None, :]] * (crop[:, None] == crop[None, :])
                hh, ww = unpad_image(torch.zeros(1, nph * side, npw * side), list(size)).shape[1:]
                dh, dw = (nph * side - hh) // 2, (npw * side - ww) // 2
                sel = torch.zeros(nph * side, npw * side, dtype=torch.bool)
                sel[dh:dh + hh, dw:dw + ww] = True
                sel = sel.flatten()
                ratio = math.sqrt(hh * ww / (max_num_patches(cfg.vision_aspect_ratio) * side ** 2))
                oh, ow = (int(hh // ratio), int(ww // ratio)) if ratio > 1.1 else (hh, ww)
                w = torch.kron(_bilinear_matrix(hh, oh), _bilinear_matrix(ww, ow))  # [oh*ow, hh*ww]
                pp = w @ full[sel][:, sel] @ w.T
                if prefix:
                    cls_row = w @ m[crop, 0, prefix + token][sel]
                    cls_col = w @ m[crop, prefix + token, 0][sel]
                    top = torch.cat([m[:, 0, 0].mean().view(1), cls_row])
                    pp = torch.cat([top[None], torch.cat([cls_col[:, None], pp], 1)], 0)
                out.append(pp)
            start += crops
        return out


def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` 1-D linear-interpolation weights (PyTorch's ``align_corners=False``), from the formula."""
    if n_in == n_out:
        return torch.eye(n_in)
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w[torch.arange(n_out), lo] += 1 - frac
    w[torch.arange(n_out), hi] += frac
    return w.float()
