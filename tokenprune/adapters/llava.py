"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP-style tower with CLS, MLP projector, 1-D RoPE LLM.

A sample may show several images (a multi-image prompt): the processor takes them as one flat list
in prompt order (sample after sample) and expands each image placeholder into that image's tokens;
the model fills the image tokens of the whole batch, row by row, with the images' features in that
same order (``masked_scatter``). :func:`image_spans` reads that placement back, so every image of
every sample becomes its own view, in sequence order.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import OptionError
from ..pruner import PrunerNeeds
from .base import PrunableLVLM, View
from .common import eager_vision_attention, vision_recorder


def image_spans(input_ids: torch.Tensor, image_token_id: int, counts: Sequence[int]
                ) -> list[tuple[int, int, torch.Tensor]]:
    """Where each image's tokens sit, as the model places them.

    The processor's images (prompt order, sample after sample) fill the batch's image tokens in
    row-major order, ``counts[i]`` tokens for image ``i``, so image ``i`` takes the next ``counts[i]``
    image positions.

    Args:
        input_ids: ``[B, L]`` the processor's token ids.
        image_token_id: the id each image token carries.
        counts: tokens per image, in the processor's image order.

    Returns:
        Per image ``(sample, image index within the sample, [counts[i]] sequence positions)``.

    Raises:
        OptionError: the batch holds a different number of image tokens, or an image's tokens span
            two samples (the prompts' placeholders do not match the images given).
    """
    rows, cols = (input_ids == image_token_id).nonzero(as_tuple=True)  # row-major: masked_scatter's order
    if rows.numel() != sum(counts):
        raise OptionError(f"the prompts hold {rows.numel()} image tokens but the {len(counts)} images need "
                          f"{sum(counts)}; give one image placeholder per image")
    if not counts:
        return []
    ends = torch.tensor(counts, device=rows.device).cumsum(0)
    first = rows[ends - torch.tensor(counts, device=rows.device)].tolist()  # one host sync for all images
    last = rows[ends - 1].tolist()
    out, start, seen = [], 0, {}
    for c, b, b_last in zip(counts, first, last):
        if b != b_last:
            raise OptionError(f"an image's {c} tokens span samples {b} and {b_last}; give one image placeholder "
                              "per image in each prompt")
        j = seen.get(b, 0)
        seen[b] = j + 1
        out.append((b, j, cols[start:start + c]))
        start += c
    return out


class LlavaLVLM(PrunableLVLM):
    """Adapter for LLaVA-1.5-style models: one image -> ``(size/patch)^2`` tokens on a square grid.

    A multi-image sample gives one view per image (``View.image`` = its index in the prompt).
    """

    family = "llava"
    model_types = ("llava",)
    provides_vision_qk = True

    def encode_images(self, batch, needs: PrunerNeeds) -> list[View]:
        """One view per image, images in the processor's order (samples in order, each sample's images
        in prompt order): tokens ``[N, D]`` on a ``sqrt(N) x sqrt(N)`` grid; ``[]`` for a batch without
        images. ``pixel_values``: ``[images, 3, px, px]``."""
        cfg = self.model.config
        if batch.get("pixel_values") is None:
            return []
        if not isinstance(cfg.vision_feature_layer, int):
            raise OptionError("LLaVA with several vision_feature_layers is not supported; use one layer")
        tower = self.model.model.vision_tower
        pixel_values = batch["pixel_values"].to(tower.dtype)
        if needs.in_vision is not None:
            return self._encode_in_vision(batch, pixel_values, needs.in_vision)
        with vision_recorder(tower, needs) as rec:
            out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[cfg.vision_feature_layer]  # [I, T, Dv]
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        feats = self.model.model.multi_modal_projector(hidden[:, prefix:])  # [I, N, D]
        n = feats.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise OptionError(f"LLaVA image features ({n} tokens) do not form a square grid")
        attn = rec.maps[0] if rec is not None else None
        keys = rec.keys[0].mean(1) if rec is not None and needs.vision_keys else None  # [I, T, d]
        qk = (rec.queries[0].transpose(1, 2).flatten(2), rec.keys[0].transpose(1, 2).flatten(2)) \
            if rec is not None and needs.vision_qk else (None, None)  # heads concatenated: [I, T, H*d] each
        views = []
        spans = image_spans(batch["input_ids"], cfg.image_token_id, [n] * feats.shape[0])
        for i, (b, j, seq_index) in enumerate(spans):
            views.append(View(sample=b, tokens=feats[i], grid=(side, side), seq_index=seq_index,
                              vision_attention=None if attn is None else attn[i], vision_prefix=prefix,
                              vision_features=hidden[i, prefix:] if needs.vision_features else None,
                              vision_prefix_features=hidden[i, :prefix] if needs.vision_features else None,
                              vision_keys=None if keys is None else keys[i],
                              vision_queries=None if qk[0] is None else qk[0][i],
                              vision_keys_full=None if qk[1] is None else qk[1][i],
                              encoder_seqs=(hidden.shape[1],), image=j))
        return views

    def in_vision_refusal(self) -> str | None:
        """``None``: LLaVA's CLIP / SigLIP / DINOv2 tower runs block by block (other towers: one line)."""
        from .vision_blocks import tower_parts

        try:
            tower_parts(self.model.model.vision_tower)
        except OptionError as exc:
            return str(exc)
        return None

    def _encode_in_vision(self, batch, pixel_values: torch.Tensor, pruner) -> list[View]:
        """One view per image with ``pruner`` cutting inside the tower: each view's ``tokens`` are the
        ``k`` the tower let through, projected; the image keeps its ``N`` placeholders (``seq_index``),
        of which the first ``k`` take the tokens, and the tokens the pruner marked (``vision_protected``).
        An ``adaptive`` pruner runs image by image."""
        from .vision_blocks import run_tower

        cfg = self.model.config
        tower = self.model.model.vision_tower
        prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
        n_images = pixel_values.shape[0]
        alone = pruner.adaptive or pruner.image_by_image
        groups = [[i] for i in range(n_images)] if alone else [list(range(n_images))]
        runs = {}
        for members in groups:
            run = run_tower(tower, pixel_values[members], pruner, cfg.vision_feature_layer, prefix)
            if prefix == 0 and cfg.vision_feature_select_strategy != "full":
                raise OptionError(f"unknown vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
            feats = self.model.model.multi_modal_projector(run.features[:, prefix:])  # [I, k, D]
            for j, i in enumerate(members):
                runs[i] = (feats[j], run, j)
        n = runs[0][1].members.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise OptionError(f"LLaVA image features ({n} tokens) do not form a square grid")
        views = []
        for i, (b, j, seq_index) in enumerate(image_spans(batch["input_ids"], cfg.image_token_id, [n] * n_images)):
            tokens, run, row = runs[i]
            views.append(View(sample=b, tokens=tokens, grid=(side, side), seq_index=seq_index, vision_prefix=prefix,
                              encoder_seqs=(n + prefix,), image=j, patches=n, vision_origin=run.origin[row],
                              vision_members=run.members[row], encoder_blocks=tuple(run.blocks),
                              vision_protected=None if run.protected is None else run.protected[row]))
        return views

    def reference_vision_attention(self, batch, layer: int) -> list[torch.Tensor]:
        """Head-averaged vision attention of ``layer`` via eager attention + ``output_attentions``."""
        return list(eager_vision_attention(self.model.model.vision_tower, batch["pixel_values"], layer))
