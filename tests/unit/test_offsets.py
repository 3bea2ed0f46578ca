import pytest

from worker.offsets import PartitionTracker


def test_commit_points_at_lowest_unfinished_offset() -> None:
    tracker = PartitionTracker(epoch=1)
    for offset in range(100):
        tracker.admit(offset)
    for offset in range(1, 100):
        tracker.finish(offset)
    assert tracker.committable() == 0
    tracker.finish(0)
    assert tracker.committable() == 100
    assert tracker.in_flight == 0


def test_gaps_in_offsets_do_not_block_the_watermark() -> None:
    tracker = PartitionTracker(epoch=1)
    for offset in (5, 7, 10):
        tracker.admit(offset)
    tracker.finish(7)
    assert tracker.committable() == 5
    tracker.finish(5)
    assert tracker.committable() == 10
    tracker.finish(10)
    assert tracker.committable() == 11


def test_nothing_to_commit_before_first_admit() -> None:
    tracker = PartitionTracker(epoch=1)
    assert tracker.committable() is None
    assert not tracker.needs_commit()


def test_needs_commit_only_when_watermark_moved() -> None:
    tracker = PartitionTracker(epoch=1)
    tracker.admit(0)
    tracker.finish(0)
    assert tracker.needs_commit()
    tracker.committed = tracker.committable()
    assert not tracker.needs_commit()


def test_offsets_must_be_admitted_in_order() -> None:
    tracker = PartitionTracker(epoch=1)
    tracker.admit(3)
    with pytest.raises(ValueError):
        tracker.admit(2)
