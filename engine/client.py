"""A small typed client for `attnrec.v1.Recommender` (what `attnrec query` uses).

    with RecommenderClient("localhost:8001") as c:
        r = c.recommend(["10", "42", "7"], k=10)
        print(r.items, r.scores, r.version)

Errors are `grpc.RpcError`s with the server's status code and message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc

from .rpc.attnrec.v1 import recommender_pb2 as pb
from .rpc.attnrec.v1 import recommender_pb2_grpc as pb_grpc


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    model: str
    version: int
    unknown_items: int = 0
    popularity_fallback: bool = False
    truncated_items: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds; batch_size as a count
    request_id: str = ""
    error: tuple[int, str] | None = None  # (grpc status code value, message), on streams only
    stored_events: int = 0  # events of the user's stored history used (with user_id)

    @classmethod
    def from_reply(cls, r: pb.RecommendReply) -> "Recommendation":
        t = r.timings
        timings = (
            {
                "queue_ms": t.queue_ms,
                "encoder_ms": t.encoder_ms,
                "search_ms": t.search_ms,
                "ranker_ms": t.ranker_ms,
                "total_ms": t.total_ms,
                "batch_size": t.batch_size,
            }
            if r.HasField("timings")
            else {}
        )
        error = (r.error.code, r.error.message) if r.HasField("error") else None
        return cls(
            list(r.items),
            list(r.scores),
            r.model,
            r.model_version,
            r.unknown_items,
            r.popularity_fallback,
            r.truncated_items,
            timings,
            r.request_id,
            error,
            r.stored_events,
        )


def request(
    history: Sequence[str | int],
    k: int = 10,
    *,
    exclude: Sequence[str | int] = (),
    n_candidates: int = 0,
    timings: bool = False,
    request_id: str = "",
    user_id: str = "",
    include_attributes: Sequence[str] = (),
    exclude_attributes: Sequence[str] = (),
    diversity: float = 0.0,
    popularity_calibration: float = 0.0,
    history_timestamps: Sequence[int] = (),
) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        history=[str(x) for x in history],
        k=k,
        exclude=[str(x) for x in exclude],
        n_candidates=n_candidates,
        include_timings=timings,
        request_id=request_id,
        user_id=user_id,
        include_attributes=include_attributes,
        exclude_attributes=exclude_attributes,
        diversity=diversity,
        popularity_calibration=popularity_calibration,
        history_timestamps=list(history_timestamps),
    )


def events(user_id: str, items: Sequence[str | int], timestamps: Sequence[int] = ()) -> pb.RecordEventsRequest:
    return pb.RecordEventsRequest(user_id=user_id, items=[str(x) for x in items], timestamps=list(timestamps))


def channel(
    target: str,
    *,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls: bool = False,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel:
    """A plaintext channel, or TLS when any TLS argument is given (client cert + key: mutual TLS)."""
    if tls or tls_ca or tls_cert:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
        return grpc.secure_channel(target, creds, options=list(options))
    return grpc.insecure_channel(target, options=list(options))


class RecommenderClient:
    def __init__(
        self,
        target: str,
        *,
        token: str = "",
        timeout: float | None = 30.0,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls: bool = False,
    ) -> None:
        self.channel = channel(target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls=tls)
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def __enter__(self) -> "RecommenderClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def recommend(
        self,
        history: Sequence[str | int],
        k: int = 10,
        *,
        exclude: Sequence[str | int] = (),
        n_candidates: int = 0,
        timings: bool = False,
        user_id: str = "",
        include_attributes: Sequence[str] = (),
        exclude_attributes: Sequence[str] = (),
        diversity: float = 0.0,
        popularity_calibration: float = 0.0,
        history_timestamps: Sequence[int] = (),
    ) -> Recommendation:
        """`diversity` / `popularity_calibration`: re-rank strengths, 0..1 (RecommendRequest)."""
        req = request(
            history,
            k,
            exclude=exclude,
            n_candidates=n_candidates,
            timings=timings,
            user_id=user_id,
            include_attributes=include_attributes,
            exclude_attributes=exclude_attributes,
            diversity=diversity,
            popularity_calibration=popularity_calibration,
            history_timestamps=history_timestamps,
        )
        return Recommendation.from_reply(self.stub.Recommend(req, timeout=self.timeout, metadata=self.metadata))

    def record_events(self, user_id: str, items: Sequence[str | int], timestamps: Sequence[int] = ()) -> int:
        """Append to the user's stored history; its length after."""
        req = events(user_id, items, timestamps)
        return self.stub.RecordEvents(req, timeout=self.timeout, metadata=self.metadata).stored_events

    def record_events_stream(self, requests: Iterable[pb.RecordEventsRequest]) -> tuple[int, int]:
        """Bulk backfill on one stream (no timeout); (requests, events) stored."""
        reply = self.stub.RecordEventsStream(iter(requests), metadata=self.metadata)
        return reply.requests, reply.events

    def set_item_availability(self, items: Sequence[str | int], available: bool) -> dict:
        """Mark items (un)available on every replica sharing the store: {changed, unavailable_items, unknown_items}."""
        req = pb.SetItemAvailabilityRequest(items=[str(x) for x in items], available=available)
        r = self.stub.SetItemAvailability(req, timeout=self.timeout, metadata=self.metadata)
        return {"changed": r.changed, "unavailable_items": r.unavailable_items, "unknown_items": r.unknown_items}

    def recommend_stream(self, requests: Iterable[pb.RecommendRequest]) -> Iterator[Recommendation]:
        """Replies in request order; a failed request yields a Recommendation with `error` set.
        No timeout: a bulk stream runs as long as it needs."""
        for reply in self.stub.RecommendStream(iter(requests), metadata=self.metadata):
            yield Recommendation.from_reply(reply)

    def model_info(self) -> dict:
        return _info(self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout, metadata=self.metadata))

    def reload(self) -> dict:
        return _info(self.stub.ReloadModel(pb.ReloadModelRequest(), timeout=None, metadata=self.metadata))


def _info(m: pb.ModelInfo) -> dict:
    from google.protobuf.json_format import MessageToDict

    info = MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    info["version"] = int(info["version"])  # int64 is a string in proto JSON
    info["metrics"] = json.loads(info.pop("metrics_json") or "{}")
    return info
