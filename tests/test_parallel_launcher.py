"""dlengine.parallel.launch on CPU with gloo (2 processes): results come back in rank order, and
a rank that raises, or dies, or hangs brings the whole job down within seconds with its error."""

import time

import pytest

from dlengine.parallel import WorkerError, WorkerGroup, launch

import parallel_helpers as helpers


def test_launch_returns_each_ranks_result():
    assert launch(helpers.rank_sum, 2, timeout=120) == [3.0, 3.0]


def test_gloo_all_to_all_single_with_uneven_and_empty_splits():
    assert launch(helpers.uneven_all_to_all, 2, timeout=120) == [[0.0, 1.0, 2.0, 100.0], [101.0, 102.0]]


def _assert_all_gone(group: WorkerGroup) -> None:
    assert not any(group.alive), "a rank is still running"
    assert all(p.exitcode is not None for p in group.procs)


def test_failing_rank_stops_the_job_with_its_traceback():
    group = WorkerGroup(helpers.raise_on_rank, 2, (1, "rank one cannot go on"))
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        group.join(timeout=120)
    assert info.value.rank == 1
    assert "rank one cannot go on" in str(info.value) and "ValueError" in str(info.value)
    assert "raise_on_rank" in str(info.value)  # the worker's traceback came along
    # rank 0 sat in a barrier that never completes: it was stopped, not waited for
    assert time.monotonic() - t0 < 30
    _assert_all_gone(group)


def test_silently_dying_rank_stops_the_job():
    group = WorkerGroup(helpers.die_on_rank, 2, (0, 7))
    with pytest.raises(WorkerError, match="exit code 7") as info:
        group.join(timeout=120)
    assert info.value.rank == 0
    _assert_all_gone(group)


def test_timeout_stops_every_rank():
    group = WorkerGroup(helpers.sleep_forever, 2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        group.join(timeout=5)
    assert time.monotonic() - t0 < 30
    _assert_all_gone(group)
