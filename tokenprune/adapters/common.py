"""Helpers shared by family adapters: chat prompts, vision attention modules, layer choice."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import OptionError


from .visuals import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, SampleVisuals, raw_prompt, render, user_content  # noqa: F401


# Documented default formats, for a processor saved without a chat template, by config.model_type
# (not by adapter class: a subclass family such as LLaVA-NeXT has no single format and gets none).
LLAVA_15_TEMPLATE = (  # llava-hf/llava-1.5-*-hf: "USER: <image>\n{prompt} ASSISTANT:"
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'].upper() + ': ' }}{% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN2_VL_TEMPLATE = (  # Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL (ChatML, default system prompt)
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_CHAT_TEMPLATES: dict[str, str] = {
    "llava": LLAVA_15_TEMPLATE, "qwen2_vl": QWEN2_VL_TEMPLATE, "qwen2_5_vl": QWEN2_VL_TEMPLATE,
}


def _render(processor: Any, prompt: str, template: str | None, visuals: SampleVisuals | None = None) -> str:
    return render(processor, prompt, template, visuals)


def chat_template_for(processor: Any, model_type: str, family: str, placeholder: str) -> str | None:
    """The chat template to render prompts with: ``None`` for the processor's own; for a processor
    without one, the tokenizer's (if it places the image), else the family's documented default
    (:data:`DEFAULT_CHAT_TEMPLATES`).

    Raises:
        OptionError: none of these exists (one line saying what to pass).
    """
    if getattr(processor, "chat_template", None) is not None:
        return None
    own = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if isinstance(own, str):
        try:  # a text-only LLM template cannot place an image: skip it rather than garble the prompt
            if placeholder in _render(processor, "?", own):
                return own
        except Exception:  # noqa: BLE001 -- any failure to render means "not usable here"
            pass
    if model_type in DEFAULT_CHAT_TEMPLATES:
        return DEFAULT_CHAT_TEMPLATES[model_type]
    raise OptionError(
        f"this {family} processor has no chat template (and tokenprune has no default format for {model_type}): set "
        f"processor.chat_template to the model's template, or pass chat_template=False with prompts in the "
        f"model's own format ({placeholder!r} where the image goes)")


def chat_prompts(processor: Any, prompts: Sequence[str], template: str | None = None,
                 placeholder: str | None = None, visuals: Sequence[SampleVisuals] | None = None,
                 video_placeholder: str | None = None) -> list[str]:
    """Each prompt as a one-turn conversation through the processor's chat template (or ``template``),
    showing its sample's ``visuals`` (default: one image each) first or at the prompt's placeholders
    (see :func:`tokenprune.adapters.visuals.user_content`).

    ``placeholder`` / ``video_placeholder``: the text the processor expands into image / video tokens;
    a template that does not write it raises a one-line :class:`OptionError` instead of the
    processor's token-count error.
    """
    visuals = list(visuals) if visuals is not None else [None] * len(prompts)
    texts = [_render(processor, p, template, v) for p, v in zip(prompts, visuals)]
    for text, v in zip(texts, visuals):
        video = v is not None and bool(v.videos)
        mark, kind = (video_placeholder, "video") if video else (placeholder, "image")
        if mark is not None and mark not in text:
            raise OptionError(
                f"the chat template wrote no {kind} placeholder {mark!r} (it gave {text[:80]!r}): set "
                f"processor.chat_template to one that renders {{'type': '{kind}'}} content, or pass "
                f"chat_template=False with {mark!r} in each prompt")
    return texts


def raw_prompts(prompts: Sequence[str], placeholder: str, family: str = "this model",
                visuals: Sequence[SampleVisuals] | None = None, video_placeholder: str = VIDEO_PLACEHOLDER) -> list[str]:
    """``chat_template=False``: each prompt as given, checked to place its sample's visuals (default:
    one image each); see :func:`tokenprune.adapters.visuals.raw_prompt`."""
    one = SampleVisuals(images=[None])  # type: ignore[list-item] -- only the count matters here
    visuals = list(visuals) if visuals is not None else [one] * len(prompts)
    return [raw_prompt(p, v, placeholder, video_placeholder, family) for p, v in zip(prompts, visuals)]


def attention_modules(tower: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a vision tower, in layer order.

    Any module that dispatches through ``config._attn_implementation`` carries ``is_causal``
    (a transformers 5 convention) and a ``config``; nested ones are not double-counted.
    """
    mods = [m for m in tower.modules() if hasattr(m, "is_causal") and hasattr(m, "config") and m is not tower]
    return [m for m in mods if not any(o is not m and m in set(o.modules()) for o in mods)]


@torch.no_grad()
def eager_vision_attention(tower: nn.Module, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """Head-averaged attention ``[images, T, T]`` of vision ``layer``, the slow way: the tower run
    with eager attention and ``output_attentions=True``.

    The independent reference that the adapters' fused FoPru scoring is tested against (never on a
    hot path); the tower's attention implementation is restored afterwards, whatever happens.
    """
    old = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        out = tower(pixel_values=pixel_values.to(tower.dtype), output_attentions=True, return_dict=True)
    finally:
        tower.config._attn_implementation = old
    return out.attentions[layer].float().mean(dim=1)


def layer_index(layer: int, n_layers: int, what: str = "vision_layer") -> int:
    """A Python-style layer index resolved against ``n_layers`` (clear error when out of range)."""
    if not -n_layers <= layer < n_layers:
        raise OptionError(f"{what}={layer} is out of range for a vision encoder with {n_layers} layers")
    return layer % n_layers


def refuse_in_vision_video(family: str, needs) -> None:
    """Raise a one-line :class:`OptionError` when an in-vision pruner (``needs.in_vision``) meets a video.

    Why: the video paths of the pooling families (LLaVA-NeXT-Video, LLaVA-OneVision) run every frame through
    the tower whole and then pool its grid 2 x 2 (or bilinearly); a tower that dropped or merged patches
    leaves no grid to pool, so the cut cannot be honoured -- and running the frames uncut would report an
    unpruned model under the method's name."""
    if needs is not None and needs.in_vision is not None:
        raise OptionError(f"in-vision methods (tome, flowcut, mustdrop) cut inside the tower per image; the {family} "
                          "video path pools every frame's whole grid, so they do not run on videos: use them on "
                          "images, or a pre-LLM video method (e.g. fastvid, dycoke)")


def vision_recorder(tower: nn.Module, needs, all_rows: bool = False):
    """A context recording the attention the pruner's ``needs`` ask for in ``tower`` (or a no-op).

    Yields the :class:`~tokenprune.adapters.attention.AttentionRecorder`, or ``None`` if nothing
    is needed. ``all_rows`` forces every row (when the adapter recomposes the map).
    """
    import contextlib

    from .attention import record_attention

    if needs.vision_attention_layer is None:
        return contextlib.nullcontext(None)
    mods = attention_modules(tower)
    module = mods[layer_index(needs.vision_attention_layer, len(mods))]
    rows = "prefix" if needs.vision_attention_rows == "prefix" and not all_rows else "all"
    # vision_qk: the raw q and k of every row (PruMerge scores with its own single-head attention: the CLS
    # row, or on towers without CLS EffiVLM's column mean over every query)
    return record_attention(module, rows=rows, keys=needs.vision_keys or needs.vision_qk,
                            queries=-1 if needs.vision_qk else 0)
