"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres = a base view + stitched high-res crops.

Two views per image, each pruned with the same ratio (a budget proportional to its size):

* the base view: the whole image resized, ``s x s`` tokens;
* the high-res view: the crops stitched into one grid and unpadded to the image's aspect ratio,
  ``H' x W'`` tokens. Its attention map is the block-diagonal composition of the crops' maps
  (a patch attends within its crop only), with each crop's CLS merged into one prefix row/column.

The newline embedding that ends every high-res row is structure: placed, never pruned, counted
with the text. Which stitched token survives unpadding is read off the model's own ``unpad_image``
applied to token indices.

A multi-image sample gives these views for each of its images (``View.image`` = the image's index in
the prompt). The processor takes the images as one flat list (sample after sample, prompt order),
``image_sizes`` ``[images, 2]`` one row each and ``pixel_values`` ``[images, max_crops, 3, px, px]``
padded to the largest crop count; each image is anyres-tiled on its own (its crop count,
``image_size_to_num_patches`` of its size, and its unpadded grid follow from its size), and the model
fills the batch's image tokens row by row with the images' packed features in that order
(:func:`~tokenprune.adapters.llava.image_spans`).
"""
from __future__ import annotations


import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from ..errors import OptionError
from ..pruner import PrunerNeeds
from .base import View
from .common import eager_vision_attention, vision_recorder
from .llava import LlavaLVLM, image_spans


def _stitch(x: torch.Tensor, nph: int, npw: int, side: int) -> torch.Tensor:
    """Crops ``[nph*npw, side*side, C]`` -> one grid ``[C, nph*side, npw*side]``, as LLaVA-NeXT packs them."""
    x = x.view(nph, npw, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
    return x.flatten(1, 2).flatten(2, 3)


class LlavaNextLVLM(LlavaLVLM):
    """Adapter for LLaVA-NeXT (LLaVA-1.6) anyres models."""

    family = "llava_next"
    model_types = ("llava_next",)
    provides_vision_qk = False  # its views stitch crops: no one-to-one q / k rows per view (yet)

    def in_vision_refusal(self) -> str | None:
        """``None`` for a CLIP / SigLIP / DINOv2 tower: every view (base and crops) runs block by block, and
        each crop's surviving patches are scattered back to the stitched grid (:meth:`_encode_in_vision`).
        A pruner that merges inside the tower is refused in one line there: a merged token has no single
        cell of the stitched grid to return to."""
        return super().in_vision_refusal()

    def encode_images(self, batch, needs: PrunerNeeds) -> list[View]:
        """Per image, in the processor's order (samples in order, each sample's images in prompt order):
        the base view ``[s^2, D]`` (grid ``(s, s)``), the high-res view ``[h*w, D]`` (grid ``(h, w)``) and
        its ``h`` row newlines (``prunable=False``), all with ``View.image`` = the image's index in its
        sample; ``[]`` for a batch without images.

        ``pixel_values``: ``[images, max_crops, 3, px, px]`` (padded crops beyond each image's own
        count, ``image_size_to_num_patches`` of its ``image_sizes`` row, are not encoded, as in the model).
        """
        cfg = self.model.config
        if batch.get("pixel_values") is None:
            return []
        if not isinstance(cfg.vision_feature_layer, int):
            raise OptionError("LLaVA-NeXT with several vision_feature_layers is not supported; use one layer")
        inner = self.model.model
        tower = inner.vision_tower
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        sizes = batch["image_sizes"]
        n_crops = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
        pixels = torch.cat([p[:n] for p, n in zip(batch["pixel_values"], n_crops)]).to(tower.dtype)
        if needs.in_vision is not None:
            return self._encode_in_vision(batch, pixels, n_crops, needs.in_vision)
        with vision_recorder(tower, needs, all_rows=True) as rec:  # block composition needs every row
            out = tower(pixels, output_hidden_states=True, return_dict=True)
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        hidden = out.hidden_states[cfg.vision_feature_layer]
        raw = hidden[:, prefix:]  # what the projector reads
        keys = rec.keys[0].mean(1) if rec is not None and needs.vision_keys else None  # [crops, T, d]
        feats = inner.multi_modal_projector(raw)
        maps = rec.maps[0] if rec is not None else None  # [crops, T, T]
        newline = inner.image_newline
        home = batch["input_ids"].device  # tower and projector may compute elsewhere (device_map): stitch here
        feats, newline = feats.to(home), newline.to(home)
        maps = None if maps is None else maps.to(home)
        keys = None if keys is None else keys.to(home)
        if needs.vision_features:
            raw, hidden = raw.to(home), hidden.to(home)
        n = side * side
        # Each image's high-res layout first: its token count places it in the sequence (image_spans).
        layouts: list[torch.Tensor | None] = []  # per image: stitched-token index of each unpadded cell [H', W']
        counts = []
        for size, crops in zip(sizes, n_crops):
            if crops == 1:
                layouts.append(None)
                counts.append(n + 1)
                continue
            nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            index = torch.arange((crops - 1) * n, device=home, dtype=torch.float32)[:, None]
            kept = unpad_image(_stitch(index.view(crops - 1, n, 1), nph, npw, side), size)[0].long()  # [H', W']
            layouts.append(kept)
            counts.append(n + kept.shape[0] * (kept.shape[1] + 1))
        seq_len = out.hidden_states[0].shape[1]
        views, start = [], 0
        spans = image_spans(batch["input_ids"], cfg.image_token_id, counts)
        for (b, j, seq), crops, kept in zip(spans, n_crops, layouts):
            f = feats[start:start + crops]
            r = raw[start:start + crops] if needs.vision_features else None
            k = keys[start:start + crops] if keys is not None else None
            m = maps[start:start + crops] if maps is not None else None
            views.append(View(sample=b, tokens=f[0], grid=(side, side), seq_index=seq[:n],
                              vision_attention=None if m is None else m[0], vision_prefix=prefix,
                              vision_features=None if r is None else r[0],
                              vision_prefix_features=None if r is None else hidden[start, :prefix],
                              vision_keys=None if k is None else k[0], encoder_seqs=(seq_len,), image=j))
            if kept is None:
                views.append(View(sample=b, tokens=newline[None], grid=(1, 1), seq_index=seq[n:], prunable=False,
                                  image=j))
            else:
                h, w = kept.shape
                tokens = f[1:].reshape((crops - 1) * n, -1)[kept.flatten()]
                hi_seq = seq[n:].view(h, w + 1)
                attn = None
                if m is not None:
                    attn = self._compose(m[1:], kept.flatten(), prefix)
                # the crops' own maps, every cell (HiRED ranks a crop's padded cells too, then unpads)
                crop_attn = None if m is None else (m[1:, :prefix] if needs.vision_attention_rows == "prefix" else m[1:])
                views.append(View(sample=b, tokens=tokens, grid=(h, w), seq_index=hi_seq[:, :w].flatten(),
                                  vision_attention=attn, vision_prefix=prefix, encoder_seqs=(seq_len,) * (crops - 1),
                                  crop_attention=crop_attn, crop_layout=None if m is None else kept.flatten(),
                                  vision_features=None if r is None else r[1:].reshape((crops - 1) * n, -1)[kept.flatten()],
                                  # one prefix row for the crops' CLS tokens, as in the attention map
                                  vision_keys=None if k is None else torch.cat(
                                      [k[1:, :prefix].mean(0), k[1:, prefix:].reshape((crops - 1) * n, -1)[kept.flatten()]]),
                                  image=j))
                views.append(View(sample=b, tokens=newline[None].expand(h, -1), grid=(h, 1),
                                  seq_index=hi_seq[:, w], prunable=False, image=j))
            start += crops
        return views

    def _hires_layout(self, size, crops: int, side: int, device) -> torch.Tensor:
        """``[H', W']``: the stitched-crop token index (``crop * side^2 + patch``, crops after the base view)
        of each cell the model's ``unpad_image`` keeps, for an image of ``size`` in ``crops`` views."""
        cfg = self.model.config
        nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        n = side * side
        index = torch.arange((crops - 1) * n, device=device, dtype=torch.float32)[:, None]
        return unpad_image(_stitch(index.view(crops - 1, n, 1), nph, npw, side), size)[0].long()

    def _encode_in_vision(self, batch, pixels: torch.Tensor, n_crops: list[int], pruner) -> list[View]:
        """Views of every image with ``pruner`` cutting inside the tower (FlowCut's official NeXT port,
        ``flowcut/llava_arch.py`` ``prepare_inputs_labels_for_multimodal_flowcut``).

        Each image's views (base + crops) share one tower pass, each bringing
        :meth:`~tokenprune.pruner.TokenPruner.vision_view_target` patches to the projector. The base view
        keeps its survivors in the order the tower left them; each crop's survivors are scattered back
        to the stitched grid (``restore_image_features_sorted``), the unpadded cells kept (the model's
        own ``unpad_image`` layout, which the official ``unpad_mask`` recomputes) and read in raster
        order -- with **no** row newlines (the official multi-crop branch appends none): the newline
        slots leave the sequence. Only the tokens placed are projected.
        """
        from .vision_blocks import run_tower

        cfg = self.model.config
        inner = self.model.model
        tower = inner.vision_tower
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        if prefix == 0 and cfg.vision_feature_select_strategy != "full":
            raise OptionError(f"unknown vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        n = side * side
        home = batch["input_ids"].device
        sizes = batch["image_sizes"]
        layouts = [self._hires_layout(size, crops, side, home) for size, crops in zip(sizes, n_crops)]
        counts = [n + lay.shape[0] * (lay.shape[1] + 1) for lay in layouts]
        views, start = [], 0
        for (b, j, seq), crops, lay in zip(image_spans(batch["input_ids"], cfg.image_token_id, counts), n_crops, layouts):
            image_tokens = n + lay.numel()
            target = pruner.vision_view_target(n, image_tokens, crops)
            run = run_tower(tower, pixels[start:start + crops], pruner, cfg.vision_feature_layer, prefix, target=target)
            start += crops
            if bool((run.sizes > 1).any()):
                raise OptionError(f"{pruner.name} merges tokens inside the vision tower, and LLaVA-NeXT scatters each "
                                  "crop's tokens back to the stitched grid, where a merged token has no single cell; "
                                  "run it on family llava, or use a method that only drops (flowcut)")
            k = run.features.shape[1] - prefix
            members = run.members.to(home)  # [crops, n]: each patch's token among the view's k, -1 dropped
            cell = lay.flatten()  # [h*w] stitched index, raster order of the unpadded grid
            crop, patch = cell // n, cell % n
            token = members[1 + crop, patch]  # [h*w]
            alive = token >= 0
            rows = torch.cat([torch.zeros(k, dtype=torch.long, device=home), (1 + crop)[alive]])
            cols = torch.cat([torch.arange(k, device=home), token[alive]])
            feats = inner.multi_modal_projector(run.features[:, prefix:].to(home)[rows, cols])  # [k + m, D]
            h, w = lay.shape
            hi_seq = seq[n:].view(h, w + 1)
            blocks = tuple(run.blocks)
            protected = None if run.protected is None else run.protected.to(home)
            views.append(View(sample=b, tokens=feats[:k], grid=(side, side), seq_index=seq[:n], vision_prefix=prefix,
                              encoder_seqs=(n + prefix,), image=j, patches=n, vision_origin=run.origin[0].to(home),
                              vision_members=members[0], encoder_blocks=blocks,
                              vision_protected=None if protected is None else protected[0]))
            views.append(View(sample=b, tokens=feats[k:], grid=(h, w), seq_index=hi_seq[:, :w].flatten(),
                              vision_prefix=prefix, encoder_seqs=(n + prefix,) * (crops - 1), image=j,
                              patches=(crops - 1) * n, vision_origin=alive.nonzero().flatten(),
                              vision_members=torch.where(alive, alive.cumsum(0) - 1, -1), encoder_blocks=blocks,
                              vision_protected=None if protected is None else protected[1 + crop, token][alive]))
            # the newline slots: placed nowhere (no tokens), so they leave the sequence
            views.append(View(sample=b, tokens=feats[:0], grid=(h, 1), seq_index=hi_seq[:, w], prunable=False,
                              image=j, vision_origin=hi_seq.new_zeros(0)))
        return views

    @staticmethod
    def _compose(maps: torch.Tensor, kept: torch.Tensor, prefix: int) -> torch.Tensor:
        """Per-crop maps ``[c, T, T]`` -> one map over the kept stitched tokens ``[prefix + k, prefix + k]``.

        Patch-patch entries are block-diagonal (attention stays within a crop); the prefix row
        holds each patch's own crop's CLS->patch attention, the prefix column patch->own CLS.
        """
        patches = torch.block_diag(*maps[:, prefix:, prefix:])[kept][:, kept]
        if prefix == 0:
            return patches
        cls_row = maps[:, 0, prefix:].reshape(-1)[kept]
        cls_col = maps[:, prefix:, 0].reshape(-1)[kept]
        top = torch.cat([maps[:, 0, 0].mean().view(1), cls_row])
        return torch.cat([top[None], torch.cat([cls_col[:, None], patches], 1)], 0)

    @torch.no_grad()
    def reference_vision_attention(self, batch, layer: int) -> list[torch.Tensor]:
        """Eager ``output_attentions`` reference for every prunable view, in the adapter's layout."""
        cfg = self.model.config
        tower = self.model.model.vision_tower
        sizes = batch["image_sizes"]
        n_crops = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
        pixels = torch.cat([p[:n] for p, n in zip(batch["pixel_values"], n_crops)])
        att = eager_vision_attention(tower, pixels, layer)
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        out, start = [], 0
        for b, crops in enumerate(n_crops):
            out.append(att[start])
            if crops > 1:
                # Independent layout: crop (i, j) of the grid covers rows i*side.., columns j*side..
                nph, npw = get_anyres_image_grid_shape(sizes[b], cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                rows, cols = torch.meshgrid(torch.arange(nph * side), torch.arange(npw * side), indexing="ij")
                crop = (rows // side) * npw + cols // side
                token = (rows % side) * side + cols % side
                full = torch.zeros(1, nph * side, npw * side)
                unpadded = unpad_image(full, sizes[b])[0]
                # unpad_image crops centred padding: find the offsets by shape.
                dh, dw = (nph * side - unpadded.shape[0]) // 2, (npw * side - unpadded.shape[1]) // 2
                sel = (slice(dh, dh + unpadded.shape[0]), slice(dw, dw + unpadded.shape[1]))
                crop, token = crop[sel].flatten(), token[sel].flatten()
                m = att[start + 1:start + crops]
                same = crop[:, None] == crop[None, :]
                pp = m[crop[:, None], 1 + token[:, None], 1 + token[None, :]] * same
                cls_row = m[crop, 0, 1 + token]
                cls_col = m[crop, 1 + token, 0]
                top = torch.cat([m[:, 0, 0].mean().view(1), cls_row])
                out.append(torch.cat([top[None], torch.cat([cls_col[:, None], pp], 1)], 0))
            start += crops
        return out
