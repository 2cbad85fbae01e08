"""Load platform plugins through pluggy and select the platform an engine runs on."""

from __future__ import annotations

import importlib.metadata as md
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import pluggy

from heteroserve.core.kernels.linear import LINEAR_SCHEMES, LinearSchemeSpec
from heteroserve.core.kernels.registry import KernelRegistry
from heteroserve.core.platform import Availability, Platform
from heteroserve.core.plugins import api_version, hookspecs
from heteroserve.core.quantization import FORMATS
from heteroserve.core.quantization.base import QuantFormatSpec

logger = logging.getLogger(__name__)


class PlatformSelectionError(RuntimeError):
    """The requested platform is unknown or unavailable, or ``auto`` is ambiguous."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, with its error in one line."""

    plugin: str
    source: str
    error: str


@dataclass
class PlatformEntry:
    """A discovered platform and the distribution that provided it."""

    platform: Platform
    source: str

    @cached_property
    def availability(self) -> Availability:
        try:
            return self.platform.detect()
        except Exception as exc:  # detect() must not raise; report if it does
            return Availability(False, f"detect() raised {type(exc).__name__}: {exc}")


@dataclass
class PluginCatalog:
    """Everything discovered at start-up: platforms, kernels, and plugins that failed."""

    manager: pluggy.PluginManager
    platforms: dict[str, PlatformEntry] = field(default_factory=dict)
    registry: KernelRegistry = field(default_factory=KernelRegistry)
    failures: list[PluginFailure] = field(default_factory=list)
    #: one-line remarks about plugins that loaded (an undeclared plugin API version)
    notes: list[str] = field(default_factory=list)
    conformance_options: dict[str, dict[str, object]] = field(default_factory=dict)
    #: checkpoint quantization formats added by plugins, by ``quant_method``
    quant_formats: dict[str, QuantFormatSpec] = field(default_factory=dict)
    #: definitions of the linear schemes plugins added, by scheme name
    linear_schemes: dict[str, LinearSchemeSpec] = field(default_factory=dict)

    def availability_table(self) -> str:
        lines = []
        for name, entry in sorted(self.platforms.items()):
            a = entry.availability
            state = "available" if a.available else f"unavailable: {a.reason}"
            state += " (simulated; never chosen by auto)" if a.simulated else ""
            lines.append(f"  {name} ({entry.source}): {state}")
        for f in self.failures:
            lines.append(f"  plugin {f.plugin} ({f.source}) failed to load: {f.error}")
        return "\n".join(lines) or "  (no platforms discovered)"

    def select(self, name: str = "auto", device_type: str | None = None) -> Platform:
        """Return the platform ``name`` (or the best available one for ``"auto"``).

        ``device_type`` (``--device``, a torch device type) narrows ``auto`` to the platforms
        whose ``device_type`` it is, and must match a named platform's. ``auto`` never picks
        a simulated platform, whatever its priority. Raises :class:`PlatformSelectionError`
        listing every platform and why each is unavailable when ``name`` is unknown or
        unavailable, when no available platform drives ``device_type``, or when two
        available platforms tie for the top priority under ``auto``.
        """
        if device_type is not None and name != "auto":
            chosen = self.select(name)
            if chosen.device_type != device_type:
                raise PlatformSelectionError(
                    f"--device {device_type} contradicts --platform {name} (device type "
                    f"{chosen.device_type})")
            return chosen
        if name == "auto":
            ready = [e for e in self.platforms.values()
                     if e.availability.available and not e.availability.simulated
                     and device_type in (None, e.platform.device_type)]
            if not ready and device_type is not None:
                kinds = sorted({e.platform.device_type for e in self.platforms.values()})
                raise PlatformSelectionError(
                    f"--device {device_type}: no available platform drives that device type "
                    f"(known device types: {', '.join(kinds)}):\n{self.availability_table()}")
            if not ready:
                raise PlatformSelectionError(
                    f"no platform is available:\n{self.availability_table()}")
            top = max(e.platform.priority for e in ready)
            best = sorted(e.platform.name for e in ready if e.platform.priority == top)
            if len(best) > 1:
                raise PlatformSelectionError(
                    f"--platform auto is ambiguous: {' and '.join(best)} share priority {top}; "
                    f"pass --platform {best[0]} or --platform {best[1]}")
            return self.platforms[best[0]].platform
        entry = self.platforms.get(name)
        if entry is None:
            raise PlatformSelectionError(
                f"unknown platform {name!r}; known: {', '.join(sorted(self.platforms))} "
                f"({self._available_names()}; `heteroserve platforms` says why)")
        if not entry.availability.available:
            raise PlatformSelectionError(
                f"platform {name!r} is unavailable: {entry.availability.reason} "
                f"({self._available_names()})")
        return entry.platform

    def _available_names(self) -> str:
        ready = sorted(n for n, e in self.platforms.items() if e.availability.available)
        return f"available here: {', '.join(ready)}" if ready else "none is available here"


def _plugin_source(plugin: object, default: str) -> str:
    return getattr(plugin, "__heteroserve_source__", default)


def _register_plugin(pm: pluggy.PluginManager, plugin: object, name: str, source: str,
                     catalog: PluginCatalog) -> bool:
    failures = catalog.failures
    try:
        note = api_version.check_declared(
            name, getattr(plugin, api_version.DECLARATION_ATTR, None))
    except api_version.PluginApiVersionError as exc:
        failures.append(PluginFailure(name, source, str(exc)))
        return False
    if note and source != hookspecs.PROJECT:  # built-in platforms ship with the API itself
        catalog.notes.append(note)
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except Exception as exc:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        failures.append(PluginFailure(name, source, f"{type(exc).__name__}: {exc}"))
        return False
    return True


def _entry_point_plugins(failures: list[PluginFailure]) -> list[tuple[str, str, object]]:
    found = []
    for ep in sorted(md.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda e: e.name):
        source = ep.dist.name if ep.dist is not None else "?"
        try:
            found.append((ep.name, source, ep.load()))
        except Exception as exc:
            failures.append(PluginFailure(ep.name, source, f"{type(exc).__name__}: {exc}"))
    return found


def load_plugins(extra_plugins: Iterable[tuple[str, object]] = (),
                 use_entry_points: bool = True) -> PluginCatalog:
    """Discover plugins (entry points, then ``extra_plugins`` as ``(name, plugin)``), collect
    their platforms and kernels, and report failures instead of raising."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    catalog = PluginCatalog(manager=pm)
    candidates = _entry_point_plugins(catalog.failures) if use_entry_points else []
    candidates += [(name, _plugin_source(obj, "in-process"), obj) for name, obj in extra_plugins]
    sources: dict[str, str] = {}
    for name, source, plugin in candidates:
        if _register_plugin(pm, plugin, name, source, catalog):
            sources[name] = source
    for name, source in sources.items():
        plugin = pm.get_plugin(name)
        try:
            _collect(pm, plugin, name, source, catalog)
        except Exception as exc:
            catalog.failures.append(PluginFailure(name, source, f"{type(exc).__name__}: {exc}"))
    for f in catalog.failures:
        logger.warning("heteroserve plugin %s (%s) failed to load: %s", f.plugin, f.source, f.error)
    return catalog


def _call(pm: pluggy.PluginManager, plugin: object, hook: str, **kwargs: object) -> list:
    caller = getattr(pm.hook, hook)
    impls = [i for i in caller.get_hookimpls() if i.plugin is plugin]
    return [impl.function(**{a: kwargs[a] for a in impl.argnames}) for impl in impls]


def _collect(pm: pluggy.PluginManager, plugin: object, name: str, source: str,
             catalog: PluginCatalog) -> None:
    """Take one plugin's platforms, kernels and quantization formats, all or nothing."""
    platforms: list[Platform] = [p for r in _call(pm, plugin, "heteroserve_platforms") for p in r]
    for p in platforms:
        if p.name in catalog.platforms:
            raise ValueError(f"platform {p.name!r} is already provided by "
                             f"{catalog.platforms[p.name].source}")
    staging = KernelRegistry()
    _call(pm, plugin, "heteroserve_register_kernels", registry=staging)
    specs = [replace(s, provider=s.provider or source) for op in staging.ops()
             for s in staging.implementations(op)]
    trial = KernelRegistry()
    for spec in [*catalog.registry.for_all(), *specs]:
        trial.register(spec)  # raises DuplicateKernelError before anything is kept
    formats = _quant_formats(pm, plugin, source, catalog)
    schemes = _linear_schemes(pm, plugin, source, catalog)
    for spec in specs:
        catalog.registry.register(spec)
    catalog.quant_formats.update(formats)
    catalog.linear_schemes.update(schemes)
    for p in platforms:
        catalog.platforms[p.name] = PlatformEntry(p, source)
    for options in _call(pm, plugin, "heteroserve_conformance_options"):
        for p in platforms:
            catalog.conformance_options[p.name] = dict(options or {})


def _named_specs(pm: pluggy.PluginManager, plugin: object, source: str, hook: str,
                 spec_type: type, key: str, built_in: Collection[str], taken: dict[str, Any],
                 what: str, verb: str) -> dict[str, Any]:
    """One plugin's ``spec_type`` results of ``hook``, keyed by their ``key`` attribute:
    ``TypeError`` for a result of another type, ``ValueError`` naming a ``what`` that is
    ``built_in`` or already in ``taken`` (from another plugin); nothing is kept then. Each
    spec's ``provider`` defaults to ``source``."""
    found: dict[str, Any] = {}
    for spec in [s for r in _call(pm, plugin, hook) for s in (r or [])]:
        if not isinstance(spec, spec_type):
            raise TypeError(f"{hook}() returned {type(spec).__name__}, not a "
                            f"{spec_type.__name__}")
        name = getattr(spec, key)
        if name in built_in:
            raise ValueError(f"{what} {name!r} is built in")
        other = taken.get(name) or found.get(name)
        if other is not None:
            raise ValueError(f"{what} {name!r} is already {verb} by {other.provider}")
        found[name] = replace(spec, provider=spec.provider or source)
    return found


def _quant_formats(pm: pluggy.PluginManager, plugin: object, source: str,
                   catalog: PluginCatalog) -> dict[str, QuantFormatSpec]:
    """One plugin's quantization formats, checked against the built-in ones and those other
    plugins took (raises ``ValueError`` naming the method; nothing is kept then)."""
    return _named_specs(pm, plugin, source, "heteroserve_quantization_formats",
                        QuantFormatSpec, "method", FORMATS, catalog.quant_formats,
                        "quantization format", "provided")


def _linear_schemes(pm: pluggy.PluginManager, plugin: object, source: str,
                    catalog: PluginCatalog) -> dict[str, LinearSchemeSpec]:
    """One plugin's linear-scheme definitions (raises naming a taken or built-in name)."""
    return _named_specs(pm, plugin, source, "heteroserve_linear_schemes", LinearSchemeSpec,
                        "name", LINEAR_SCHEMES, catalog.linear_schemes, "linear scheme",
                        "defined")
