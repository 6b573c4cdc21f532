"""The component registry: named factories with validated options and a record of who provided them.

Plugins fill it through the ``vgt_register_*`` hooks (see ``hookspecs``); the core owns duplicate names and
provenance, and every lookup of an unknown name lists the known ones, closest first.

A factory or an options class may be registered as a ``"module:attr"`` string: it is imported the first time a
component is validated or built, so that listing components (``vgt --help``, ``vgt plugins``) imports no model code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from vgt_core.errors import ConfigError, UnknownComponentError, VGTError

KINDS = ("encoder", "decoder", "backbone", "sampler", "dataset", "evaluator", "preparation")


class Options(BaseModel):
    """Base class of component options: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PluginImportError(VGTError, ImportError):
    """A component's lazily named factory or options class cannot be imported."""


def check_ref(ref: Any, what: str) -> None:
    """A lazy reference must read ``"package.module:attribute"``; anything else is an error at registration."""
    if isinstance(ref, str):
        module, sep, attr = ref.partition(":")
        if not (sep and module and attr) or ":" in attr:
            raise ConfigError(f"{what}: {ref!r} is not a lazy reference; write 'package.module:attribute'")


def load_ref(ref: str, what: str) -> Any:
    """The object a ``"module:attr"`` string names (dotted attributes allowed); failures name ``what``."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PluginImportError(f"{what}: cannot import {ref!r}: {type(exc).__name__}: {exc}") from exc
    return obj


@dataclass(frozen=True)
class Component:
    """A registered component. ``factory_ref``/``options_ref`` are the objects or ``"module:attr"`` strings the
    plugin registered; ``factory``/``options`` are the objects, imported on first use."""

    kind: str
    name: str
    factory_ref: Union[Callable[[Any], Any], str]
    options_ref: Union[type[BaseModel], str]
    description: str
    plugin: str
    package: str
    version: str

    def __post_init__(self) -> None:
        check_ref(self.factory_ref, self._what("factory"))
        check_ref(self.options_ref, self._what("options"))

    def _what(self, part: str) -> str:
        return f"{self.kind} {self.name!r} of plugin {self.plugin!r} ({self.package} {self.version}), its {part}"

    @property
    def factory(self) -> Callable[[Any], Any]:
        ref = self.factory_ref
        return load_ref(ref, self._what("factory")) if isinstance(ref, str) else ref

    @property
    def options(self) -> type[BaseModel]:
        ref = self.options_ref
        return load_ref(ref, self._what("options")) if isinstance(ref, str) else ref

    def validate(self, options: dict | BaseModel | None, where: str = "", prefix: str = "") -> BaseModel:
        """Validate ``options`` against this component's model; errors name the key path."""
        model = self.options
        if isinstance(options, model):
            return options
        if isinstance(options, BaseModel):
            options = options.model_dump()
        try:
            return model.model_validate(options or {})
        except ValidationError as exc:
            from vgt_core.config import format_validation_error

            where = where or f"{self.kind} {self.name!r} options"
            raise ConfigError(format_validation_error(exc, model, where, prefix)) from None

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
