"""A name -> object registry with lazily loaded entry-point plugins.

One class serves pruners, model adapters and tasks (in the spirit of timm's ``register_model`` and
lm-evaluation-harness's registries). Built-ins register with a decorator when their module is
imported; third-party objects are discovered from an entry-point group
(e.g. ``tokenprune.pruners``) but only imported when first looked up or listed, so a broken plugin
cannot break ``import tokenprune``.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")

BUILTIN = "built-in"


@dataclass
class RegistryEntry(Generic[T]):
    """One registered object.

    Attributes:
        name: the name users type.
        origin: ``"built-in"`` or ``"<distribution> <version>"`` for a plugin.
        obj: the registered object once loaded (``None`` until then for a plugin).
        entry_point: the plugin's entry point, if it came from one.
        error: why loading the plugin failed, if it did.
    """

    name: str
    origin: str
    obj: T | None = None
    entry_point: importlib.metadata.EntryPoint | None = field(default=None, repr=False)
    error: str | None = None

    @property
    def description(self) -> str:
        """First line of the object's docstring ('' if it has none)."""
        doc = getattr(self.obj, "__doc__", None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """Maps names to objects (classes or factories) of one kind.

    Args:
        kind: what is registered, singular, used in messages ("pruner", "model", "task").
        entry_point_group: the entry-point group plugins register under.
        builtin_modules: modules imported on first use so that their decorators run.
        on_register: called as ``on_register(name, obj)`` for every object registered or loaded
            from a plugin (e.g. to tell a class its registry name).
    """

    def __init__(
        self,
        kind: str,
        entry_point_group: str,
        builtin_modules: tuple[str, ...] = (),
        on_register: Callable[[str, T], None] | None = None,
    ):
        self.kind = kind
        self._on_register = on_register
        self.entry_point_group = entry_point_group
        self._builtin_modules = builtin_modules
        self._entries: dict[str, RegistryEntry[T]] = {}
        self._discovered = False

    # -- registration -----------------------------------------------------------------------
    def register(self, name: str, *, origin: str = BUILTIN) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` registers the decorated object under ``name``."""

        def decorator(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing.obj is not None and existing.obj is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered ({existing.origin})")
            self._entries[name] = RegistryEntry(name=name, origin=origin, obj=obj)
            if self._on_register is not None:
                self._on_register(name, obj)
            return obj

        return decorator

    # -- discovery --------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for module in self._builtin_modules:
            importlib.import_module(module)
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._entries:
                continue  # a built-in (or an earlier distribution) wins; never shadow silently
            dist = ep.dist
            origin = f"{dist.name} {dist.version}" if dist is not None else "plugin"
            self._entries[ep.name] = RegistryEntry(name=ep.name, origin=origin, entry_point=ep)

    def _load(self, entry: RegistryEntry[T]) -> RegistryEntry[T]:
        if entry.obj is None and entry.entry_point is not None and entry.error is None:
            try:
                obj = entry.entry_point.load()
            except Exception as exc:  # noqa: BLE001 -- a plugin may fail in any way; report it
                entry.error = f"{type(exc).__name__}: {exc}"
            else:
                if self._on_register is not None:
                    try:
                        self._on_register(entry.name, obj)
                    except Exception as exc:  # noqa: BLE001 -- e.g. a plugin that is not a TokenPruner
                        entry.error = f"{type(exc).__name__}: {exc}"
                        return entry
                entry.obj = obj
        return entry

    # -- lookup -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every known name, sorted (plugins included, not imported)."""
        self._discover()
        return sorted(self._entries)

    def entries(self) -> list[RegistryEntry[T]]:
        """Every entry, sorted by name, with plugins loaded (failures recorded in ``error``)."""
        return [self._load(self._entries[n]) for n in self.names()]

    def entry(self, name: str) -> RegistryEntry[T]:
        """The entry for ``name``; unknown names raise :class:`UnknownNameError` listing the known ones."""
        self._discover()
        if name not in self._entries:
            known = self.names()
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known) or '(none)'}"
            )
        entry = self._load(self._entries[name])
        if entry.obj is None:
            raise UnknownNameError(
                f"{self.kind} {name!r} from {entry.origin} failed to load ({entry.error}); "
                f"fix or uninstall that plugin"
            )
        return entry

    def get(self, name: str) -> T:
        """The object registered under ``name``."""
        return self.entry(name).obj  # type: ignore[return-value]

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def refresh(self) -> None:
        """Forget discovered plugins and look for entry points again (e.g. after installing one)."""
        self._entries = {n: e for n, e in self._entries.items() if e.entry_point is None}
        self._discovered = False
