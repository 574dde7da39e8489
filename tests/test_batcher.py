"""The dynamic batcher: own rows back, queue limits, deadlines (expired requests not computed), groups."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from attnrec.engine.batcher import Batcher, BatchSettings
from attnrec.engine.errors import DeadlineExpired, QueueFull
from attnrec.engine.model_stats import ModelStats
from attnrec.engine.pipeline import BatchOutput


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[tuple[object, list]] = []
        self.delay, self.gate = delay, threading.Event()
        self.gate.set()

    def __call__(self, group, items):
        self.gate.wait(10)
        time.sleep(self.delay)
        self.batches.append((group, list(items)))
        return BatchOutput([(group, x * 10) for x in items], 0.0, 0.0, {})


def run(coro):
    return asyncio.run(coro)


def test_requests_are_batched_and_get_their_own_results():
    rec = Recorder(delay=0.01)

    async def main():
        b = Batcher("m", rec, BatchSettings(max_batch_size=8), ThreadPoolExecutor(1))
        stats = ModelStats(8)
        out = await asyncio.gather(*(b.submit(i, group="v1", stats=stats) for i in range(40)))
        await b.close()
        return out, stats

    out, stats = run(main())
    assert [o.value for o in out] == [("v1", i * 10) for i in range(40)]
    assert max(len(items) for _, items in rec.batches) == 8 and len(rec.batches) < 40
    # the batcher counts executions and rows; requests are their models' to count (engine/models.py)
    assert stats.inference_count == 40 and stats.execution_count == len(rec.batches) and stats.success_count == 0
    assert stats.batch_stats.keys() == {len(items) for _, items in rec.batches}
    assert sum(c for c, _ in stats.batch_stats.values()) == len(rec.batches)
    assert len({o.batch for o in out}) == len(rec.batches)  # each result names its batch


def test_full_queue_is_refused_and_expired_requests_are_not_computed():
    rec = Recorder()
    rec.gate.clear()  # the first batch blocks until released

    async def main():
        b = Batcher("m", rec, BatchSettings(max_batch_size=1, max_queue_size=2), ThreadPoolExecutor(1))
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # taken by the worker, now blocked
        soon = asyncio.ensure_future(b.submit(1, deadline=time.monotonic() + 0.05))
        later = asyncio.ensure_future(b.submit(2))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue full"):
            await b.submit(3)
        with pytest.raises(DeadlineExpired):
            await b.submit(4, deadline=time.monotonic() - 1)
        await asyncio.sleep(0.1)  # request 1's deadline passes while it waits
        rec.gate.set()
        results = await asyncio.gather(first, soon, later, return_exceptions=True)
        await b.close()
        return results

    first, soon, later = run(main())
    assert first.value == (None, 0) and later.value == (None, 20)
    assert isinstance(soon, DeadlineExpired)
    assert [items for _, items in rec.batches] == [[0], [2]]  # 1, 3 and 4 were never computed


def test_batches_never_mix_groups():
    rec = Recorder(delay=0.005)

    async def main():
        b = Batcher("m", rec, BatchSettings(max_batch_size=64, max_queue_delay_us=20_000), ThreadPoolExecutor(1))
        out = await asyncio.gather(*(b.submit(i, group=("v1" if i < 10 else "v2")) for i in range(20)))
        await b.close()
        return out

    out = run(main())
    assert [o.value[0] for o in out] == ["v1"] * 10 + ["v2"] * 10
    assert all(len(items) <= 10 for _, items in rec.batches)
    assert len(rec.batches) == 2  # the queue delay gathered each group into one batch


def test_run_functions_times_are_accounted_and_observed():
    """compute_input/output are what the run function measured; compute_infer is the rest; the
    batch size, queue and stage times go straight to the Prometheus histograms."""
    from attnrec.engine.telemetry import Telemetry

    def run_batch(group, items):
        time.sleep(0.01)
        return BatchOutput(list(items), 0.001, 0.002, {"encoder": 0.004})

    telemetry = Telemetry()

    async def main():
        b = Batcher("m", run_batch, BatchSettings(max_batch_size=4), ThreadPoolExecutor(1), telemetry)
        stats = ModelStats(4)
        out = await asyncio.gather(*(b.submit(i, stats=stats) for i in range(8)))
        await b.close()
        return out, stats

    out, stats = run(main())
    assert [o.value for o in out] == list(range(8))
    n = stats.execution_count
    # every request carries its batch's phases: what the run function measured, and the rest
    assert all(o.input_ns == 1_000_000 and o.output_ns == 2_000_000 for o in out)
    assert all(o.infer_ns >= 7_000_000 for o in out)  # ≥ the 10 ms sleep less the input and output parts
    by_batch = {o.batch: o.infer_ns for o in out}
    assert len(by_batch) == n and sum(ns for _, ns in stats.batch_stats.values()) == sum(by_batch.values())
    sample = lambda name, **labels: telemetry.registry.get_sample_value(name, labels)  # noqa: E731
    assert sample("attnrec_batch_size_count", model="m") == n
    assert sample("attnrec_batch_size_sum", model="m") == 8
    assert sample("attnrec_stage_seconds_count", model="m", stage="queue") == 8
    assert sample("attnrec_stage_seconds_sum", model="m", stage="encoder") == pytest.approx(n * 0.004)
