"""Tallies: counted as plain numbers on the hot path, the same exposition as the metric's own calls."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from worker import metrics


def _exposed(registry: CollectorRegistry) -> list[str]:
    """The exposition without the `_created` samples (when each child was made)."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_tallies_expose_what_the_metrics_own_calls_would() -> None:
    tallied, direct = CollectorRegistry(), CollectorRegistry()
    counts = [Counter("c_total", "c", ["k"], registry=r) for r in (tallied, direct)]
    buckets = (0.25, 0.5, 1, 5)  # values in 64ths: sums exact in any order
    hists = [Histogram("h_seconds", "h", ["k"], buckets=buckets, registry=r) for r in (tallied, direct)]
    plain = [Histogram("p", "p", buckets=(0, 1, 2, 3), registry=r) for r in (tallied, direct)]
    rng = random.Random(7)
    for round_ in range(3):
        for _ in range(500):
            k = rng.choice("ab")
            # Values on the bounds too: a bucket takes amount <= its bound.
            v = rng.choice([*buckets, 0.0, rng.randint(0, 6 * 64) / 64, rng.randint(0, 8) / 64])
            metrics.labelled(counts[0], k).inc(2)
            counts[1].labels(k).inc(2)
            metrics.labelled(hists[0], k).observe(v)
            hists[1].labels(k).observe(v)
            n = rng.randint(0, 4)
            metrics.labelled(plain[0]).observe(n)
            plain[1].observe(n)
        if round_ == 0:
            assert _exposed(tallied) != _exposed(direct)  # not yet flushed
        metrics.flush()
        assert _exposed(tallied) == _exposed(direct)


def test_a_nan_observation_is_exposed_as_the_histograms_own_observe_would() -> None:
    tallied, direct = CollectorRegistry(), CollectorRegistry()
    hists = [Histogram("n_seconds", "n", buckets=(1, 2), registry=r) for r in (tallied, direct)]
    for values in ([float("nan")], [1.5, 0.5]):
        for v in values:
            metrics.labelled(hists[0]).observe(v)
            hists[1].observe(v)
        metrics.flush()
        assert _exposed(tallied) == _exposed(direct)
    assert 'n_seconds_bucket{le="1.0"} 1.0' in _exposed(tallied)


def test_labelled_returns_one_tally_per_child() -> None:
    c = Counter("once_total", "c", ["k"], registry=CollectorRegistry())
    assert metrics.labelled(c, "x") is metrics.labelled(c, "x")
    assert metrics.labelled(c, "x") is not metrics.labelled(c, "y")


def test_misuse_is_refused_where_it_happens_not_when_metrics_are_served() -> None:
    c = Counter("misuse_total", "c", ["k"], registry=CollectorRegistry())
    with pytest.raises(ValueError):
        metrics.labelled(c)  # a labelled metric without its label values
    with pytest.raises(ValueError):
        metrics.labelled(c, "x").inc(-1)


def test_models_named_by_requests_do_not_grow_the_unpriced_metric_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import orchestrate

    monkeypatch.setattr(orchestrate, "_unpriced", set())  # not what earlier tests labelled
    limit = orchestrate.MAX_UNPRICED_LABELS
    labels = [orchestrate._unpriced_label(f"made-up-{i}") for i in range(3 * limit)]
    assert labels[:limit] == [f"made-up-{i}" for i in range(limit)]  # the first ones keep their names
    assert set(labels[limit:]) == {"other"}
    assert orchestrate._unpriced_label("made-up-0") == "made-up-0"  # and keep them
