"""The plugin API's version and the compatibility rule the loader applies.

``PLUGIN_API_VERSION`` follows semantic versioning for everything
:mod:`heteroserve.plugin_api` exports: a major bump removes or changes a name incompatibly, a
minor bump adds names (a deprecated name keeps working, with a warning, for one minor
version), a patch bump changes no name. A plugin declares the version it was built for as the
module-level string ``HETEROSERVE_PLUGIN_API = "MAJOR.MINOR"`` on its entry-point object; the
loader accepts it when the majors match and the plugin's minor is not newer than the one
offered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PLUGIN_API_VERSION = "1.9.0"
#: the attribute of a plugin's entry-point object naming the API version it was built for
DECLARATION_ATTR = "HETEROSERVE_PLUGIN_API"

_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")


class PluginApiVersionError(ValueError):
    """A plugin's declared API version is malformed or incompatible with this heteroserve."""


@dataclass(frozen=True, order=True)
class ApiVersion:
    """``MAJOR.MINOR.PATCH`` (``PATCH`` defaults to 0)."""

    major: int
    minor: int
    patch: int = 0

    @staticmethod
    def parse(text: str) -> ApiVersion:
        """Parse ``"1.2"`` or ``"1.2.3"``. Raises :class:`PluginApiVersionError` otherwise."""
        m = _VERSION.match(str(text).strip())
        if m is None:
            raise PluginApiVersionError(
                f"{DECLARATION_ATTR} must look like 'MAJOR.MINOR', got {text!r}")
        return ApiVersion(int(m[1]), int(m[2]), int(m[3] or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


OFFERED = ApiVersion.parse(PLUGIN_API_VERSION)


def is_compatible(wanted: ApiVersion, offered: ApiVersion = OFFERED) -> bool:
    """Same major, and the plugin needs no minor newer than the one offered."""
    return wanted.major == offered.major and wanted.minor <= offered.minor


def check_declared(plugin_name: str, declared: object | None) -> str | None:
    """Check a plugin's declaration. Returns None when accepted; raises
    :class:`PluginApiVersionError` with one line (the plugin, wanted and offered versions)
    when refused. ``declared`` None (no declaration) is accepted and returned as a note."""
    if declared is None:
        return (f"plugin {plugin_name} declares no {DECLARATION_ATTR}; assumed "
                f"{OFFERED.major}.0 (declare it: undeclared plugins are refused from 2.0)")
    try:
        wanted = ApiVersion.parse(str(declared))
    except PluginApiVersionError as exc:
        raise PluginApiVersionError(f"plugin {plugin_name}: {exc}") from None
    if not is_compatible(wanted):
        raise PluginApiVersionError(
            f"plugin {plugin_name} wants plugin API {wanted.major}.{wanted.minor}, heteroserve "
            f"offers {PLUGIN_API_VERSION}: refused")
    return None
