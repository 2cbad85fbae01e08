"""Continuous batching, chunked prefill, prefix caching and retraction."""

from heteroserve.core.scheduler.outputs import FinishKind, FinishReason, StepOutput
from heteroserve.core.scheduler.request import Req
from heteroserve.core.scheduler.scheduler import Scheduler

__all__ = ["FinishKind", "FinishReason", "Req", "Scheduler", "StepOutput"]
