"""The Ray Serve peer's deployment and driver: attnrec's `Pipeline` behind Ray Serve's gRPC proxy.

This file runs inside Ray Serve's own virtual environment (benchmarks/peer/rayserve.py creates it
and starts this file as a script); the project's environment never imports it. It is what a user
moving the model onto Ray Serve would write: load the published version with
`attnrec.engine.pipeline.Pipeline.load`, map external ids to rows, and answer
`attnrec.v1.Recommender/Recommend` from a `@serve.batch` method (max batch 32), through Ray
Serve's own gRPC proxy with our generated servicer (`grpc_servicer_functions`). The proxy calls
the deployment method named like the gRPC method (`Recommend`) with the RecommendRequest and sends
back the RecommendReply it returns.

    python rayserve_app.py --version-dir DIR --grpc-port P --http-port H --temp-dir /tmp/rayXXXX

It prints one line `READY <grpc port>` once `serve.run` has the application running, and shuts
Serve and Ray down on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

# A loaded host starts Ray's Python agents slowly: its raylet's wait for the dashboard agent's port
# (it gave up after about 20 s on a loaded 2-core host) must not end the start. Set before Ray
# starts its processes, which inherit them.
os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
# Serve's controller kills a proxy not ready in 5 s (three times over): its start imports uvicorn,
# starlette and grpc, which takes longer than that on a loaded host.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import HTTPOptions, gRPCOptions  # noqa: E402

from attnrec.benchmarks.peer import rayserve_grpc  # noqa: E402, F401 - the messages' pickle alias
from attnrec.engine.pipeline import Pipeline, RuntimeOptions  # noqa: E402
from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as pb  # noqa: E402

APP = "attnrec"
# Our generated servicer function, through a module that makes its messages picklable between Ray's
# processes (see there).
SERVICER = "attnrec.benchmarks.peer.rayserve_grpc.add_RecommenderServicer_to_server"
DEFAULT_K = 10  # as attnrec serve: proto3 cannot tell k=0 from unset


class RecommenderDeployment:
    """One replica: the version's Pipeline and id maps; `Recommend` batched by Ray Serve."""

    def __init__(self, version_dir: str, intra_op_threads: int, max_batch_size: int, batch_wait_s: float) -> None:
        import attnrec.benchmarks.peer.rayserve_grpc  # noqa: F401 - this replica's process needs the alias too

        # attnrec serve's defaults (--ort-spinning off): spinning onnxruntime threads would take the
        # cores Ray's own processes need on a small host
        options = RuntimeOptions(
            ("CPUExecutionProvider",), intra_op_threads=intra_op_threads, faiss_gpu=False, allow_spinning=False
        )
        self.pipeline = Pipeline.load(version_dir, options)
        self.keys = [str(x) for x in self.pipeline.item_ids.tolist()]
        self.rows_by_key = {k: i for i, k in enumerate(self.keys)}
        self.name, self.version = self.pipeline.manifest.name, self.pipeline.version
        # The decorator's defaults are overridden per replica with its setters (Ray's documented way).
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_s)
        # Warm-up at the shapes requests will have, as attnrec serve does before it says SERVING.
        rng = np.random.default_rng(0)
        for b in (1, max_batch_size):
            self.pipeline.recommend(
                [rng.integers(0, self.pipeline.n_items, self.pipeline.max_len) for _ in range(b)], 10
            )

    async def Recommend(self, request: pb.RecommendRequest) -> pb.RecommendReply:  # noqa: N802 - the gRPC name
        return await self._batched(request)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _batched(self, requests: list[pb.RecommendRequest]) -> list[pb.RecommendReply]:
        # Off the replica's event loop: onnxruntime and FAISS release the GIL, so the next batch's
        # requests keep arriving while this one computes.
        return await asyncio.to_thread(self._compute, requests)

    def _compute(self, requests: list[pb.RecommendRequest]) -> list[pb.RecommendReply]:
        lookup, replies = self.rows_by_key, [None] * len(requests)
        by_candidates: dict[int, list[int]] = {}  # Pipeline.recommend takes one candidate count per call
        for i, r in enumerate(requests):
            by_candidates.setdefault(r.n_candidates, []).append(i)
        for n, members in by_candidates.items():
            found = [[lookup.get(x) for x in requests[i].history] for i in members]
            rows = [np.array([r for r in f if r is not None], dtype=np.int64) for f in found]
            exclude = [
                np.array([r for r in (lookup.get(x) for x in requests[i].exclude) if r is not None], dtype=np.int64)
                for i in members
            ]
            ks = [requests[i].k or DEFAULT_K for i in members]
            recs = self.pipeline.recommend(rows, max(ks), exclude=exclude, n_candidates=n or None)
            for j, i in enumerate(members):
                out, scores = recs.rows[j, : ks[j]], recs.scores[j, : ks[j]]
                keep = out >= 0
                replies[i] = pb.RecommendReply(
                    items=[self.keys[x] for x in out[keep]],
                    scores=scores[keep].tolist(),
                    model=self.name,
                    model_version=self.version,
                    unknown_items=len(found[j]) - len(rows[j]),
                    popularity_fallback=len(rows[j]) == 0,
                    truncated_items=max(0, len(rows[j]) - self.pipeline.max_len),
                    request_id=requests[i].request_id,
                )
        return replies


def start_ray(cpus: int, temp_dir: str, attempts: int = 3) -> None:
    """ray.init of a local cluster of its own. Ray waits a fixed 30 s for its raylet to register,
    which a loaded host can exceed: then its processes are ended (ray.shutdown) and it tries again."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                num_cpus=cpus,
                include_dashboard=False,
                _temp_dir=temp_dir,
                object_store_memory=128 * 1024**2,  # replies are small objects; not Ray's 30% of RAM
                log_to_driver=False,
            )
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for a startup timeout
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            print(f"ray.init attempt {attempt} of {attempts} failed ({exc}); retrying", flush=True)
            # The failed node is not ray.shutdown()'s to end: its processes name the session folder.
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and int(entry.name) != os.getpid():
                    try:
                        if temp_dir.encode() in (entry / "cmdline").read_bytes():
                            os.kill(int(entry.name), signal.SIGKILL)
                    except OSError:
                        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version-dir", required=True, help="the published attnrec version folder to serve")
    p.add_argument("--grpc-port", type=int, required=True, help="Ray Serve's gRPC proxy port")
    p.add_argument("--http-port", type=int, required=True, help="Ray Serve's HTTP proxy port (127.0.0.1)")
    p.add_argument("--temp-dir", required=True, help="Ray's session folder (short: it holds Unix sockets)")
    p.add_argument("--max-batch-size", type=int, default=32, help="@serve.batch max_batch_size (32)")
    p.add_argument("--batch-wait", type=float, default=0.0, help="@serve.batch batch_wait_timeout_s (0)")
    p.add_argument("--max-ongoing", type=int, default=128, help="deployment max_ongoing_requests (128)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray's CPUs, all given to the replica")
    args = p.parse_args(argv)

    start_ray(args.cpus, args.temp_dir)
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
        grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[SERVICER]),
    )
    # Ray sets OMP_NUM_THREADS to an actor's num_cpus: the replica gets every CPU, as attnrec serve does.
    deployment = serve.deployment(
        RecommenderDeployment,
        name="recommender",
        num_replicas=1,
        max_ongoing_requests=args.max_ongoing,
        ray_actor_options={"num_cpus": args.cpus},
    )
    app = deployment.bind(args.version_dir, args.threads, args.max_batch_size, args.batch_wait)
    serve.run(app, name=APP, route_prefix="/")
    print(f"READY {args.grpc_port}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
