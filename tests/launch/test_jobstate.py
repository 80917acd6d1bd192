"""A run's state from its events and Slurm's word, and the attempt hooks' bookkeeping (no Slurm needed)."""

import json
import os

import pytest

from titan.launch import attempt, jobstate


def events(run_dir, *entries):
    for event, fields in entries:
        jobstate.record(run_dir, event, **fields)


SUBMITTED = ("submitted", {"job_id": "7"})
STARTED = ("started", {"job_id": "7", "attempt": 1})


@pytest.mark.parametrize(
    "entries, slurm, state",
    [
        ([SUBMITTED], {"7": "PENDING"}, "pending"),
        ([SUBMITTED, STARTED], {"7": "RUNNING"}, "running"),
        (
            [SUBMITTED, STARTED, ("requeued", {"job_id": "7", "signal": "SIGUSR2"})],
            {"7": "PENDING"},
            "requeued",
        ),
        ([SUBMITTED, STARTED, ("retry", {"job_id": "7", "reason": "x"})], {"7": "COMPLETING"}, "requeued"),
        (
            [SUBMITTED, STARTED, ("finished", {"job_id": "7"}), ("done", {"job_id": "7"})],
            {"7": "COMPLETED"},
            "done",
        ),
        ([SUBMITTED, STARTED, ("failed", {"job_id": "7", "reason": "boom"})], {"7": "FAILED"}, "failed"),
        (
            [SUBMITTED, STARTED, ("stopped", {"job_id": "7", "signal": "SIGTERM"})],
            {"7": "CANCELLED"},
            "cancelled",
        ),
        ([SUBMITTED], {"7": "CANCELLED"}, "cancelled"),  # cancelled while pending
        ([SUBMITTED, STARTED], {"7": "NODE_FAIL"}, "failed"),
        (
            [SUBMITTED, STARTED, ("stopped", {"job_id": "7", "signal": "SIGTERM"})],
            {},
            "cancelled",
        ),  # no sacct
    ],
)
def test_state_joins_events_and_slurm(tmp_path, entries, slurm, state):
    events(tmp_path, *entries)
    assert jobstate.run_state(tmp_path, slurm).state == state


def test_a_new_submission_starts_a_new_history_but_attempts_add_up(tmp_path):
    events(tmp_path, SUBMITTED, STARTED, ("failed", {"job_id": "7", "reason": "boom"}))
    events(tmp_path, ("submitted", {"job_id": "9"}), ("started", {"job_id": "9", "attempt": 1}))
    s = jobstate.run_state(tmp_path, {"7": "FAILED", "9": "RUNNING"})
    assert (s.state, s.job_id, s.attempts, s.reason) == ("running", "9", 2, None)


def test_failed_state_gives_the_first_crash_reason(tmp_path):
    events(tmp_path, SUBMITTED, STARTED, ("crashed", {"job_id": "7", "rank": 1, "reason": "ValueError: bad"}))
    s = jobstate.run_state(tmp_path, {"7": "FAILED"})
    assert (s.state, s.reason) == ("failed", "ValueError: bad")


def test_local_runs(tmp_path):
    assert jobstate.run_state(tmp_path, complete=True).state == "done"  # no events: the metrics decide
    assert jobstate.run_state(tmp_path, complete=False).state == "incomplete"
    with jobstate.tracked(tmp_path) as track:
        assert jobstate.run_state(tmp_path).state == "running"  # this process, alive
        track({"step": 3, "loss": 1.5})
    assert jobstate.run_state(tmp_path).state == "done"
    with pytest.raises(ValueError), jobstate.tracked(tmp_path / "b"):
        raise ValueError("no data")
    assert jobstate.run_state(tmp_path / "b").reason == "ValueError: no data"


def test_begin_moves_the_previous_attempt_aside(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank0.log").write_text("first attempt")
    (tmp_path / "slurm").mkdir()
    for name in ("7_0_log.err", "7_1_log.out", "7_0_result.pkl", "7_batch.log", "7_submitted.pkl"):
        (tmp_path / "slurm" / name).write_text(name)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    attempt.begin(tmp_path)
    moved = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "restarts").rglob("*") if p.is_file())
    assert moved == [
        "restarts/1/logs/rank0.log",
        "restarts/1/slurm/7_0_log.err",
        "restarts/1/slurm/7_0_result.pkl",
        "restarts/1/slurm/7_1_log.out",
    ]
    # the batch log is open (appended across attempts), the submission and the metrics stay
    assert sorted(os.listdir(tmp_path / "slurm")) == ["7_batch.log", "7_submitted.pkl"]
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "logs").exists()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank0.log").write_text("second attempt")
    attempt.begin(tmp_path)
    assert (tmp_path / "restarts" / "2" / "logs" / "rank0.log").read_text() == "second attempt"
    assert [e["event"] for e in jobstate.read(tmp_path)] == ["started", "started"]


def test_end_records_done_and_failed_without_requeueing(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    events(tmp_path, SUBMITTED, STARTED, ("finished", {"loss": 1.0}))
    assert attempt.end(tmp_path, status=0, max_retries=2) == 0
    assert jobstate.read(tmp_path)[-1]["event"] == "done"
    # a crash with no retries left: failed, with the crash's reason and srun's status as the job's
    events(tmp_path / "b", SUBMITTED, STARTED, ("crashed", {"rank": 0, "reason": "KeyError: 'x'"}))
    assert attempt.end(tmp_path / "b", status=1, max_retries=0) == 1
    last = jobstate.read(tmp_path / "b")[-1]
    assert (last["event"], last["reason"]) == ("failed", "KeyError: 'x'")
    # a USR2 stop was already handed to submitit, which requeues: nothing to do
    events(tmp_path / "c", SUBMITTED, STARTED, ("requeued", {"signal": "SIGUSR2"}))
    assert attempt.end(tmp_path / "c", status=255, max_retries=0) == 0
    assert jobstate.read(tmp_path / "c")[-1]["event"] == "requeued"


def test_a_run_that_ended_early_is_recorded_once_by_what_ended_it(tmp_path):
    """A stop or a rank's error is recorded where it is known (the launcher, the rank); the local
    run's tracking adds no `crashed` of its own."""
    with pytest.raises(jobstate.RunEnded), jobstate.tracked(tmp_path):
        jobstate.record_result(tmp_path, {"step": 7, "preempted": "SIGINT", "checkpoint": "c/step-7"})
        raise jobstate.RunEnded("stopped at step 7 on SIGINT", 130)
    assert [e["event"] for e in jobstate.read(tmp_path)] == ["started", "stopped"]
    s = jobstate.run_state(tmp_path)
    assert (s.state, s.reason) == ("cancelled", "SIGINT")
