"""The benchmark suite: its --quick code paths on tiny sizes produce consistent reports (not timings)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attnrec.benchmarks import stages
from attnrec.benchmarks.timing import Method, aggregate, measure, run_window, summarize

ROOT = Path(__file__).resolve().parents[1]
DATE = "2000-01-01"
FAST = ["--tiny", "--duration", "0.03", "--warmup", "0.01", "--repeats", "2", "--date", DATE]


@pytest.fixture(scope="module")
def gpu_script_cpu_run(tmp_path_factory):
    """benchmarks/gpu.sh on the CPU path: provider check, then the model and retrieval stages (tiny)."""
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    # the e2e stage (also in gpu.sh's default) has its own tests: tests/test_bench_e2e.py
    cmd = [
        "bash",
        str(ROOT / "benchmarks" / "gpu.sh"),
        "run",
        "--provider",
        "cpu",
        "--stages",
        "model,retrieval",
        *FAST,
    ]
    cmd += ["--out", str(out / "results"), "--work-dir", str(out / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "results", proc.stderr


def _load(results: Path, stage: str) -> dict:
    return json.loads((results / f"bench-{stage}-{DATE}.json").read_text())


def test_report_files_machine_info_and_progress(gpu_script_cpu_run):
    results, log = gpu_script_cpu_run
    for stage in ("provider", "model", "retrieval"):
        report = _load(results, stage)
        assert report["stage"] == stage
        m = report["machine"]
        assert m["cores_usable"] >= 1 and m["cpu"]
        assert "onnxruntime" in m["libraries"] and "CPUExecutionProvider" in m["onnxruntime_providers"]
        assert report["settings"]["provider"] == "cpu" and report["settings"]["method"]["repeats"] == 2
        md = (results / f"bench-{stage}-{DATE}.md").read_text()
        assert md.startswith("# ") and "| --- |" not in md and "|---|" in md
    for stage in ("model", "retrieval"):
        png = results / f"bench-{stage}-{DATE}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{stage}](bench-{stage}-{DATE}.png)" in (results / f"bench-{stage}-{DATE}.md").read_text()
    assert "[10/10]" in log and "wrote" in log  # progress lines


def _check_point(p: dict, method_repeats: int) -> None:
    assert len(p["repeats"]) == method_repeats
    for r in p["repeats"]:
        assert r["calls"] >= 3  # min_calls
        assert r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["calls_per_s"] == pytest.approx(r["calls"] / r["wall_s"])
    for key in ("p50_ms", "p99_ms", "items_per_s", "calls"):
        lo, hi = p[f"{key}_spread"]
        assert lo <= p[key] <= hi
        assert p[key] == pytest.approx(float(np.median([r[key] for r in p["repeats"]])))


def test_model_stage_numbers_are_consistent(gpu_script_cpu_run):
    results, _ = gpu_script_cpu_run
    report = _load(results, "model")
    data = report["data"]
    assert data["encoder_parity_max_abs_diff"] < 1e-4
    points = data["points"]
    grid = {(p["model"], p["engine"], p["batch"], p["length"]) for p in points}
    # every grid point for both engines: encoder (1, 4) × (5, 20), ranker 2 × 10
    for engine in ("torch", "onnxruntime"):
        assert {(b, L) for m, e, b, L in grid if m == "encoder" and e == engine} == {(1, 5), (4, 5), (1, 20), (4, 20)}
        assert {(b, L) for m, e, b, L in grid if m == "ranker" and e == engine} == {(2, 10)}
    roof = data["roofline"]["gflops"]
    assert roof > 0
    for p in points:
        _check_point(p, 2)
        for r in p["repeats"]:
            assert r["items_per_s"] == pytest.approx(r["calls_per_s"] * p["batch"])
        assert p["gflops"] == pytest.approx(p["gflop_per_call"] * p["calls_per_s"])
        assert p["roofline_fraction"] == pytest.approx(p["gflops"] / roof)
    table = report["tables"][0]
    calls = table["columns"].index("calls")
    assert [row[calls] for row in table["rows"]] == [sum(r["calls"] for r in p["repeats"]) for p in points]


def test_retrieval_stage_numbers_are_consistent(gpu_script_cpu_run):
    results, _ = gpu_script_cpu_run
    data = _load(results, "retrieval")["data"]
    points = data["points"]
    assert {p["family"] for p in points} == {"exact", "IVF", "HNSW"}
    for p in points:
        assert 0.0 <= p["recall"] <= 1.0
        assert p["build_s"] >= 0 and p["index_bytes"] > 0
        _check_point(p["single"], 2)
        _check_point(p["batched"], 2)
        for r in p["batched"]["repeats"]:
            assert r["items_per_s"] == pytest.approx(r["calls_per_s"] * data["batch"])
    exact = [p for p in points if p["family"] == "exact"]
    assert [p["recall"] for p in exact] == [1.0]
    assert exact[0]["index_bytes"] >= exact[0]["n"] * exact[0]["dim"] * 4
    ivf = [p["recall"] for p in points if p["family"] == "IVF"]
    assert ivf == sorted(ivf)  # more lists probed never finds fewer of the exact top-N


def test_provider_check_reports_node_placement(gpu_script_cpu_run):
    results, _ = gpu_script_cpu_run
    placement = _load(results, "provider")["data"]["placement"]
    for model in ("encoder", "ranker (synthetic)"):
        assert placement[model]["session_providers"] == ["CPUExecutionProvider"]
        assert placement[model]["by_provider"]["CPUExecutionProvider"]["ops"].get("MatMul", 0) > 0
    assert not list(ROOT.glob("onnxruntime_profile_*.json"))  # profiles go to a temporary folder


def test_the_gpu_run_includes_the_served_path():
    from attnrec.benchmarks.gpu import DEFAULT_STAGES

    assert DEFAULT_STAGES.split(",") == ["model", "retrieval", "e2e"]


def test_provider_check_catches_a_cpu_fallback():
    from attnrec.benchmarks.gpu import ProviderFallback, check_placement

    cuda = "CUDAExecutionProvider"
    ok = {
        "session_providers": [cuda, "CPUExecutionProvider"],
        "by_provider": {cuda: {"ops": {"MatMul": 6}}, "CPUExecutionProvider": {"ops": {"Shape": 1}}},
    }
    check_placement("enc", ok, cuda)
    fallback = {"session_providers": ["CPUExecutionProvider"], "by_provider": ok["by_provider"]}
    with pytest.raises(ProviderFallback, match="session providers"):
        check_placement("enc", fallback, cuda)
    split = {**ok, "by_provider": {**ok["by_provider"], "CPUExecutionProvider": {"ops": {"MatMul": 1}}}}
    with pytest.raises(ProviderFallback, match="matrix products ran on"):
        check_placement("enc", split, cuda)
    idle = {**ok, "by_provider": {cuda: {"ops": {"Shape": 1}}}}
    with pytest.raises(ProviderFallback, match="no matrix product"):
        check_placement("enc", idle, cuda)


def test_attnrec_bench_subcommand_writes_the_selected_stage(tmp_path):
    from attnrec.cli import main

    args = ["-q", "bench", "--stages", "retrieval", *FAST, "--out", str(tmp_path), "--work-dir", str(tmp_path)]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.glob("bench-*")) == [
        f"bench-retrieval-{DATE}.{ext}" for ext in ("json", "md", "png")
    ]


def test_stages_on_a_repository_version(tmp_path, trained_repo):
    """--model: the version's encoder in the model stage, its trained embeddings in the retrieval stage."""
    from attnrec.benchmarks.cli import main

    _, repo = trained_repo
    version = repo / "seq" / "1"
    args = ["--stages", "model,retrieval", *FAST, "--model", str(version), "--out", str(tmp_path)]
    assert main([*args, "--work-dir", str(tmp_path / "work")]) == 0
    model = json.loads((tmp_path / f"bench-model-{DATE}.json").read_text())["data"]
    assert model["encoder_config"]["max_len"] == 16 and str(version) in model["source"]
    assert {p["length"] for p in model["points"] if p["model"] == "encoder"} == {5}  # 20 > max_len is skipped
    retrieval = json.loads((tmp_path / f"bench-retrieval-{DATE}.json").read_text())["data"]
    trained = [p for p in retrieval["points"] if p["data"].startswith("trained")]
    items = np.load(version / "item_embeddings.npy")
    assert trained and {(p["n"], p["dim"]) for p in trained} == {items.shape}
    assert [p["recall"] for p in trained if p["family"] == "exact"] == [1.0]


def test_unknown_stage_fails_before_any_work(tmp_path):
    from attnrec.benchmarks.cli import main

    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        main(["--stages", "model,nope", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_stages_are_discovered_in_order():
    names = stages.available()
    assert names[:2] == ["model", "retrieval"]
    assert stages.load("model").TITLE


def test_timing_percentiles_and_repeats_are_exact():
    seconds = np.arange(1, 101, dtype=np.float64) / 1000  # 1..100 ms
    s = summarize(seconds, items_per_call=4)
    assert s["calls"] == 100 and s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    assert s["items_per_s"] == pytest.approx(400 / seconds.sum())
    agg = aggregate([{"p50_ms": 3.0}, {"p50_ms": 1.0}, {"p50_ms": 2.0}])
    assert agg["p50_ms"] == 2.0 and agg["p50_ms_spread"] == [1.0, 3.0]
    calls = []
    assert len(run_window(lambda: calls.append(1), duration_s=0.0, warmup_s=0.0, min_calls=7)) == 7
    assert len(calls) == 8  # one warm-up call, then the window
    p = measure(lambda: None, Method(duration_s=0.01, warmup_s=0.0, repeats=3))
    assert len(p["repeats"]) == 3 and p["calls_spread"][0] <= p["calls"] <= p["calls_spread"][1]
    # paced: an idle gap after every call, left out of the call's time
    starts = []
    times = run_window(lambda: starts.append(time.perf_counter()), 0.0, 0.0, min_calls=5, gap_s=0.02)
    assert len(times) == 5 and np.diff(starts).min() >= 0.02 and times.max() < 0.01


def test_analytic_flops_match_torchs_flop_counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from attnrec.benchmarks.flops import sasrec_flops, target_attention_flops
    from attnrec.benchmarks.synthetic_ranker import TargetAttentionRanker
    from attnrec.export.config import SASRecConfig
    from attnrec.export.model import SASRec

    cfg = SASRecConfig(n_items=100, max_len=20, dim=16, n_blocks=3, n_heads=2, ffn_dim=24)
    model = SASRec(cfg).eval()
    tokens = torch.randint(1, 101, (3, 12))
    for hidden in (False, True):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            (model.hidden if hidden else model)(tokens)
        assert counter.get_total_flops() == sasrec_flops(3, 12, hidden=hidden, **cfg.to_dict())
    ranker = TargetAttentionRanker(100, 16, 20, mlp_dim=8).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ranker(tokens, torch.randint(1, 101, (3, 7)), torch.rand(3, 7))
    assert counter.get_total_flops() == target_attention_flops(3, 12, 7, dim=16, mlp_dim=8)


def test_synthetic_ranker_follows_the_onnx_ranker_contract(tmp_path):
    import torch

    from attnrec.benchmarks.synthetic_ranker import TargetAttentionRanker, export_ranker
    from attnrec.engine.pipeline import score
    from attnrec.engine.ranker import OnnxRanker

    torch.manual_seed(0)
    model = TargetAttentionRanker(50, 8, 16).eval()
    ranker = OnnxRanker(export_ranker(model, tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        "history": np.pad(rng.integers(1, 51, (2, 6)), ((0, 0), (3, 0))),  # left-padded, length 9
        "candidates": rng.integers(1, 51, (2, 11)),
        "candidate_scores": rng.standard_normal((2, 11)).astype(np.float32),
        "hidden": np.zeros((2, 9, 8), np.float32),  # not read by this graph: the contract allows extras
    }
    got = score(ranker, feeds)
    with torch.no_grad():
        want = model(*(torch.from_numpy(feeds[k]) for k in ("history", "candidates", "candidate_scores"))).numpy()
    assert got.shape == (2, 11) and np.abs(got - want).max() < 1e-5


def test_mlserver_model_folder(tmp_path):
    from attnrec.benchmarks.peer.mlserver import MLServerConfig, write_model_folder

    onnx = tmp_path / "enc.onnx"
    onnx.write_bytes(b"")
    root = write_model_folder(
        tmp_path / "m", onnx, MLServerConfig(max_batch_size=16), {"http": 1, "grpc": 2, "metrics": 3}
    )
    server = json.loads((root / "settings.json").read_text())
    model = json.loads((root / "encoder" / "model-settings.json").read_text())
    assert (server["http_port"], server["grpc_port"], server["metrics_port"]) == (1, 2, 3)
    assert model["max_batch_size"] == 16 and model["max_batch_time"] == 0.002
    assert model["implementation"] == "mlserver_runtime.OnnxEncoderRuntime"
    assert model["parameters"]["uri"] == str(onnx.resolve())
    assert (root / "encoder" / "mlserver_runtime.py").is_file()


MLSERVER_VENV = ROOT / ".cache" / "mlserver-1.7.1"


@pytest.mark.skipif(
    not (MLSERVER_VENV / ".attnrec-ready").is_file(),
    reason="MLServer's own environment is absent (creating it needs the package index and about a minute): "
    "python -m attnrec.benchmarks.peer.mlserver --setup",
)
def test_mlserver_answers_v2_modelinfer_like_onnxruntime(tmp_path, tiny_model):
    from attnrec.benchmarks.peer.mlserver import MLServerConfig, check
    from attnrec.export.onnx_export import export_encoder

    onnx = export_encoder(tiny_model, tmp_path / "encoder.onnx")
    cfg = MLServerConfig(intra_op_threads=1)
    n, length = tiny_model.cfg.n_items, tiny_model.cfg.max_len
    assert check(onnx, cfg, venv=MLSERVER_VENV, n_items=n, length=length, log=lambda _: None) <= 1e-5


def test_a_failing_stage_keeps_its_rows_and_error_and_the_suite_goes_on(tmp_path, monkeypatch):
    from attnrec.benchmarks import cli, stages

    class Failing:  # measures one row, then its peer goes away
        TITLE = "A stage that fails half way"

        @staticmethod
        def run(settings, section):
            row = {"server": "peer", "load": "c=1", "p50_ms": 1.5, "p99_ms": 3.0, "throughput_rps": 10.0}
            section.data.setdefault("points", []).append(row)
            raise RuntimeError("the peer went away")

    real = stages.load
    monkeypatch.setattr(stages, "load", lambda name: Failing if name == "failing" else real(name))
    args = ["--stages", "failing,retrieval", *FAST, "--out", str(tmp_path), "--work-dir", str(tmp_path)]
    assert cli.main(args) == 1  # failed, said so, and still wrote every stage
    report = json.loads((tmp_path / f"bench-failing-{DATE}.json").read_text())
    error = report["data"]["error"]
    assert error["type"] == "RuntimeError" and error["message"] == "the peer went away"
    assert any("the peer went away" in line for line in error["traceback"])
    assert report["tables"][0]["rows"] == [["peer", "c=1", 1.5, 3.0, 10.0]]
    assert "STAGE FAILED" in (tmp_path / f"bench-failing-{DATE}.md").read_text()
    assert _load(tmp_path, "retrieval")["data"]["points"]  # the next stage ran in full


def test_a_peer_environment_is_marked_ready_only_after_its_installs(tmp_path):
    """benchmarks/peer/venv.py: what was there is replaced; a failing install leaves no ready mark."""
    import subprocess as sp

    from attnrec.benchmarks.peer.venv import READY_MARK, create_venv

    venv = tmp_path / "env"
    venv.mkdir()
    (venv / "stale").write_text("x")
    create_venv(venv, [["--no-index", "pip"]], {"peer": "test"})  # already satisfied: no download
    assert json.loads((venv / READY_MARK).read_text()) == {"peer": "test"}
    assert (venv / "bin" / "python").is_file() and not (venv / "stale").exists()
    with pytest.raises(sp.CalledProcessError):
        create_venv(venv, [["--no-such-pip-flag"]], {"peer": "test"})
    assert not (venv / READY_MARK).exists()
