"""heteroserve: LLM serving on every accelerator.

The engine is imported lazily so that ``import heteroserve`` stays light and imports no
vendor package.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# torch >= 2.5 imports every installed out-of-tree device backend (torch_npu, ...) inside
# `import torch` unless this is "0"; a backend that cannot initialise (torch-npu without CANN or
# an NPU) then breaks `import torch` itself. heteroserve imports vendor packages explicitly in
# Platform.detect(), so it never needs autoload. Only effective when heteroserve is imported
# before torch; a value the user set is kept. See docs/platforms/npu.md.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from heteroserve.core.plugins.hookspecs import hookimpl  # noqa: E402  (after the env default)

__version__ = "0.1.0"
__all__ = ["Engine", "hookimpl", "__version__"]

if TYPE_CHECKING:
    from heteroserve.core.engine import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from heteroserve.core.engine import Engine

        return Engine
    raise AttributeError(f"module 'heteroserve' has no attribute {name!r}")
