"""The multi-process job's key-value protocol (lungct.train.job) against an in-memory store.

The real two-process runs, with JAX's coordination service, are in
tests/test_train_multiprocess.py (make test-distributed); these check each rule in
milliseconds: barriers, agreements, recorded failures, broken collectives and leaving.
"""

from __future__ import annotations

import logging

import pytest

from lungct.errors import UserError
from lungct.train import job


class FakeClient:
    """The three calls lungct makes of jaxlib's DistributedRuntimeClient, over a dict."""

    def __init__(self) -> None:
        self.store: dict[str, str] = {}

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        if key in self.store and not allow_overwrite:
            raise RuntimeError(f"ALREADY_EXISTS: {key}")
        self.store[key] = value

    def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
        return [(key, value) for key, value in self.store.items() if key.startswith(prefix)]


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    """This process is process 0 of a 2-process job whose store is a FakeClient."""
    fake = FakeClient()
    monkeypatch.setattr(job, "_client", lambda: fake)
    monkeypatch.setattr(job, "process_count", lambda: 2)
    monkeypatch.setattr(job, "_process_id", lambda: 0)
    monkeypatch.setattr(job, "is_primary", lambda: True)
    monkeypatch.setattr(job, "PEER_WAIT_S", 0.3)
    monkeypatch.setattr(job, "_POLL_S", 0.01)
    monkeypatch.setitem(job._entered, "count", 0)
    monkeypatch.setitem(job._joined, "collective_broken", False)
    return fake


def test_barrier_passes_once_every_process_arrived(client: FakeClient) -> None:
    client.store["lungct/1-barrier/cache/1"] = "1"
    job.barrier("cache")
    assert client.store["lungct/1-barrier/cache/0"] == "1"


def test_barrier_stops_with_the_reason_another_process_recorded(client: FakeClient) -> None:
    """Also when the failed process had arrived at the barrier before it failed."""
    client.store["lungct/1-barrier/cache/1"] = "1"
    client.store["lungct/failed/1"] = "dataset /d not found"
    with pytest.raises(job.PeerFailedError,
                       match=r"^process 1 of the job stopped: dataset /d not found$"):
        job.barrier("cache")
    assert client.store["lungct/seen/0"] == "1"


def test_a_name_used_twice_does_not_meet_its_old_keys(client: FakeClient) -> None:
    client.store["lungct/1-barrier/x/1"] = "1"
    job.barrier("x")
    client.store["lungct/failed/1"] = "later"
    with pytest.raises(job.PeerFailedError):
        job.barrier("x")  # lungct/2-barrier/x/: process 1 never arrived, then failed


def test_agreement_and_disagreement(client: FakeClient) -> None:
    client.store["lungct/1-agree/1"] = job.hashlib.sha256(b"train").hexdigest()
    job.agree_across_processes("run A", "train")
    client.store["lungct/2-agree/1"] = job.hashlib.sha256(b"reuse 12").hexdigest()
    with pytest.raises(UserError, match=r"^the processes of the job disagree on run B; give "):
        job.agree_across_processes("run B", "train")


def test_a_failure_is_recorded_and_waits_until_seen(client: FakeClient) -> None:
    client.store["lungct/seen/1"] = "1"
    with pytest.raises(UserError, match="^bad output\n"), job.reporting_failures():
        raise UserError("bad output\nsecond line")
    assert client.store["lungct/failed/0"] == "bad output"


def test_processes_failing_together_do_not_wait_for_each_other(client: FakeClient,
                                                               caplog) -> None:
    client.store["lungct/failed/1"] = "disagree"
    with caplog.at_level(logging.WARNING, "lungct.train.job"), pytest.raises(UserError), \
            job.reporting_failures():
        raise UserError("disagree")
    assert caplog.messages == []


def test_an_unseen_failure_waits_a_bounded_time_and_says_so(client: FakeClient,
                                                            caplog) -> None:
    with caplog.at_level(logging.WARNING, "lungct.train.job"), pytest.raises(KeyboardInterrupt), \
            job.reporting_failures():
        raise KeyboardInterrupt
    assert client.store["lungct/failed/0"] == "KeyboardInterrupt"
    assert caplog.messages == ["not every process of the job saw this failure within 0.3 s"]


GLOO = ("UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read "
        "error [127.0.0.1]:1: Connection reset by peer")


def test_a_broken_collective_gives_the_reason_the_peer_recorded(client: FakeClient) -> None:
    client.store["lungct/failed/1"] = "disk full"
    with pytest.raises(job.PeerFailedError, match=r"^process 1 of the job stopped: disk full$"), \
            job.reporting_failures():
        raise ValueError(GLOO)
    assert "lungct/failed/0" not in client.store and job._joined["collective_broken"]


def test_a_broken_collective_without_a_reason_is_one_sentence(client: FakeClient) -> None:
    with pytest.raises(UserError, match=(
            r"^a collective operation across the job's processes failed \(UNKNOWN: Gloo "
            r"all-reduce failed: .*\); another process has stopped: its log says why\.$")), \
            job.reporting_failures():
        raise RuntimeError(GLOO)


def test_a_reset_connection_elsewhere_is_no_collective(client: FakeClient) -> None:
    """A download's ConnectionResetError is this process's own failure, recorded as such."""
    client.store["lungct/seen/1"] = "1"
    with pytest.raises(ConnectionResetError), job.reporting_failures():
        raise ConnectionResetError("Connection reset by peer")
    assert client.store["lungct/failed/0"] == "Connection reset by peer"
    assert not job._joined["collective_broken"]


def test_leave_returns_alone_and_exits_at_once_in_a_job(client: FakeClient,
                                                        monkeypatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(job.os, "_exit", exits.append)
    monkeypatch.setattr(job.signal, "signal", lambda *args: None)
    assert job.leave(0) == 0
    monkeypatch.setattr(job, "_process_id", lambda: 1)
    monkeypatch.setattr(job, "is_primary", lambda: False)
    job.leave(2)
    assert exits == [2] and client.store["lungct/left/1"] == "1"
    monkeypatch.setattr(job, "process_count", lambda: 1)
    assert job.leave(2) == 2 and exits == [2]


def test_process_zero_leaves_after_the_others(client: FakeClient, monkeypatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(job.os, "_exit", exits.append)
    monkeypatch.setattr(job.signal, "signal", lambda *args: None)
    waited: list[tuple] = []
    monkeypatch.setattr(job, "_wait_for_ids", lambda *args: waited.append(args[1]) or True)
    job.leave(2)
    assert exits == [2] and waited == [("lungct/left/",)]
