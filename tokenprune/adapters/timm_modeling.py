"""timm-backboned LVLMs (the Prismatic / OpenVLA layout): a ``timm`` ViT, a projector, an HF causal LM.

Labs that build their own LVLMs rarely use a transformers multimodal class: they put a timm
``VisionTransformer`` (the patch features of one of its blocks) through an MLP projector into a
Hugging Face ``*ForCausalLM``. :class:`TimmLVLMForConditionalGeneration` is that layout as one
module, and the protocol the ``timm_lvlm`` adapter (:mod:`tokenprune.adapters.timm_lvlm`) reads:

* ``model.config.model_type == "timm_lvlm"``, ``model.config.image_token_id`` (the id the
  processor writes once per visual token), ``model.config.vision_feature_layer`` (the block whose
  output feeds the projector, Python-style index; ``-2``: the penultimate block, as LLaVA and
  Prismatic);
* ``model.vision_tower``: a timm ``VisionTransformer`` (``patch_embed``, ``_pos_embed``,
  ``blocks`` of ``Attention`` with a fused ``qkv``, ``num_prefix_tokens``);
* ``model.projector``: ``[..., Dv] -> [..., D]``;
* ``model.language_model``: a transformers causal LM (``.model`` decoder, ``.lm_head``).

Wrap trained parts with :meth:`TimmLVLMForConditionalGeneration.from_parts` and
:meth:`TimmLVLMProcessor.from_timm`; ``tp.wrap(model, processor)`` then runs every pruner on it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import PretrainedConfig

MODEL_TYPE = "timm_lvlm"


def import_timm():
    """``timm``, or a one-line error saying why it cannot be imported here."""
    try:
        import timm
    except Exception as exc:  # noqa: BLE001 -- ImportError, or torchvision's RuntimeError (see docs/adapters.md)
        from ..errors import TokenpruneError

        raise TokenpruneError(
            f"timm-backboned models need timm, which failed to import ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120]}); install timm with a torchvision build that matches your torch"
        ) from None
    return timm


class TimmLVLMConfig(PretrainedConfig):
    """Config of :class:`TimmLVLMForConditionalGeneration`.

    Args:
        vision_model: a ``timm.create_model`` name (the architecture; weights come from the parts).
        vision_kwargs: keyword arguments of ``timm.create_model`` (``img_size``, ``depth``, ...).
        text_config: the causal LM's config (a config object or its dict with ``model_type``).
        image_token_id: the token id the processor repeats once per visual token.
        vision_feature_layer: the ViT block whose output the projector reads (``-2``: penultimate).
        projector_hidden_act: the activation between the projector's two linear layers.
    """

    model_type = MODEL_TYPE

    def __init__(self, vision_model: str = "vit_small_patch16_224", vision_kwargs: dict | None = None,
                 text_config: Any = None, image_token_id: int | None = None, vision_feature_layer: int = -2,
                 projector_hidden_act: str = "gelu", **kwargs: Any):
        from transformers import CONFIG_MAPPING

        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config["model_type"]](**text_config)
        self.vision_model = vision_model
        self.vision_kwargs = dict(vision_kwargs or {})
        self.text_config = text_config
        self.image_token_id = image_token_id
        self.vision_feature_layer = vision_feature_layer
        self.projector_hidden_act = projector_hidden_act
        super().__init__(**kwargs)


class Projector(nn.Module):
    """Prismatic's ``gelu-mlp`` projector: ``Linear(Dv, D) -> act -> Linear(D, D)``; ``[..., Dv] -> [..., D]``."""

    def __init__(self, vision_dim: int, text_dim: int, act: str = "gelu"):
        super().__init__()
        from transformers.activations import ACT2FN

        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class TimmLVLMForConditionalGeneration(nn.Module):
    """A timm ViT + projector + HF causal LM, with the forward and ``generate`` of an LLaVA-style LVLM.

    Each image token in ``input_ids`` (``config.image_token_id``) is replaced by one projected patch
    feature of block ``config.vision_feature_layer`` (prefix tokens -- CLS, registers -- dropped), in
    raster order. The tower runs only up to that block.
    """

    def __init__(self, config: TimmLVLMConfig, vision_tower: nn.Module | None = None,
                 projector: nn.Module | None = None, language_model: nn.Module | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.config = config
        if vision_tower is None:
            vision_tower = import_timm().create_model(config.vision_model, pretrained=False, num_classes=0,
                                                      **config.vision_kwargs)
        self.vision_tower = vision_tower
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.projector = projector or Projector(vision_tower.embed_dim, config.text_config.hidden_size,
                                                config.projector_hidden_act)

    @classmethod
    def from_parts(cls, vision_tower: nn.Module, projector: nn.Module, language_model: nn.Module,
                   image_token_id: int, vision_feature_layer: int = -2) -> "TimmLVLMForConditionalGeneration":
        """Assemble trained parts (a timm ViT, a projector, a causal LM) into one model."""
        config = TimmLVLMConfig(vision_model=getattr(vision_tower, "default_cfg", {}).get("architecture", "custom"),
                                text_config=language_model.config, image_token_id=image_token_id,
                                vision_feature_layer=vision_feature_layer)
        return cls(config, vision_tower=vision_tower, projector=projector, language_model=language_model)

    @property
    def generation_config(self):
        return self.language_model.generation_config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def feature_block(self) -> int:
        """The index of the block whose output the projector reads."""
        n = len(self.vision_tower.blocks)
        layer = self.config.vision_feature_layer
        if not -n <= layer < n:
            from ..errors import OptionError

            raise OptionError(f"vision_feature_layer={layer} is out of range for a ViT with {n} blocks")
        return layer % n

    def vision_hidden(self, pixel_values: torch.Tensor, last_block: int | None = None) -> torch.Tensor:
        """``[B, prefix + N, Dv]``: the output of block ``last_block`` (default: the feature block)."""
        vit = self.vision_tower
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixel_values.to(self.dtype)))))
        for block in vit.blocks[: (self.feature_block() if last_block is None else last_block) + 1]:
            x = block(x)
        return x

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]``: the projected patch features (prefix tokens dropped)."""
        return self.projector(self.vision_hidden(pixel_values)[:, self.vision_tower.num_prefix_tokens:])

    def _embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            image = (input_ids == self.config.image_token_id)[..., None]
            embeds = embeds.masked_scatter(image, self.get_image_features(pixel_values).to(embeds.dtype))
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **kwargs: Any):
        """The causal LM's output (``.logits`` ``[B, L, V]``) on the prompt with the images in place."""
        return self.language_model(inputs_embeds=self._embeds(input_ids, pixel_values), attention_mask=attention_mask,
                                   **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """``[B, L + T]``: the prompt ids followed by the generated ones (as transformers' LVLMs return)."""
        new = self.language_model.generate(inputs_embeds=self._embeds(input_ids, pixel_values),
                                           attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids, new], 1)


class TimmLVLMProcessor:
    """Tokenizer + image preprocessing of a :class:`TimmLVLMForConditionalGeneration`.

    Images: resized (bicubic) so the shorter side is ``image_size / crop_pct``, centre-cropped to
    ``image_size``, scaled to [0, 1] and normalised with the ViT's ``mean`` / ``std`` (timm's
    eval transform). Text: each ``image_token`` is expanded to ``num_image_tokens`` copies.
    """

    def __init__(self, tokenizer: Any, image_size: int | tuple[int, int], num_image_tokens: int,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 crop_pct: float = 1.0, image_token: str = "<image>", chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.num_image_tokens = num_image_tokens
        self.mean, self.std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        self.crop_pct = crop_pct
        self.image_token = image_token
        self.chat_template = chat_template

    @classmethod
    def from_timm(cls, vision_tower: nn.Module, tokenizer: Any, **kwargs: Any) -> "TimmLVLMProcessor":
        """A processor for ``vision_tower`` (its pretrained config's mean / std / crop, its input size)."""
        cfg = getattr(vision_tower, "pretrained_cfg", None) or {}
        grid = vision_tower.patch_embed.grid_size
        kwargs.setdefault("mean", cfg.get("mean", (0.5, 0.5, 0.5)))
        kwargs.setdefault("std", cfg.get("std", (0.5, 0.5, 0.5)))
        kwargs.setdefault("crop_pct", cfg.get("crop_pct", 1.0))
        return cls(tokenizer, tuple(vision_tower.patch_embed.img_size), grid[0] * grid[1], **kwargs)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels."""
        h, w = self.image_size
        out = []
        for image in images:
            image = image.convert("RGB")
            scale = max(h, w) / self.crop_pct / min(image.size)
            resized = image.resize((max(w, round(image.size[0] * scale)), max(h, round(image.size[1] * scale))),
                                   Image.BICUBIC)
            left, top = (resized.size[0] - w) // 2, (resized.size[1] - h) // 2
            pixels = np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
            out.append(torch.from_numpy(((pixels - self.mean) / self.std).transpose(2, 0, 1).copy()))
        return torch.stack(out)

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, chat_template: str | None = None, **kwargs: Any) -> str:
        """The tokenizer's chat-template rendering with this processor's template (or ``chat_template``)."""
        return self.tokenizer.apply_chat_template(conversation, chat_template=chat_template or self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kwargs)

    def __call__(self, images: Sequence[Image.Image] | None = None, text: Sequence[str] | None = None,
                 padding: bool = True, return_tensors: str = "pt", **kwargs: Any) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` (image tokens expanded) and ``pixel_values``."""
        texts = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in (text or [])]
        out = dict(self.tokenizer(texts, padding=padding, return_tensors=return_tensors, add_special_tokens=False))
        if images is not None:
            out["pixel_values"] = self.preprocess(images)
        return out

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)
