"""Plugin discovery: pluggy, the entry-point group ``vgt``, and the environment switches.

- Plugins (vgt's own included) are found through the entry-point group ``vgt``.
- ``VGT_LOAD_PLUGINS=a,b`` loads exactly the entry points named ``a`` and ``b`` (empty: none); the core's own
  components (``vgt_core.evaluators``, plugin ``vgt-core``) are always registered.
- ``VGT_TRACE_PLUGINS=1`` prints every hook call.
- After loading, ``check_pending`` turns a misspelled hook name into an error.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from typing import Any, Callable

import pluggy

from vgt_core import hookspecs
from vgt_core.registry import KINDS, Component, Options, Registry

ENTRY_POINT_GROUP = "vgt"
_HOOKS = {
    "encoder": "vgt_register_encoders",
    "decoder": "vgt_register_decoders",
    "backbone": "vgt_register_backbones",
    "sampler": "vgt_register_samplers",
    "dataset": "vgt_register_datasets",
    "evaluator": "vgt_register_evaluators",
    "preparation": "vgt_register_preparations",
}

_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None


class NoOptions(Options):
    """A component without options."""


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with plugins loaded on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("vgt")
        pm.add_hookspecs(hookspecs)
        from vgt_core import evaluators  # the core's own components (the reconstruction evaluator), always there

        pm.register(evaluators, name="vgt-core")
        _load_entry_points(pm)
        pm.check_pending()
        if os.environ.get("VGT_TRACE_PLUGINS"):
            pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
            pm.enable_tracing()
        _pm = pm
    return _pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    only = os.environ.get("VGT_LOAD_PLUGINS")
    if only is None:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        return
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    available = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    missing = wanted - set(available)
    if missing:
        from vgt_core.errors import VGTError, unknown_name_message

        raise VGTError(
            "VGT_LOAD_PLUGINS: " + "; ".join(unknown_name_message("plugin", m, available) for m in sorted(missing))
        )
    for name in sorted(wanted):
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object by hand (tests, notebooks); the registry is rebuilt on next use."""
    global _registry
    pm = plugin_manager()
    registered = pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        # Leave the manager as it was: no half-registered plugin, no spec-less hook left behind.
        pm.unregister(name=registered)
        for hook_name, caller in list(vars(pm.hook).items()):
            if isinstance(caller, pluggy.HookCaller) and caller.spec is None and not caller.get_hookimpls():
                delattr(pm.hook, hook_name)
        raise
    _registry = None
    return registered


def unregister_plugin(name: str) -> None:
    global _registry
    plugin_manager().unregister(name=name)
    _registry = None


def _provenance(pm: pluggy.PluginManager) -> dict[int, tuple[str, str]]:
    found = {id(plugin): (dist.metadata["name"], dist.version) for plugin, dist in pm.list_plugin_distinfo()}
    core = pm.get_plugin("vgt-core")  # registered by hand, not through an entry point: the vgt package itself
    if core is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found[id(core)] = ("vgt", version("vgt"))
        except PackageNotFoundError:
            pass
    return found


def registry() -> Registry:
    """The component registry, filled by every loaded plugin's ``vgt_register_*`` hooks."""
    global _registry
    if _registry is None:
        pm = plugin_manager()
        reg = Registry()
        dists = _provenance(pm)
        for kind in KINDS:
            for impl, call in _per_plugin(pm, _HOOKS[kind]):
                package, version = dists.get(id(impl.plugin), (_module_of(impl.plugin), "unknown"))
                call(register=_component_adder(reg, kind, impl.plugin_name, package, version))
        for impl, call in _per_plugin(pm, "vgt_register_presets"):
            call(register=lambda name, preset, _p=impl.plugin_name: reg.add_preset(name, preset, _p))
        _registry = reg
    return _registry


def _per_plugin(pm: pluggy.PluginManager, hook: str) -> list[tuple[Any, Callable[..., Any]]]:
    """Each implementation of ``hook`` with a caller for it alone, in the order pluggy calls them (``tryfirst``
    ones first, ``trylast`` ones last, otherwise the plugin registered last first). The calls go through pluggy, so
    tracing and implementations that take a subset of the hook's arguments work; one plugin at a time, so each
    component is credited to the plugin that registered it."""
    plugins = pm.get_plugins()
    return [
        (impl, pm.subset_hook_caller(hook, remove_plugins=[p for p in plugins if p is not impl.plugin]))
        for impl in reversed(getattr(pm.hook, hook).get_hookimpls())
    ]


def _module_of(plugin: Any) -> str:
    return getattr(plugin, "__name__", type(plugin).__module__)


def _component_adder(reg: Registry, kind: str, plugin: str, package: str, version: str) -> Callable[..., None]:
    def register(name: str, factory: Callable | str, options: type | str | None = None, description: str = "") -> None:
        # a factory named lazily ("module:attr") is not imported for its docstring: such plugins say it explicitly
        if not description and not isinstance(factory, str):
            description = (factory.__doc__ or "").strip().split("\n")[0]
        reg.add(Component(kind, name, factory, options or NoOptions, description, plugin, package, version))

    return register


def list_components(kind: str | None = None) -> list[Component]:
    """Every registered component (optionally of one kind), sorted by kind and name."""
    comps = registry().components()
    return [c for c in comps if kind is None or c.kind == kind]
