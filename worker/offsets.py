"""Per-partition offset watermark: which offset may be committed while work finishes out of order.

Pure bookkeeping, no I/O. The consumer admits offsets in the order Kafka delivers them (increasing within
a partition, possibly with gaps: compaction and transaction markers skip offsets). Work on them finishes in
any order. The committable offset is the *lowest admitted offset that is not finished*; when everything
admitted is finished it is one past the highest admitted offset. Committing that value means: after a
crash, redelivery restarts at the first unfinished request, so nothing unfinished is lost, and only
requests that finished above the gap are redone (idempotency makes those cheap).

Data structure: `_pending` is a deque of admitted-but-not-yet-retired offsets in admission order, and
`_finished` the subset of them that completed. Retiring pops finished offsets off the front, so each offset
is pushed and popped once: O(1) amortized per message, memory bounded by the in-flight window plus the
finished offsets stuck behind a slow one (`span`, which the consumer caps per partition).

`epoch` identifies one ownership period of the partition. After a revocation the tracker is dropped; a
task that still completes for an old epoch must not touch the new tracker (its offset may be redone by the
new owner, so marking it finished here would be wrong).
"""

from __future__ import annotations

from collections import deque


class PartitionTracker:
    __slots__ = ("_finished", "_next", "_pending", "committed", "epoch")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.committed: int | None = None
        self._pending: deque[int] = deque()
        self._finished: set[int] = set()
        self._next: int | None = None

    def admit(self, offset: int) -> None:
        """Record that work for `offset` started. Offsets must arrive in increasing order."""
        if self._next is not None and offset < self._next:
            raise ValueError(f"offset {offset} admitted after {self._next - 1}")
        self._pending.append(offset)
        self._next = offset + 1

    def finish(self, offset: int) -> None:
        """Record that `offset` reached its terminal state (its events are acknowledged by Kafka)."""
        self._finished.add(offset)
        pending, finished = self._pending, self._finished
        while pending and pending[0] in finished:
            finished.discard(pending.popleft())

    def committable(self) -> int | None:
        """Offset to commit: lowest unfinished, else one past the highest admitted; None before any admit."""
        if self._pending:
            return self._pending[0]
        return self._next

    def needs_commit(self) -> bool:
        target = self.committable()
        return target is not None and target != self.committed

    @property
    def span(self) -> int:
        """Offsets admitted at or past the committable one: the unfinished ones and those finished behind
        the lowest of them (each redone after a crash)."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Offsets admitted and not finished."""
        return len(self._pending) - len(self._finished)
