"""console/rates.py and console/charts.py: counters flushed into buckets, series, SVG."""

from __future__ import annotations

from datetime import timedelta

import pytest

from console import charts, rates
from console.models import RateSample
from messaging import broker, clock, metrics

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_counters")]


def test_flush__adds_counts_per_scope_and_bucket(queue_factory, publish, django_capture_on_commit_callbacks):
    q = queue_factory()
    with django_capture_on_commit_callbacks(execute=True):
        publish(q, "a", "b")
    assert rates.flush() == 2  # the queue and the broker
    with django_capture_on_commit_callbacks(execute=True):
        publish(q, "c")
        broker.receive(queue=q, max_messages=3)
    rates.flush()
    row = RateSample.objects.get(scope=f"queue:{q.pk}")
    assert (row.published, row.delivered, row.acked) == (3, 3, 0)
    assert RateSample.objects.get(scope="broker").published == 3
    assert rates.flush() == 0  # nothing new


def test_flush__failure_keeps_the_counts(monkeypatch):
    metrics.restore({(metrics.PUBLISHED, metrics.BROKER): 5})

    def broken(*args, **kwargs):
        raise RuntimeError("database down")

    monkeypatch.setattr(rates, "_add", broken)
    with pytest.raises(RuntimeError):
        rates.flush()
    monkeypatch.undo()
    rates.flush()
    assert RateSample.objects.get(scope="broker").published == 5


def test_series__window_and_per_second():
    now = rates.bucket_start(clock.now())
    for age in (0, 1, 2, 7, 60, 200):  # buckets ago
        RateSample.objects.create(scope="broker", bucket=now - timedelta(seconds=10 * age), published=60, acked=age)
    s = rates.series()["broker"]
    assert len(s.published) == rates.WINDOW_BUCKETS and s.published[-1] == 60
    assert sum(s.published) == 60 * 4  # 60 and 200 buckets ago are outside the 10 minutes
    # The last minute: 6 complete buckets (two hold 60) and the current one so far (60).
    assert 0 <= s.elapsed < rates.BUCKET_SECONDS
    assert s.per_second("published") == pytest.approx(180 / (60 + max(s.elapsed, 1.0)))
    assert s.per_second("delivered") == 0


def test_flush__prunes_old_buckets():
    old = rates.bucket_start(clock.now()) - rates.RETENTION - timedelta(minutes=1)
    RateSample.objects.create(scope="broker", bucket=old, published=1)
    metrics.restore({(metrics.ACKED, metrics.BROKER): 1})
    rates.flush()
    assert list(RateSample.objects.values_list("acked", flat=True)) == [1]


def test_bucket_start__aligned():
    moment = clock.now()
    start = rates.bucket_start(moment)
    assert start <= moment < start + timedelta(seconds=rates.BUCKET_SECONDS)
    assert int(start.timestamp()) % rates.BUCKET_SECONDS == 0


def test_charts__only_numbers_in_the_markup():
    s = rates.empty_series()
    s.published[-1] = 30
    svg = str(charts.sparkline(s, label='<script>alert(1)</script>"'))
    assert svg.startswith("<svg") and "<script>" not in svg and "&lt;script&gt;" in svg
    assert svg.count("<polyline") == 3
    big = str(charts.broker_chart(s))
    assert ">3/s<" in big and "-10 min" in big
