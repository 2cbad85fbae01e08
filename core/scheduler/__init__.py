"""Continuous batching, chunked prefill, prefix caching and retraction."""

from heteroserve.core.scheduler.request import Req, StepOutput
from heteroserve.core.scheduler.scheduler import Scheduler

__all__ = ["Req", "Scheduler", "StepOutput"]
