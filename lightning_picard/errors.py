"""Errors raised by the Picard strategy."""

from __future__ import annotations


class PicardRankError(RuntimeError):
    """A slot evaluation raised on some rank; every rank raises this, naming the rank and the step.

    Attributes:
        rank: the global rank whose ``training_step`` (or backward) raised.
        step: the optimizer step it was evaluating.
        description: ``"ExceptionType: message"`` of the original error, when known.
    """

    def __init__(self, rank: int, step: int, description: str | None) -> None:
        self.rank = rank
        self.step = step
        self.description = description
        detail = f": {description.rstrip('.')}" if description else ""
        super().__init__(
            f"Picard: rank {rank} failed while evaluating step {step}{detail}. All ranks stopped; the module holds "
            "the last converged state (the checkpoint Lightning writes on an exception is a valid sequential state)."
        )
