"""`attnrec.v1.Recommender`: the domain API. Thin: convert, call the whole-path model
(engine/models.py `RecommendModel`), convert back. ReloadModel asks the loader; RecordEvents and
SetItemAvailability ask the server's online state (engine/online_state.py)."""

from __future__ import annotations

import asyncio
import json
import time

import grpc

from .decoding import Undecodable, add_service
from .errors import ServingError, Unavailable, capped, client_errors
from .loader import ModelLoader, Reload
from .models import DEFAULT_K, Answer, ModelRegistry
from .rpc.attnrec.v1 import recommender_pb2 as pb
from .rpc.attnrec.v1 import recommender_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
# Model control: refused unless the server runs with --model-control or an admin token.
ADMIN_METHODS = (f"/{SERVICE_NAME}/ReloadModel",)
NEEDS = ("pipeline",)  # the served models (engine/models.py) behind this service


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the time.monotonic() clock (None: the client set none)."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, models: ModelRegistry, loader: ModelLoader, *, stream_window: int = 64) -> None:
        self.models, self.loader, self.stream_window = models, loader, stream_window
        self.recommender = models.recommend  # the whole-path model (it counts the request and its total stage)

    async def Recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendReply:
        return await self._recommend(request, deadline_of(context))

    async def RecommendStream(self, requests, context):
        """Requests are computed concurrently (up to stream_window ahead); replies go out in order."""
        deadline = deadline_of(context)
        order: asyncio.Queue = asyncio.Queue(maxsize=max(1, self.stream_window))

        async def read() -> None:
            try:
                async for request in requests:
                    await order.put(asyncio.ensure_future(self._answer_or_error(request, deadline)))
            finally:
                await order.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await order.get()) is not None:
                yield await task
            await reader  # a broken request stream ends the call with its error
        finally:
            reader.cancel()
            while not order.empty():
                task = order.get_nowait()
                if task is not None:
                    task.cancel()

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfo:
        return self._info()

    async def ReloadModel(self, request: pb.ReloadModelRequest, context) -> pb.ModelInfo:
        reload = await self.loader.reload(force=True)
        return self._info(reload)

    async def RecordEvents(self, request: pb.RecordEventsRequest, context) -> pb.RecordEventsReply:
        return pb.RecordEventsReply(stored_events=await self._record(request))

    async def RecordEventsStream(self, requests, context) -> pb.RecordEventsStreamReply:
        n = events = 0
        async for request in requests:
            if isinstance(request, Undecodable):  # ends the call like any failing request (those before are stored)
                raise request.error()
            await self._record(request)
            n, events = n + 1, events + len(request.items)
        return pb.RecordEventsStreamReply(requests=n, events=events)

    async def SetItemAvailability(self, request: pb.SetItemAvailabilityRequest, context) -> pb.SetItemAvailabilityReply:
        v = self._state_and_version()[1]
        changed, now = await self.models.state.set_availability(request.items, request.available)
        unknown = sum(x not in v.rows_by_key for x in set(request.items))
        return pb.SetItemAvailabilityReply(
            changed=changed, unavailable_items=len(now.unavailable), unknown_items=unknown
        )

    # ── conversions ───────────────────────────────────────────────────────────────────────
    async def _recommend(self, request: pb.RecommendRequest, deadline: float | None) -> pb.RecommendReply:
        start = time.perf_counter()
        answer = await self.recommender.recommend(
            request.history,
            request.k or DEFAULT_K,  # proto3 cannot tell 0 from unset: both mean the default
            exclude=request.exclude,
            n_candidates=request.n_candidates,
            deadline=deadline,
            user_id=request.user_id,
            include_attributes=request.include_attributes,
            exclude_attributes=request.exclude_attributes,
            diversity=request.diversity,
            popularity_calibration=request.popularity_calibration,
            history_timestamps=request.history_timestamps,
        )
        return self._reply(request, answer, start)

    async def _record(self, request: pb.RecordEventsRequest) -> int:
        state, v = self._state_and_version()
        # The stored history is bounded to what the serving model encodes.
        return await state.record(request.user_id, request.items, request.timestamps, limit=v.max_len)

    def _state_and_version(self):
        if self.models.state is None:
            raise Unavailable("this server has no history store")
        v = self.models.slot.current
        if v is None:
            raise Unavailable(f"model {self.models.name!r} is not loaded yet")
        return self.models.state, v

    async def _answer_or_error(self, request: pb.RecommendRequest, deadline: float | None) -> pb.RecommendReply:
        """The reply, or (the stream's contract) a reply carrying the error, for a frame that did not
        parse (engine/decoding.py) as for a request that failed."""
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await self._recommend(request, deadline)
        except ServingError as exc:
            message = capped(str(exc))
            client_errors("%s %s (in-band): %s", f"/{SERVICE_NAME}/RecommendStream", exc.code.name, message)
            error = pb.Error(code=exc.code.value[0], message=message)
            request_id = "" if isinstance(request, Undecodable) else request.request_id
            return pb.RecommendReply(request_id=request_id, error=error)

    def _reply(self, request: pb.RecommendRequest, a: Answer, start: float) -> pb.RecommendReply:
        reply = pb.RecommendReply(
            items=a.items,
            scores=a.scores.tolist(),
            model=self.models.name,
            model_version=a.version,
            unknown_items=a.unknown_items,
            popularity_fallback=a.popularity_fallback,
            truncated_items=a.truncated_items,
            request_id=request.request_id,
            stored_events=a.stored_events,
        )
        if request.include_timings:
            t = a.timings
            reply.timings.CopyFrom(
                pb.Timings(
                    queue_ms=t["queue"] * 1e3,
                    encoder_ms=t.get("encoder", 0.0) * 1e3,
                    search_ms=t.get("search", 0.0) * 1e3,
                    ranker_ms=t.get("ranker", 0.0) * 1e3,
                    total_ms=(time.perf_counter() - start) * 1e3,
                    batch_size=int(t["batch_size"]),
                )
            )
        return reply

    def _info(self, reload: Reload | None = None) -> pb.ModelInfo:
        v = self.models.slot.current
        if v is None:
            raise Unavailable(f"model {self.models.name!r} is not loaded yet")
        p, m = v.compute, v.compute.manifest
        return pb.ModelInfo(
            model=m.name,
            version=m.version,
            n_items=p.n_items,
            max_history=p.max_len,
            dim=m.model.dim,
            has_ranker=p.ranker is not None,
            default_n_candidates=p.n_candidates,
            item_id_type=v.id_type,
            index_factory=m.index.factory,
            providers=p.encoder.providers,
            created_at=m.created_at,
            metrics_json=json.dumps(m.metrics.to_dict() if m.metrics else {}),
            refused_versions=[
                pb.RefusedVersion(version=r.version, reason=r.reason) for r in (reload.refused if reload else ())
            ],
        )


def add_to(server: grpc.aio.Server, models: ModelRegistry, loader: ModelLoader, stream_window: int = 64) -> None:
    servicer = RecommenderServicer(models, loader, stream_window=stream_window)
    add_service(server, servicer, pb.DESCRIPTOR.services_by_name["Recommender"])
