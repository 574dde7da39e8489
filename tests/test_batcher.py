"""The dynamic batcher: own rows back, queue limits, deadlines (expired requests not computed), groups, and
a batch that fails unexpectedly: its requests get the error, the worker goes on."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from attnrec.engine.batcher import Batcher, BatchSettings
from attnrec.engine.errors import BatchFailed, DeadlineExpired, QueueFull
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


def _misbehaving(group, items):
    """A run function with bugs on cue: b"raise" raises, b"short" answers fewer results than requests,
    b"escape" answers a BatchOutput the worker cannot book (stages None: the error is raised in the
    worker itself, outside the run function, which used to end the worker and strand the queue)."""
    if b"raise" in items:
        raise RuntimeError("a secret internal detail")
    if b"short" in items:
        return BatchOutput([], 0.0, 0.0, {})
    if b"escape" in items:
        return BatchOutput([x.upper() for x in items], 0.0, 0.0, None)
    return BatchOutput([x.upper() for x in items], 0.0, 0.0, {})


def test_a_failing_batch_fails_its_requests_in_words_and_the_worker_serves_the_next():
    from attnrec.engine.telemetry import Telemetry

    async def main():
        # telemetry on: the stage histograms are where a bad BatchOutput breaks the worker itself
        b = Batcher("m", _misbehaving, BatchSettings(max_batch_size=8), ThreadPoolExecutor(1), Telemetry())
        results = {}
        for item in (b"raise", b"ok1", b"short", b"ok2", b"escape", b"ok3"):
            try:
                results[item] = (await asyncio.wait_for(b.submit(item), 10)).value
            except Exception as exc:  # noqa: BLE001
                results[item] = exc
        # a batch of several requests that fails: each of them gets the error, none waits forever
        crowd = await asyncio.wait_for(
            asyncio.gather(*(b.submit(x) for x in (b"a", b"escape", b"c")), return_exceptions=True), 10
        )
        after = (await asyncio.wait_for(b.submit(b"ok4"), 10)).value
        await b.close()
        return results, crowd, after

    results, crowd, after = run(main())
    assert (results[b"ok1"], results[b"ok2"], results[b"ok3"], after) == (b"OK1", b"OK2", b"OK3", b"OK4")
    for item, kind in ((b"raise", "RuntimeError"), (b"short", "RuntimeError"), (b"escape", "AttributeError")):
        err = results[item]
        assert isinstance(err, BatchFailed) and err.code == grpc.StatusCode.INTERNAL
        assert str(err) == f"m: a batch of 1 request(s) failed ({kind}); the server logged why"
    assert all(isinstance(e, BatchFailed) for e in crowd)
    assert len({str(e) for e in crowd}) == 1 and "a batch of" in str(crowd[0])


def test_a_failing_batch_reaches_the_client_as_a_status_with_its_message():
    """Through a real grpc.aio server with the interceptors: INTERNAL with the batcher's words (never
    UNKNOWN, never the exception's own text), and the next call on the same batcher succeeds."""
    from attnrec.engine.interceptors import ErrorInterceptor
    from attnrec.engine.telemetry import Telemetry

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        batcher = Batcher("encoder", _misbehaving, BatchSettings(), ThreadPoolExecutor(1), Telemetry())

        async def unary(request: bytes, context) -> bytes:
            return (await batcher.submit(request)).value

        s = grpc.aio.server(interceptors=[ErrorInterceptor()])
        handlers = {"U": grpc.unary_unary_rpc_method_handler(unary)}
        s.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
        port = s.add_insecure_port("127.0.0.1:0")
        await s.start()
        return s, port, batcher

    s, port, batcher = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.T/U")
            for item, kind in ((b"escape", "AttributeError"), (b"raise", "RuntimeError")):
                with pytest.raises(grpc.RpcError) as err:
                    call(item, timeout=10)
                assert err.value.code() == grpc.StatusCode.INTERNAL
                assert err.value.details() == f"encoder: a batch of 1 request(s) failed ({kind}); the server logged why"
                assert call(b"next", timeout=10) == b"NEXT"
    finally:
        asyncio.run_coroutine_threadsafe(batcher.close(), loop).result(30)
        asyncio.run_coroutine_threadsafe(s.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


class ThreadRecorder:
    """Records which thread ran each batch, and takes `delay` seconds per batch."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.threads = delay, []

    def __call__(self, group, items):
        self.threads.append(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        return BatchOutput([x + 1 for x in items], 0.0, 0.0, {})


def _lone_requests(settings: BatchSettings, rec: ThreadRecorder, n: int = 6) -> tuple[list, int]:
    async def main():
        b = Batcher("m", rec, settings, ThreadPoolExecutor(1))
        out = [(await b.submit(i)).value for i in range(n)]  # one at a time: every batch a lone request
        await b.close()
        return out, threading.get_ident()

    return run(main())


def test_a_lone_short_request_runs_on_the_event_loop_thread_once_timed():
    """The thread-pool hand-off is skipped for a lone request once one-request batches are known to be
    short; the first one runs in the pool and is timed. The results are the same either way."""
    rec = ThreadRecorder()
    out, loop_thread = _lone_requests(BatchSettings(inline_max_us=1_000_000), rec)
    assert out == [1, 2, 3, 4, 5, 6]
    assert rec.threads[0] != loop_thread and rec.threads[1:] == [loop_thread] * 5


class SlowHandOff(ThreadPoolExecutor):
    """A pool whose hand-off takes `delay` seconds before the run starts (a loaded host's thread wake-up)."""

    def __init__(self, delay: float) -> None:
        super().__init__(1)
        self.delay = delay

    def submit(self, fn, *args, **kwargs):
        def late():
            time.sleep(self.delay)
            return fn(*args, **kwargs)

        return super().submit(late)


def test_the_inline_limit_judges_the_run_not_the_hand_off():
    """Runs of 3 ms under a 10 ms limit go inline even when the pool's hand-off adds 20 ms: timing the
    hand-off too (as the batcher once did) kept every lone request in the pool."""
    rec = ThreadRecorder(delay=0.003)

    async def main():
        b = Batcher("m", rec, BatchSettings(inline_max_us=10_000), SlowHandOff(0.02))
        for i in range(4):
            await b.submit(i)
        await b.close()
        return threading.get_ident()

    loop_thread = run(main())
    assert rec.threads[0] != loop_thread and rec.threads[1:] == [loop_thread] * 3


def test_compute_infer_is_the_run_not_the_hand_off():
    """Triton's compute_infer is the model's execution: a pool whose hand-off takes 30 ms before a 5 ms
    run charges the run (the hand-off counted there too once made compute look 7x slower)."""
    rec = ThreadRecorder(delay=0.005)

    async def main():
        b = Batcher("m", rec, BatchSettings(inline_max_us=0), SlowHandOff(0.03))
        stats = ModelStats(4)
        out = await b.submit(1, stats=stats)
        await b.close()
        return out, stats

    out, stats = run(main())
    assert out.value == 2
    assert 4_000_000 <= out.infer_ns < 25_000_000  # the 5 ms run, not the 35 ms in the pool
    assert sum(ns for _, ns in stats.batch_stats.values()) == out.infer_ns


def test_inline_off_slow_batches_and_overlapping_requests_use_the_pool():
    rec = ThreadRecorder()
    out, loop_thread = _lone_requests(BatchSettings(inline_max_us=0), rec)
    assert out == [1, 2, 3, 4, 5, 6] and loop_thread not in rec.threads
    slow = ThreadRecorder(delay=0.005)  # 5 ms a batch: over a 2 ms limit, so never inline
    _, loop_thread = _lone_requests(BatchSettings(inline_max_us=2000), slow, n=3)
    assert loop_thread not in slow.threads

    rec = ThreadRecorder(delay=0.002)

    async def overlapping():
        b = Batcher("m", rec, BatchSettings(max_batch_size=4, inline_max_us=1_000_000), ThreadPoolExecutor(1))
        await b.submit(0)  # timed in the pool: lone requests may now run inline ...
        for _ in range(5):  # ... but requests arriving together (batches of 4) mean load: the pool again
            await asyncio.gather(*(b.submit(i) for i in range(4)))
        rec.threads.clear()
        await b.submit(0)
        await b.close()
        return threading.get_ident()

    loop_thread = run(overlapping())
    assert rec.threads and loop_thread not in rec.threads
