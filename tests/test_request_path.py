"""One Recommend request, traced through the real server: from the servicer's gRPC method to
onnxruntime's `InferenceSession.run` it crosses at most four hand-written files and never goes back
into a file it has left.

Beside that main line, the request's own task calls (and returns from) the online state: the
history store read and the filter mask (ONLINE_STATE below); nothing of it runs in the batcher
or the compute thread.

A profile hook in every server thread records each call into attnrec's hand-written code (not the
generated stubs under engine/rpc/) with the attnrec frames above it. A request runs in three
places: its own task (servicer → facade → batcher queue), the batcher's worker task (which hands
the batch to the executor) and an executor thread (the pipeline's run function, down to the
sessions) — or, for a lone request at light load (`--inline-max-us`), the worker task calls the
run function itself, on the loop's thread; the compute part is the same chain from that function
down. The path is those three call chains joined where the request is handed over.

Run `pytest -s tests/test_request_path.py` to see the trace printed.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from serving import RunningServer, settings

import attnrec
from attnrec.engine.client import RecommenderClient

ROOT = Path(attnrec.__file__).resolve().parent.parent  # the repository (an editable install)
HAND_WRITTEN = [ROOT / d for d in ("attnrec", "engine", "export", "benchmarks")]
GENERATED = ROOT / "engine" / "rpc"
SERVICER = "engine/recommender_servicer.py"
# Users' stored histories, availability and business filters: read in the request's task, off the main line.
ONLINE_STATE = {
    "engine/online_state.py",
    "engine/history_store.py",
    "engine/history_sqlite.py",
    "engine/history_redis.py",
    "engine/item_filter.py",
}


def _ours(filename: str) -> str | None:
    """The repository-relative path of a hand-written attnrec file, else None."""
    path = Path(filename)
    if not path.is_absolute() or GENERATED in path.parents:
        return None
    return path.relative_to(ROOT).as_posix() if any(d in path.parents for d in HAND_WRITTEN) else None


class Recorder:
    """Profile hook: every call into hand-written code, as its chain of (file, function) frames."""

    def __init__(self) -> None:
        self.on = False
        self.chains: list[tuple[str, list[tuple[str, str]]]] = []  # (thread name, outermost frame first)
        self.session_runs: list[list[tuple[str, str]]] = []  # the chain above each InferenceSession.run
        self.lock = threading.Lock()

    def __call__(self, frame, event, arg) -> None:
        if not self.on or event != "call":
            return
        code = frame.f_code
        is_run = code.co_name == "run" and code.co_filename.endswith("onnxruntime_inference_collection.py")
        if not is_run and _ours(code.co_filename) is None:
            return
        chain, f = [], frame if not is_run else frame.f_back
        while f is not None:
            name = _ours(f.f_code.co_filename)
            if name is not None:
                chain.append((name, f.f_code.co_qualname))
            f = f.f_back
        chain.reverse()
        with self.lock:
            (self.session_runs if is_run else self.chains).append((threading.current_thread().name, chain))


def _collapse(files: list[str]) -> list[str]:
    """Consecutive frames of one file are one visit."""
    return [f for i, f in enumerate(files) if i == 0 or f != files[i - 1]]


def _segment(chain: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """Which part of the request a call chain belongs to, and the chain from that part's entry on."""
    files = [f for f, _ in chain]
    if SERVICER in files:  # the request's own task, from the servicer method down
        return "request", chain[files.index(SERVICER) :]
    for i, (f, fn) in enumerate(chain):  # in an executor thread, or inline in the worker (--inline-max-us)
        if f == "engine/pipeline.py" and fn.startswith("run_"):
            return "compute", chain[i:]
    if chain and chain[0] == ("engine/batcher.py", "Batcher._work"):
        return "worker", chain
    if chain and chain[0][0] == "engine/pipeline.py" and chain[0][1].startswith("run_"):
        return "compute", chain
    return "outside", chain  # e.g. the request's decoding, the interceptors around the servicer method


def _first_seen(chains: list[list[tuple[str, str]]]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for chain in chains:
        for frame in chain:
            seen.setdefault(frame, None)
    return list(seen)


def test_one_recommend_crosses_at_most_four_files_and_never_goes_back(trained_repo):
    _, repo = trained_repo
    rec = Recorder()
    threading.setprofile(rec)  # the server's loop and executor threads start after this
    try:
        with RunningServer(settings(repo, address="127.0.0.1")) as s:
            ids = s.server.models.slot.current.compute.item_ids.astype(str)
            with RecommenderClient(f"127.0.0.1:{s.port}") as client:
                client.recommend(ids[[3, 50, 7]].tolist(), 5)  # a warm call first: lazy set-up stays out
                rec.on = True
                answer = client.recommend(ids[[3, 50, 7]].tolist(), 5)
                rec.on = False
    finally:
        threading.setprofile(None)
    assert len(answer.items) == 5

    parts: dict[str, list[list[tuple[str, str]]]] = {"request": [], "worker": [], "compute": [], "outside": []}
    for _, chain in rec.chains:
        part, chain = _segment(chain)
        parts[part].append(chain)
        if part != "outside":  # along every call stack, no file entered again after leaving it
            visits = _collapse([f for f, _ in chain])
            assert len(visits) == len(set(visits)), f"a file is re-entered: {' → '.join(visits)}"
    assert parts["request"] and parts["worker"] and parts["compute"], sorted(k for k, v in parts.items() if v)
    # outside the path: the request's decoding (engine/decoding.py) and the interceptors around the servicer
    assert {f for chain in parts["outside"] for f, _ in chain} <= {"engine/interceptors.py", "engine/decoding.py"}

    # InferenceSession.run is called from the pipeline's run function, with nothing else in between
    runs = [(thread, _segment(chain)[1]) for thread, chain in rec.session_runs if chain]
    assert runs and all(_collapse([f for f, _ in chain]) == ["engine/pipeline.py"] for _, chain in runs)

    # joined where the request is handed over: its task queues it in the batcher, whose worker runs it
    # in the executor; no part reaches into another's files except through that hand-over
    files = {part: {f for chain in chains for f, _ in chain} for part, chains in parts.items()}
    # the worker also books the batch in the per-model statistics (engine/model_stats.py: Triton's
    # exec counts and compute times), a side call it returns from, like the request's online state
    assert "engine/batcher.py" in files["worker"] and files["worker"] <= {"engine/batcher.py", "engine/model_stats.py"}
    assert not files["request"] & files["compute"] and "engine/batcher.py" not in files["compute"]
    # the main line: the request's stack when it is queued, the worker's, the stack above each session run
    submit = [c for c in parts["request"] if c[-1] == ("engine/batcher.py", "Batcher.submit")]
    assert submit, "the request never reached the batcher"
    deepest = {"request": submit[0], "worker": [("engine/batcher.py", "Batcher._work")], "compute": runs[0][1]}
    path = _collapse([f for part in ("request", "worker", "compute") for f, _ in deepest[part]])
    lines = []
    for part in ("request", "worker", "compute"):
        lines += [f"{part:8} {f:32} {fn}" for f, fn in deepest[part]]
        others = [fn for f, fn in _first_seen(parts[part]) if (f, fn) not in deepest[part]]
        lines += [f"{'':8} {'(also called, and returned)':32} {', '.join(others)}"] if others else []
    lines.append(f"{'compute':8} {'(onnxruntime)':32} InferenceSession.run ×{len(runs)}")
    print("\nOne Recommend request, servicer method → InferenceSession.run:\n  " + "\n  ".join(lines), file=sys.stderr)
    print(f"files: {' → '.join(path)}", file=sys.stderr)
    assert path[0] == SERVICER and path[-1] == "engine/pipeline.py"
    assert len(path) == len(set(path)) <= 4, path
    assert not (files["worker"] | files["compute"]) & ONLINE_STATE
    # side calls that return, off the main line: the request and the worker book per-model statistics
    # (engine/model_stats.py), the compute thread asks the ranker module for its inputs' defaults
    # (engine/ranker.py) and the re-rank module whether to re-rank (engine/rerank.py)
    side = {"engine/model_stats.py", "engine/ranker.py", "engine/rerank.py"}
    assert ((files["request"] - ONLINE_STATE) | files["worker"] | files["compute"]) - side == set(path)
