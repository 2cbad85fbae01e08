"""heteroserve: LLM serving on every accelerator.

The engine is imported lazily so that ``import heteroserve`` stays light and imports no
vendor package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from heteroserve.core.plugins.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["Engine", "hookimpl", "__version__"]

if TYPE_CHECKING:
    from heteroserve.core.engine import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from heteroserve.core.engine import Engine

        return Engine
    raise AttributeError(f"module 'heteroserve' has no attribute {name!r}")
