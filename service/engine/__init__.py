"""Continuous batching: sequences (one request's state), the scheduler (who runs next step), the cache manager
(who owns which KV-cache slot), the runner (tensors and the model) and the loop that ties them together."""

from service.engine.loop import Engine, EngineDeadError, EngineStats, QueueFullError
from service.engine.sequence import FinishReason, Sequence, StreamEvent

__all__ = ["Engine", "EngineDeadError", "EngineStats", "FinishReason", "QueueFullError", "Sequence", "StreamEvent"]
