"""`attnrec serve` settings: one typed dataclass, filled from flags, ATTNREC_* variables and a TOML file.

Precedence: command-line flag > environment variable (ATTNREC_<FIELD>, e.g. ATTNREC_PORT)
> config file (--config FILE.toml, keys = field names) > default. Every field is a flag
(`--max-batch-size` for `max_batch_size`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # imported when used: `attnrec --help` should not load onnxruntime and FAISS
    from .batcher import BatchSettings
    from .pipeline import RuntimeOptions

ENV_PREFIX = "ATTNREC_"


@dataclass(frozen=True)
class ServerSettings:
    repo: Path
    model: str = ""
    address: str = "[::]"
    port: int = 8001
    metrics_port: int = 8002
    metrics_address: str = ""
    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    instances: int = 1
    inline_max_us: int = 4000
    max_k: int = 1000
    stream_window: int = 64
    providers: str = ""
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: str = "all"
    ort_spinning: str = "off"
    faiss_threads: int = 0
    faiss_gpu: str = "auto"
    io_binding: str = "auto"
    poll_interval: float = 0.0
    grace: float = 10.0
    shutdown_delay: float = 0.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token: str = ""
    auth_token_file: Path | None = None
    history_store: str = "file://attnrec-history.sqlite"
    history_ttl: int = 30 * 24 * 3600
    model_control: bool = False
    admin_token: str = ""
    admin_token_file: Path | None = None
    workers: str = "1"

    @property
    def batching(self) -> "BatchSettings":
        from .batcher import BatchSettings

        return BatchSettings(
            self.max_batch_size, self.max_queue_delay_us, self.max_queue_size, self.instances, self.inline_max_us
        )

    @property
    def runtime(self) -> "RuntimeOptions":
        from .pipeline import RuntimeOptions

        gpu = {"auto": None, "on": True, "off": False}[self.faiss_gpu]
        providers = tuple(p.strip() for p in self.providers.split(",") if p.strip()) or None
        return RuntimeOptions(
            providers,
            self.intra_op_threads,
            self.inter_op_threads,
            self.graph_optimization,
            gpu,
            allow_spinning=self.ort_spinning == "on",
            faiss_threads=self.faiss_threads,
            io_binding=self.io_binding,
        )

    @property
    def worker_count(self) -> int:
        """--workers as a number: auto = the cores this process may run on."""
        if self.workers.strip().lower() == "auto":
            return len(os.sched_getaffinity(0))
        try:
            n = int(self.workers)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--workers must be a positive integer or auto, got {self.workers!r}")
        return n

    def token(self) -> str:
        """The bearer token clients must send ("" = no check)."""
        if self.auth_token_file is not None:
            return Path(self.auth_token_file).read_text().strip()
        return self.auth_token

    def admin(self) -> str:
        """The bearer token of model control ("" = none; then only --model-control turns it on)."""
        if self.admin_token_file is not None:
            return Path(self.admin_token_file).read_text().strip()
        return self.admin_token

    @property
    def metrics_host(self) -> str:
        """Where /metrics listens: --metrics-address, else the gRPC --address (brackets dropped)."""
        return (self.metrics_address or self.address).strip("[]")


HELP = {
    "repo": "model repository folder",
    "model": "model name in the repository (default: the only one there)",
    "address": "address to listen on",
    "port": "gRPC port (0: any free port, logged)",
    "metrics_port": "Prometheus /metrics HTTP port (0: off)",
    "metrics_address": "address /metrics listens on (default: --address)",
    "max_batch_size": "rows per batch of the dynamic batcher",
    "max_queue_delay_us": "microseconds the first queued request waits for others (0: batch whatever is queued)",
    "max_queue_size": "queued requests per model beyond which RESOURCE_EXHAUSTED is answered (0: no limit)",
    "instances": "batches of one model that may run at the same time",
    "inline_max_us": "a lone request (nothing else queued or running) is computed on the event-loop thread, "
    "skipping the thread-pool hand-off (~0.3 ms), while that model's one-request batches take at most this "
    "many microseconds to run (0: always the thread pool)",
    "max_k": "largest k (and n_candidates) a request may ask for",
    "stream_window": "requests of one RecommendStream computed ahead of the reply being read",
    "providers": "onnxruntime execution providers, comma-separated (default: TensorRT → CUDA → CPU, as available)",
    "intra_op_threads": "onnxruntime intra-op threads per session (0: one per usable physical core, not pinned "
    "to cores)",
    "inter_op_threads": "onnxruntime inter-op threads (0: default)",
    "graph_optimization": "onnxruntime graph optimisation: disable, basic, extended, all",
    "ort_spinning": "onnxruntime worker threads busy-wait between ops: on, off (off leaves the cores to "
    "the gRPC loop and FAISS on small hosts)",
    "faiss_threads": "FAISS OpenMP threads for search (0: all cores; 1 suits small per-request batches, where "
    "OpenMP's hand-off costs more than it saves)",
    "faiss_gpu": "FAISS on the GPU: auto (when a GPU build and a device are present), on, off",
    "io_binding": "onnxruntime IO binding of inputs and outputs: auto (on a CUDA/TensorRT provider, where the "
    "encoder's hidden states stay on the GPU for the ranker), on (also on the CPU), off",
    "poll_interval": "seconds between checks of the repository for new versions (0: off)",
    "grace": "seconds in-flight requests get to finish on SIGTERM/SIGINT",
    "shutdown_delay": "seconds to keep serving while reporting NOT_SERVING before draining (load balancer lag)",
    "tls_cert": "server certificate chain (PEM); with --tls-key turns TLS on",
    "tls_key": "server private key (PEM)",
    "tls_client_ca": "CA bundle (PEM) for client certificates: turns mutual TLS on",
    "auth_token": "bearer token every RPC but health checks must send as `authorization: Bearer TOKEN` "
    "(prefer ATTNREC_AUTH_TOKEN or --auth-token-file: flags show in `ps`)",
    "auth_token_file": "file holding the bearer token",
    "history_store": "where users' histories (RecordEvents) and item availability (SetItemAvailability) live: "
    "file://PATH (embedded SQLite, relative to the working directory) or redis://HOST:PORT/DB (shared by "
    "replicas; needs attnrec[redis])",
    "history_ttl": "seconds a user's stored history lives after their last recorded event (0: forever)",
    "model_control": "allow the model-control RPCs (ReloadModel, RepositoryModelLoad/Unload) to any client that "
    "passes --auth-token; off, they answer PERMISSION_DENIED (as Triton's --model-control-mode none)",
    "admin_token": "bearer token the model-control RPCs need (turns them on; other RPCs accept it too); prefer "
    "ATTNREC_ADMIN_TOKEN or --admin-token-file",
    "admin_token_file": "file holding the admin token",
    "workers": "server processes sharing the port (SO_REUSEPORT), each with its own sessions, index and "
    "batchers; one merged metrics endpoint; auto = the usable cores",
}
CHOICES = {
    "graph_optimization": ["disable", "basic", "extended", "all"],
    "faiss_gpu": ["auto", "on", "off"],
    "ort_spinning": ["on", "off"],
    "io_binding": ["auto", "on", "off"],
}


def _kind(f) -> type:
    t = f.type if isinstance(f.type, str) else f.type.__name__
    return Path if "Path" in t else int if t == "int" else float if t == "float" else bool if t == "bool" else str


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _boolean(text: str) -> bool:
    if text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    raise ValueError(f"{text!r} is not one of {', '.join(_TRUE + _FALSE)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are resolved later (flag > env > file > default)."""
    parser.add_argument("--config", type=Path, metavar="FILE.toml", help="settings file (keys: the flag names)")
    for f in fields(ServerSettings):
        default = None if f.default is MISSING else f.default
        env = ENV_PREFIX + f.name.upper()
        secret = f.name in ("auth_token", "admin_token")
        shown = "" if secret else f" (default: {default if default not in (None, '') else 'unset'})"
        flag = "--" + f.name.replace("_", "-")
        if _kind(f) is bool:  # --model-control / --no-model-control
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=f"{HELP[f.name]}; env {env}{shown}"
            )
            continue
        parser.add_argument(
            flag,
            type=_kind(f),
            default=None,
            choices=CHOICES.get(f.name),
            help=f"{HELP[f.name]}; env {env}{shown}",
        )


def from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerSettings:
    file: dict[str, Any] = {}
    if getattr(args, "config", None):
        import tomllib

        with open(args.config, "rb") as fh:
            file = {k.replace("-", "_"): v for k, v in tomllib.load(fh).items()}
        unknown = sorted(set(file) - {f.name for f in fields(ServerSettings)})
        if unknown:
            raise ValueError(f"{args.config}: unknown settings {unknown}")
    values: dict[str, Any] = {}
    for f in fields(ServerSettings):
        kind = _kind(f)
        flag = getattr(args, f.name, None)
        env = environ.get(ENV_PREFIX + f.name.upper())
        if flag is not None:
            values[f.name] = flag
        elif env is not None:
            try:
                values[f.name] = _boolean(env) if kind is bool else kind(env)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX + f.name.upper()}={env!r}: not a valid {kind.__name__}") from exc
            if f.name in CHOICES and env not in CHOICES[f.name]:
                raise ValueError(f"{ENV_PREFIX + f.name.upper()}={env!r}: choose from {CHOICES[f.name]}")
        elif f.name in file:
            if kind is bool and not isinstance(file[f.name], bool):
                raise ValueError(f"{args.config}: {f.name} must be true or false")
            values[f.name] = kind(file[f.name])
    if "repo" not in values:
        raise ValueError("no model repository: pass --repo DIR (or set ATTNREC_REPO)")
    return ServerSettings(**values)
