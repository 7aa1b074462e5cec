"""tokenprune: compare visual-token pruning methods for vision-language models, side by side."""
from __future__ import annotations

from .errors import OptionError, TokenpruneError, UnknownNameError
from .pruner import (
    PRUNERS,
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

__version__ = "0.1.0"

__all__ = [
    "OptionError",
    "PRUNERS",
    "PrunerNeeds",
    "PruningInputs",
    "Reduction",
    "Registry",
    "RegistryEntry",
    "Stage",
    "TokenPruner",
    "TokenpruneError",
    "UnknownNameError",
    "create_pruner",
    "keep_count",
    "list_pruners",
    "parse_pruner_spec",
    "pruner_from_spec",
    "register_pruner",
    "topk_indices",
]
