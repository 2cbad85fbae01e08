"""Plugin discovery (pluggy) and platform selection."""

from heteroserve.core.plugins.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
