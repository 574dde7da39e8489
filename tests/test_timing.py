"""engine/timing.py: the one median timer of export's reports and the quick timing tools."""

from attnrec.engine import timing


def test_median_ms_times_only_the_recorded_calls(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    durations = iter([0.5, 0.5, 0.003, 0.001, 0.002])  # two warm-up calls (slow), then three recorded

    def call():
        now[0] += next(durations)

    assert abs(timing.median_ms(call, 3, warmup=2) - 2.0) < 1e-9
    assert next(durations, None) is None  # exactly warmup + repeats calls
