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
    from .llava_next_video import LlavaNextVideoLVLM
    from .llava_onevision import LlavaOnevisionLVLM
    from .qwen2_vl import QwenVLLVLM
    from .qwen3_vl import Qwen3VLLVLM
    from .timm_lvlm import TimmLVLM  # imports timm only when such a model is built

    for cls in (LlavaLVLM, LlavaNextLVLM, QwenVLLVLM, InternVLLVLM, Qwen3VLLVLM, LlavaOnevisionLVLM, LlavaNextVideoLVLM,
                TimmLVLM):
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


def check_model_source(model_id_or_path: str) -> None:
    """Fail in one line, before anything heavy is loaded, when ``model_id_or_path`` names a local
    folder that cannot hold a supported model: missing, a file, no ``config.json``, an unreadable
    one, no ``model_type`` or one without an adapter. Zoo names and hub ids pass (the hub is asked
    later, by :func:`load`).

    Raises:
        TokenpruneError: the problem and what to give instead (``UnknownNameError`` for an
            unsupported ``model_type``, listing the supported ones).
    """
    import json
    import os

    from ..errors import TokenpruneError
    from ..zoo import ZOO, zoo_builder

    if zoo_builder(model_id_or_path) is not None:
        return
    path = os.path.expanduser(model_id_or_path)
    looks_local = model_id_or_path.startswith(("/", "./", "../", "~")) or os.path.exists(path)
    if not looks_local:  # a hub id ("org/name"): only the hub can tell
        return
    what = f"give a folder written by save_pretrained, a hub id, or a built-in model ({', '.join(ZOO)})"
    if not os.path.exists(path):
        raise TokenpruneError(f"model path {model_id_or_path!r} does not exist: {what}")
    if not os.path.isdir(path):
        raise TokenpruneError(f"model path {model_id_or_path!r} is a file: {what}")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise TokenpruneError(f"model folder {model_id_or_path!r} holds no config.json: {what}")
    try:
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: JSON that is not an object
        raise TokenpruneError(f"cannot read {config}: {str(exc).splitlines()[0][:200]}") from None
    if not model_type:
        raise TokenpruneError(f"{config} has no model_type: {what}")
    adapter_for(model_type)


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
    check_model_source(model_id_or_path)
    try:
        config = AutoConfig.from_pretrained(model_id_or_path)
    except (OSError, ValueError) as exc:  # ValueError: a config transformers cannot read (no/unknown model_type)
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


__all__ = ["EncodedImages", "GenerationOutput", "LoglikelihoodOutput", "MODELS", "PrunableLVLM", "SampleStats", "View", "adapter_for", "check_model_source", "load", "register_model", "wrap"]
