"""Jobs: the model and state machine, the store, events, the pipeline and the worker."""

from services.jobs.model import TERMINAL, IllegalTransition, Job, JobState
from services.jobs.store import JobNotFound, JobStore

__all__ = ["TERMINAL", "IllegalTransition", "Job", "JobNotFound", "JobState", "JobStore"]
