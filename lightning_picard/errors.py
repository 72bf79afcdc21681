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


class PicardReplicaError(RuntimeError):
    """The ranks' anchors differ: the replicated replay did not give every rank the same state bit for bit.

    Every rank raises this at the same round (each compares the anchor checksums in the gathered rows).

    Attributes:
        rank: the first rank whose anchor differs from rank 0's.
        step: τ, the step of the anchor that differs.
    """

    def __init__(self, rank: int, step: int) -> None:
        self.rank = rank
        self.step = step
        super().__init__(
            f"Picard: the anchor (step {step}) of rank {rank} differs from rank 0's. Every rank replays the same "
            "optimizer steps and must hold the same state bit for bit: use deterministic kernels on GPUs "
            "(Trainer(deterministic=True) or torch.use_deterministic_algorithms(True), and deterministic renderers), "
            "the same GPU model and library versions on every rank, and keep rank-dependent code out of "
            "optimizer_step, the optimizer and picard_after_optimizer_step."
        )
