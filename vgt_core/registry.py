"""The component registry: named factories with validated options and a record of who provided them.

Plugins fill it through the ``vgt_register_*`` hooks (see ``hookspecs``); the core owns duplicate names and
provenance, and every lookup of an unknown name lists the known ones, closest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from vgt_core.errors import ConfigError, UnknownComponentError

KINDS = ("encoder", "decoder", "backbone", "sampler", "dataset")


class Options(BaseModel):
    """Base class of component options: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[[Any], Any]
    options: type[BaseModel]
    description: str
    plugin: str
    package: str
    version: str

    def validate(self, options: dict | BaseModel | None, where: str = "", prefix: str = "") -> BaseModel:
        """Validate ``options`` against this component's model; errors name the key path."""
        if isinstance(options, self.options):
            return options
        if isinstance(options, BaseModel):
            options = options.model_dump()
        try:
            return self.options.model_validate(options or {})
        except ValidationError as exc:
            from vgt_core.config import format_validation_error

            where = where or f"{self.kind} {self.name!r} options"
            raise ConfigError(format_validation_error(exc, self.options, where, prefix)) from None

    def build(self, options: dict | BaseModel | None = None) -> Any:
        """The component for ``options``, checked against its protocol (``vgt_core.protocols.check_component``)."""
        from vgt_core.protocols import check_component

        component = self.factory(self.validate(options))
        check_component(self.kind, component, f"{self.kind} {self.name!r} of plugin {self.plugin!r} ({self.package})")
        return component


class Registry:
    """Components by kind and name, plus presets contributed by plugins."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self.presets: dict[str, tuple[dict, str]] = {}

    def add(self, component: Component) -> None:
        table = self._components[component.kind]
        if component.name in table:
            first = table[component.name]
            raise ConfigError(
                f"{component.kind} {component.name!r} is registered twice: by plugin {first.plugin!r} "
                f"({first.package}) and by plugin {component.plugin!r} ({component.package})"
            )
        table[component.name] = component

    def add_preset(self, name: str, preset: dict, plugin: str) -> None:
        if name in self.presets:
            raise ConfigError(f"preset {name!r} is registered twice: by {self.presets[name][1]!r} and {plugin!r}")
        self.presets[name] = (preset, plugin)

    def get(self, kind: str, name: str, where: str = "") -> Component:
        if kind not in self._components:
            raise ConfigError(f"unknown component kind {kind!r}; allowed: {', '.join(KINDS)}")
        try:
            return self._components[kind][name]
        except KeyError:
            raise UnknownComponentError(kind, name, self._components[kind], where) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def components(self) -> list[Component]:
        return [c for kind in KINDS for _, c in sorted(self._components[kind].items())]

    def build(self, kind: str, name: str, options: dict | BaseModel | None = None) -> Any:
        return self.get(kind, name).build(options)
