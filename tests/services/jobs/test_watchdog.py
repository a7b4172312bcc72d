"""The watchdog's limits (issue 13, C3): the hard runtime and cost caps, and what they never touch."""

from __future__ import annotations

from services.jobs.model import Job, JobState
from services.jobs.watchdog import limit_breached
from services.settings import load_settings

S = JobState
NOW = 1_000_000.0


def job(state: JobState, *, started: float = NOW - 60, dph: float | None = 0.5, rented: float | None = None) -> Job:
    return Job(name="w", user_id="u", state=state, started_at=started, dph_total=dph,
               rented_at=rented if rented is not None else started)


def test_runtime_past_the_cap_plus_grace_is_a_breach_only_after_the_grace() -> None:
    s = load_settings(max_runtime_s=3600, watchdog_grace_s=600, max_job_cost=100)
    assert limit_breached(s, job(S.TRAINING, started=NOW - 3600 - 599), NOW) is None
    kind, message = limit_breached(s, job(S.UPLOADING, started=NOW - 3600 - 601), NOW) or ("", "")
    assert kind == "max_runtime" and "watchdog" in message


def test_cost_past_the_cap_times_the_margin_is_a_breach() -> None:
    s = load_settings(max_runtime_s=10 * 3600, max_job_cost=1.0, watchdog_cost_margin=1.1)
    # $2/h: $1.00 after 30 min (at the cap: the pipeline's own check), $1.10 after 33 min
    assert limit_breached(s, job(S.TRAINING, dph=2.0, rented=NOW - 32 * 60), NOW) is None
    assert (limit_breached(s, job(S.COLLECTING, dph=2.0, rented=NOW - 34 * 60), NOW) or ("",))[0] == "max_cost"


def test_finished_queued_and_launched_jobs_are_never_touched() -> None:
    s = load_settings(max_runtime_s=60, watchdog_grace_s=0, max_job_cost=0.01)
    for state in (S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED, S.AWAITING_CONFIRMATION, S.PREPARED):
        assert limit_breached(s, job(state, started=NOW - 86400, dph=10.0), NOW) is None, state


def test_a_collect_gets_one_more_grace_to_save_the_lora() -> None:
    s = load_settings(max_runtime_s=3600, watchdog_grace_s=600, max_job_cost=100)
    assert limit_breached(s, job(S.COLLECTING, started=NOW - 3600 - 1199), NOW) is None
    assert (limit_breached(s, job(S.COLLECTING, started=NOW - 3600 - 1201), NOW) or ("",))[0] == "max_runtime"
    assert (limit_breached(s, job(S.TRAINING, started=NOW - 3600 - 1199), NOW) or ("",))[0] == "max_runtime"
