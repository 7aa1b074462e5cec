"""Model adapters: one per model family, found by ``config.model_type``.

``tokenprune.load(id_or_path)`` builds the Hugging Face model + processor and wraps them;
``tokenprune.wrap(model, processor)`` wraps objects you already have.
"""
from __future__ import annotations

from typing import Any

from ..errors import UnknownNameError
from ..registry import Registry
from .base import EncodedImages, GenerationOutput, LoglikelihoodOutput, PrunableLVLM, SampleStats, View

MODELS: Registry[type[PrunableLVLM]] = Registry("model family", "tokenprune.models")


def register_model(cls: type[PrunableLVLM]) -> type[PrunableLVLM]:
    """Register an adapter class under its ``family`` (and each of its ``model_types``)."""
    MODELS.register(cls.family)(cls)
    return cls


def _builtin() -> None:
    """Register the built-in families (imported on first use: they pull in transformers)."""
    from .internvl import InternVLLVLM
    from .llava import LlavaLVLM
    from .llava_next import LlavaNextLVLM
    from .qwen2_vl import QwenVLLVLM

    for cls in (LlavaLVLM, LlavaNextLVLM, QwenVLLVLM, InternVLLVLM):
        if cls.family not in MODELS:
            register_model(cls)


def adapter_for(model_type: str) -> type[PrunableLVLM]:
    """The adapter class whose ``model_types`` include ``model_type``."""
    _builtin()
    for entry in MODELS.entries():
        if entry.obj is not None and model_type in entry.obj.model_types:
            return entry.obj
    supported = sorted(t for e in MODELS.entries() if e.obj is not None for t in e.obj.model_types)
    raise UnknownNameError(f"model type {model_type!r} is not supported; supported: {', '.join(supported)}")


def wrap(model: Any, processor: Any) -> PrunableLVLM:
    """Wrap a loaded Hugging Face LVLM and its processor; the family comes from ``config.model_type``."""
    return adapter_for(model.config.model_type)(model, processor)


def load(model_id_or_path: str, **hf_kwargs: Any) -> PrunableLVLM:
    """Load a model and its processor with ``from_pretrained`` and wrap them.

    ``hf_kwargs`` go to the model's ``from_pretrained`` (``dtype``, ``device_map``, ...). Zoo names
    (``tiny-llava``, ... see :mod:`tokenprune.zoo`) build a model in code without any download; of
    the keywords they take ``dtype`` and accelerate's placement: ``device_map`` (``"auto"``,
    ``"balanced"``, ``"sequential"``, a device, or ``{module name: device or "disk"}``),
    ``max_memory``, ``offload_folder`` and ``offload_buffers`` (see
    :func:`tokenprune.adapters.devices.dispatch`).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ..zoo import zoo_builder
    from .devices import check_device_map, dispatch

    if hf_kwargs.get("device_map") is not None:
        check_device_map(hf_kwargs["device_map"])
    build = zoo_builder(model_id_or_path)
    if build is not None:  # a model built in code (no hub)
        model, processor = build()
        if "dtype" in hf_kwargs:
            model = model.to(hf_kwargs["dtype"])
        if hf_kwargs.get("device_map") is not None:
            model = dispatch(model, hf_kwargs["device_map"], max_memory=hf_kwargs.get("max_memory"),
                             offload_folder=hf_kwargs.get("offload_folder"),
                             offload_buffers=bool(hf_kwargs.get("offload_buffers", False)))
        return wrap(model, processor)
    try:
        config = AutoConfig.from_pretrained(model_id_or_path)
    except OSError as exc:
        from ..errors import TokenpruneError
        from ..zoo import ZOO

        raise TokenpruneError(
            f"cannot load model {model_id_or_path!r}: {str(exc).splitlines()[0][:200]}. Give a local path, a "
            f"reachable hub id, or a built-in model: {', '.join(ZOO)}"
        ) from None
    adapter_for(config.model_type)  # fail before loading weights
    model = AutoModelForImageTextToText.from_pretrained(model_id_or_path, **hf_kwargs)
    processor = AutoProcessor.from_pretrained(model_id_or_path)
    return wrap(model, processor)


__all__ = ["EncodedImages", "GenerationOutput", "LoglikelihoodOutput", "MODELS", "PrunableLVLM", "SampleStats", "View", "adapter_for", "load", "register_model", "wrap"]
