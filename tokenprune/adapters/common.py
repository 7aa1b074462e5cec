"""Helpers shared by family adapters: chat prompts, vision attention modules, layer choice."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..errors import OptionError


IMAGE_PLACEHOLDER = "<image>"  # where a prompt may place its image (lmms-eval's and LLaVA's convention)


def user_content(prompt: str) -> list[dict[str, str]]:
    """The user turn's content for one image and ``prompt``: the image first, or where the prompt
    writes :data:`IMAGE_PLACEHOLDER` (once; whitespace around it is dropped)."""
    if prompt.count(IMAGE_PLACEHOLDER) > 1:
        raise OptionError(f"a prompt holds one image, but this one has {prompt.count(IMAGE_PLACEHOLDER)} "
                          f"{IMAGE_PLACEHOLDER!r} placeholders: {prompt[:80]!r}")
    before, sep, after = prompt.partition(IMAGE_PLACEHOLDER)
    if not sep:
        return [{"type": "image"}, {"type": "text", "text": prompt}]
    parts = [{"type": "text", "text": before.strip()}, {"type": "image"}, {"type": "text", "text": after.strip()}]
    return [p for p in parts if p["type"] == "image" or p["text"]]


def chat_prompts(processor: Any, prompts: Sequence[str]) -> list[str]:
    """Each prompt as a one-turn conversation with one image, through the processor's chat template
    (the image first, or at the prompt's :data:`IMAGE_PLACEHOLDER`)."""
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": user_content(p)}],
            add_generation_prompt=True, tokenize=False,
        )
        for p in prompts
    ]


def attention_modules(tower: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a vision tower, in layer order.

    Any module that dispatches through ``config._attn_implementation`` carries ``is_causal``
    (a transformers 5 convention) and a ``config``; nested ones are not double-counted.
    """
    mods = [m for m in tower.modules() if hasattr(m, "is_causal") and hasattr(m, "config") and m is not tower]
    return [m for m in mods if not any(o is not m and m in set(o.modules()) for o in mods)]


def layer_index(layer: int, n_layers: int, what: str = "vision_layer") -> int:
    """A Python-style layer index resolved against ``n_layers`` (clear error when out of range)."""
    if not -n_layers <= layer < n_layers:
        raise OptionError(f"{what}={layer} is out of range for a vision encoder with {n_layers} layers")
    return layer % n_layers


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
    return record_attention(module, rows=rows, keys=needs.vision_keys)
