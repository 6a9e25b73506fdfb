"""One trial status, mapped once to MLflow's run statuses and shown as its value in every table."""

from __future__ import annotations

from enum import Enum

__all__ = ["TrialStatus"]


class TrialStatus(str, Enum):
    """Where a trial stands. Tables, ``leaderboard.csv`` and the MLflow tag ``spntune.status`` show
    the value; MLflow's own run status is ``mlflow_status``."""

    RUNNING = "running"
    COMPLETED = "completed"  # ran every epoch
    STOPPED = "stopped"  # stopped early by the scheduler (ASHA)
    INTERRUPTED = "interrupted"  # the search was interrupted (Ctrl-C) before it ended; --resume continues it
    ERROR = "error"  # raised

    @property
    def mlflow_status(self) -> str:
        return _MLFLOW[self]

    @classmethod
    def of(cls, errored: bool, epochs: int, expected_epochs: int, interrupted: bool = False) -> TrialStatus:
        """A trial that ended: ``error`` if it raised, else ``completed`` when every epoch ran, else
        ``interrupted`` when the search was, else ``stopped`` (by the scheduler)."""
        if errored:
            return cls.ERROR
        if epochs >= expected_epochs:
            return cls.COMPLETED
        return cls.INTERRUPTED if interrupted else cls.STOPPED

    def reason(self, epochs: int, error: str = "") -> str:
        """The ``spntune.reason`` tag of an ended trial's run ('' when there is nothing to explain)."""
        if self is TrialStatus.ERROR:
            return error or "trial raised; see the Ray error file in the trial folder"
        if self is TrialStatus.STOPPED:
            return f"stopped early by the scheduler after epoch {epochs}"
        if self is TrialStatus.INTERRUPTED:
            return f"the search was interrupted after epoch {epochs}; `spntune search ... --resume` continues it"
        return ""


_MLFLOW = {
    TrialStatus.RUNNING: "RUNNING",
    TrialStatus.COMPLETED: "FINISHED",
    TrialStatus.STOPPED: "KILLED",
    TrialStatus.INTERRUPTED: "KILLED",
    TrialStatus.ERROR: "FAILED",
}
