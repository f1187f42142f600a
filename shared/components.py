"""One registry pattern for the swappable parts: priors, hash-grid encodings, rasterisers, artifact stores.

As threestudio's `register`/`find`, without its reflection: a part is a module-level builder (a function or a class)
registered under a kind by a decorator, and a config names the kind. Nothing is imported by name from a string; a
new part is one decorated function in the module that owns the registry, or in any module imported before use.

    STORES: Registry[ArtifactStore] = Registry("artifact store")

    @STORES.register("local")
    def build_local(config: LocalStoreConfig) -> ArtifactStore: ...

    STORES.build(config)  # find(config.kind)(config)

An unknown kind raises `UnknownKind` (a ValueError) listing the known kinds; a servicer turns it into
INVALID_ARGUMENT naming the request or config field with `UnknownKind.invalid_argument(field)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Generic, Iterable, Mapping, Protocol, TypeVar

from shared.errors import InvalidArgument

T = TypeVar("T")
B = TypeVar("B", bound=Callable[..., Any])


class UnknownKind(ValueError):
    """A kind no builder is registered for; the message lists the kinds that are."""

    def __init__(self, registry: str, kind: str, known: Iterable[str]) -> None:
        self.registry = registry
        self.kind = kind
        self.known = tuple(known)
        super().__init__(f"unknown {registry} {kind!r}; known: {', '.join(self.known) or '(none)'}")

    def invalid_argument(self, field: str) -> InvalidArgument:
        return InvalidArgument(str(self), field)


class Configured(Protocol):
    """A typed config that names the kind of part it configures."""

    @property
    def kind(self) -> Any: ...


@dataclass(frozen=True)
class _Entry(Generic[T]):
    builder: Callable[..., T]
    available: Callable[[], bool]


def _always() -> bool:
    return True


def kind_name(kind: str | Enum) -> str:
    """The registry key of a kind: an enum member's value (PriorKind.PIXEL -> 'pixel'), else the string itself."""
    return str(kind.value) if isinstance(kind, Enum) else str(kind)


class Registry(Generic[T]):
    """Builders of one family of parts (each returns a T), by kind. Not thread-safe for registration, which
    happens at import; lookups are read-only."""

    def __init__(self, family: str, entries: Mapping[str, _Entry[T]] | None = None) -> None:
        self.family = family
        self._entries: dict[str, _Entry[T]] = dict(entries or {})

    def register(self, kind: str | Enum, *, available: Callable[[], bool] = _always) -> Callable[[B], B]:
        """Decorator: registers the builder under `kind` (replacing any) and returns it unchanged. `available` says
        whether the part can be built on this machine (e.g. a CUDA-only kernel); it is never called at import."""

        def decorate(builder: B) -> B:
            self.add(kind, builder, available=available)
            return builder

        return decorate

    def add(self, kind: str | Enum, builder: Callable[..., T], *, available: Callable[[], bool] = _always) -> None:
        """`register` without the decorator, for builders defined elsewhere (a class, a test double)."""
        self._entries[kind_name(kind)] = _Entry(builder, available)

    def find(self, kind: str | Enum) -> Callable[..., T]:
        """The builder of `kind`; UnknownKind listing the known kinds if none is registered."""
        entry = self._entries.get(kind_name(kind))
        if entry is None:
            raise UnknownKind(self.family, kind_name(kind), self.kinds())
        return entry.builder

    def build(self, config: Configured, *args: Any, **kwargs: Any) -> T:
        """`find(config.kind)(config, *args, **kwargs)`: the part a typed config describes."""
        return self.find(config.kind)(config, *args, **kwargs)

    def kinds(self) -> list[str]:
        """Every registered kind, sorted."""
        return sorted(self._entries)

    def is_available(self, kind: str | Enum) -> bool:
        self.find(kind)  # unknown kinds raise rather than read as "unavailable"
        return self._entries[kind_name(kind)].available()

    def available_kinds(self) -> list[str]:
        """The registered kinds that can be built on this machine, sorted."""
        return [kind for kind in self.kinds() if self._entries[kind].available()]

    def with_builders(self, builders: Mapping[Any, Callable[..., T]]) -> Registry[T]:
        """A copy with `builders` added or replacing same-kind ones (deployment overrides, test doubles); this
        registry is unchanged."""
        copy = Registry(self.family, self._entries)
        for kind, builder in builders.items():
            copy.add(kind, builder)
        return copy

    def __contains__(self, kind: object) -> bool:
        return isinstance(kind, (str, Enum)) and kind_name(kind) in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, kinds={self.kinds()})"


__all__ = ["Configured", "Registry", "UnknownKind", "kind_name"]
