"""tokenprune: compare visual-token pruning methods for vision-language models, side by side."""
from __future__ import annotations

from .errors import OptionError, TokenpruneError, UnknownNameError
from .pruner import (
    PRUNERS,
    DecodePlan,
    DecodeState,
    LLMStage,
    PrunerNeeds,
    PruningInputs,
    Reduction,
    Stage,
    TokenPruner,
    create_pruner,
    keep_count,
    list_pruners,
    parse_pruner_spec,
    pruner_from_spec,
    register_pruner,
    topk_indices,
)
from .registry import Registry, RegistryEntry
from .media import Video
from .benchmarks.tasks import Sample, Task, get_task, list_tasks, register_task

__version__ = "0.1.0"


def load(model_id_or_path: str, **hf_kwargs):
    """Load a supported LVLM and its processor with ``from_pretrained``; returns a ``PrunableLVLM``.

    ``hf_kwargs`` go to the model's ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    from .adapters import load as _load

    return _load(model_id_or_path, **hf_kwargs)


def wrap(model, processor):
    """Wrap an already built Hugging Face LVLM and its processor in a ``PrunableLVLM``."""
    from .adapters import wrap as _wrap

    return _wrap(model, processor)


def list_models() -> list[str]:
    """Supported model families (``llava``, ``llava_next``, ``qwen2_vl``, ``internvl``, plugins)."""
    from .adapters import MODELS, _builtin

    _builtin()
    return MODELS.names()

__all__ = [
    "DecodePlan",
    "DecodeState",
    "LLMStage",
    "OptionError",
    "PRUNERS",
    "PrunerNeeds",
    "PruningInputs",
    "Reduction",
    "Registry",
    "RegistryEntry",
    "Sample",
    "Task",
    "Stage",
    "TokenPruner",
    "TokenpruneError",
    "UnknownNameError",
    "create_pruner",
    "get_task",
    "keep_count",
    "list_models",
    "list_pruners",
    "list_tasks",
    "load",
    "parse_pruner_spec",
    "pruner_from_spec",
    "register_pruner",
    "register_task",
    "topk_indices",
    "wrap",
]
