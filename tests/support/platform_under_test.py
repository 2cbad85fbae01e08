"""The platform the engine and server tests run on: ``$HETEROSERVE_TEST_PLATFORM``, default
``cpu`` (``cuda`` on the GPU machine)."""

from __future__ import annotations

import os

TEST_PLATFORM = os.environ.get("HETEROSERVE_TEST_PLATFORM", "cpu")
