"""KServe v2 / Triton gRPC inference protocol (`inference.GRPCInferenceService`) over the serving engine.

Three models, whose only version is the engine that serves (its registry version as a string; an empty
version in a request means that engine):

* ``user_tower``       HISTORY BYTES [B, -1] (item ids, newest last, short rows padded with ""), USER_ID BYTES
                        [B, 1] (optional, "" for none) -> USER_EMBEDDING FP32 [B, D]; unknown ids are skipped
                        like the native API does, and a row with no known item gets the zero vector (no user
                        signal; the native API serves popularity there); with user features, a row with a
                        known item and a user record gets the fused vector the engine retrieves with
* ``item_embeddings``  ITEM_IDS BYTES [N] -> EMBEDDING FP32 [N, D]
* ``recommend``        HISTORY BYTES [-1], K INT32 [1] (optional, default 10), USER_ID BYTES [1] (optional:
                        whose request, for an engine with user features, as the native `user_id`) ->
                        ITEM_IDS BYTES [k], SCORES FP32 [k]; request parameter ``exclude_seen`` (bool)

Inputs come as typed ``contents`` or as ``raw_input_contents`` (BYTES elements: 4-byte little-endian
length + bytes). Outputs are raw (``raw_output_contents``) when the request used raw inputs, which is
what tritonclient sends and the only form its ``as_numpy`` decodes for FP32; typed otherwise.

Status codes follow Triton: unknown model or version NOT_FOUND ("Request for unknown model: ..."),
another engine version of the registry that is not loaded UNAVAILABLE ("... is not at ready state"),
no engine yet UNAVAILABLE, bad inputs INVALID_ARGUMENT naming the tensor and the limit.

Repository semantics: the server always serves the stable engine of the registry. RepositoryModelLoad
re-checks the registry now (what the watcher does every poll interval) and succeeds when the model is
then ready; RepositoryModelUnload is refused with FAILED_PRECONDITION: rollouts go through
livetower.v1.EngineAdmin and the trainer's publishing, never through unloading a model.

Wiring (server/app.py `create_server`): ``add_kserve_to_server(grpc_server, manager=manager,
registry=registry)`` and ``KSERVE`` in the reflection service names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass
from importlib import metadata as _metadata

import grpc
import numpy as np

from contracts.registry import Registry
from proto import grpc_service_pb2 as kpb
from proto import grpc_service_pb2_grpc as kpb_grpc
from proto import model_config_pb2 as mc
from server.batching import MicroBatcher
from server.config import RequestLimits
from server.engine.engine import PAD_ROW, Engine
from server.engine.manager import EngineManager
from server.kserve_tensors import (Inputs, KServeError, ModelSpec, TensorSpec, encode_bytes_tensor, invalid,
                                   read_inputs)
from server.servicer import deadline_of, through_batcher

KSERVE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
SERVER_NAME = "livetower"
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "parameters")
PLATFORM = "livetower"
DEFAULT_K = 10
MAX_USER_BATCH = 1024  # user_tower rows per request (run in chunks of the runner's own max batch)

USER_TOWER, ITEM_EMBEDDINGS, RECOMMEND = "user_tower", "item_embeddings", "recommend"
_CONFIG_TYPE = {"BYTES": mc.TYPE_STRING, "FP32": mc.TYPE_FP32, "INT32": mc.TYPE_INT32}


def _server_version() -> str:
    try:
        return _metadata.version("livetower")
    except _metadata.PackageNotFoundError:
        return "0"


MAX_VERSION_DIGITS = 18  # an engine version fits an int64; longer digit strings name no engine


def _version_number(version: str, field: str = "model_version") -> int | None:
    """None for "" (the serving engine); "1" and "01" both name engine 1. Anything else but ASCII digits (str.isdigit
    also accepts "²", which int() refuses) is INVALID_ARGUMENT naming the field."""
    if version == "":
        return None
    if not (version.isascii() and version.isdigit()) or len(version) > MAX_VERSION_DIGITS:
        raise KServeError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field} must be empty or a decimal engine version of at most {MAX_VERSION_DIGITS} "
                          f"ASCII digits, got {version[:40]!r}")
    return int(version)


MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec(USER_TOWER,
              (TensorSpec("HISTORY", "BYTES", (-1, -1)), TensorSpec("USER_ID", "BYTES", (-1, 1), optional=True)),
              (TensorSpec("USER_EMBEDDING", "FP32", (-1, "D")),),
              MAX_USER_BATCH, "user embedding of each history row (unknown ids and '' padding are skipped)"),
    ModelSpec(ITEM_EMBEDDINGS,
              (TensorSpec("ITEM_IDS", "BYTES", (-1,)),),
              (TensorSpec("EMBEDDING", "FP32", (-1, "D")),),
              0, "L2-normalised item embeddings of the serving engine"),
    ModelSpec(RECOMMEND,
              (TensorSpec("HISTORY", "BYTES", (-1,)), TensorSpec("K", "INT32", (1,), optional=True),
               TensorSpec("USER_ID", "BYTES", (1,), optional=True)),
              (TensorSpec("ITEM_IDS", "BYTES", (-1,)), TensorSpec("SCORES", "FP32", (-1,))),
              0, "top-k items by cosine similarity (popularity when no history item is known)"),
)}


def _ids(values: list[bytes], name: str, limits: RequestLimits) -> list[str]:
    out = []
    for i, b in enumerate(values):
        if len(b) > limits.max_id_chars:
            raise invalid(f"{name}[{i}] has {len(b)} bytes; the limit is {limits.max_id_chars}")
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            raise invalid(f"{name}[{i}] is not valid UTF-8") from None
    return out


# ---------------------------------------------------------------- models

@dataclass(slots=True)
class _Output:
    name: str
    datatype: str
    shape: list[int]
    value: object  # np.ndarray (FP32) or list[bytes]


def _run_user_tower(engine: Engine, inp: Inputs, limits: RequestLimits) -> tuple[list[_Output], int]:
    b, t = inp.shapes["HISTORY"]
    if not 1 <= b <= MAX_USER_BATCH:
        raise invalid(f"input 'HISTORY' has {b} rows; the batch must be in 1..{MAX_USER_BATCH}")
    if t > limits.max_history:
        raise invalid(f"input 'HISTORY' has {t} items per row; the limit is {limits.max_history}")
    flat = _ids(inp.values["HISTORY"], "HISTORY", limits)
    rows_BT = np.stack([engine.history_rows([h for h in flat[r * t:(r + 1) * t] if h]) for r in range(b)])
    step = getattr(engine.runner, "max_batch", None) or b
    out_BD = np.concatenate([engine.runner(rows_BT[i:i + step]) for i in range(0, b, step)], axis=0)
    if "USER_ID" in inp.values:
        n = inp.shapes["USER_ID"][0]
        if n != b:
            raise invalid(f"input 'USER_ID' has {n} ids; it must have one per HISTORY row ({b})")
        users = _ids(inp.values["USER_ID"], "USER_ID", limits)
        known_B = rows_BT[:, -1] != PAD_ROW  # rows with no known item keep the zero vector
        if known_B.any():
            out_BD[known_B] = engine.fuse_user_features(out_BD[known_B], [u for u, k in zip(users, known_B) if k])
    return [_Output("USER_EMBEDDING", "FP32", list(out_BD.shape), out_BD)], b


def _run_item_embeddings(engine: Engine, inp: Inputs, limits: RequestLimits) -> tuple[list[_Output], int]:
    (n,) = inp.shapes["ITEM_IDS"]
    if not 1 <= n <= limits.max_candidates:
        raise invalid(f"input 'ITEM_IDS' has {n} ids; it must have 1..{limits.max_candidates}")
    ids = _ids(inp.values["ITEM_IDS"], "ITEM_IDS", limits)
    unknown = [(i, x) for i, x in enumerate(ids) if x not in engine.row_of]
    if unknown:
        shown = ", ".join(f"ITEM_IDS[{i}] '{x}'" for i, x in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise invalid(f"{shown}{more} not an item of engine {engine.version}")
    idx = np.fromiter((engine.row_of[x] - 1 for x in ids), dtype=np.int64, count=n)
    emb_ND = engine.items_ND.numpy()[idx]
    return [_Output("EMBEDDING", "FP32", list(emb_ND.shape), emb_ND)], n


def _run_recommend(engine: Engine, inp: Inputs, limits: RequestLimits,
                   request: kpb.ModelInferRequest) -> tuple[list[_Output], int, dict[str, kpb.InferParameter]]:
    (t,) = inp.shapes["HISTORY"]
    if t > limits.max_history:
        raise invalid(f"input 'HISTORY' has {t} items; the limit is {limits.max_history}")
    history = [h for h in _ids(inp.values["HISTORY"], "HISTORY", limits) if h]
    k = int(inp.values["K"][0]) if "K" in inp.values else DEFAULT_K
    if not 1 <= k <= limits.max_k:
        raise invalid(f"input 'K' is {k}; it must be in 1..{limits.max_k}")
    exclude_seen = False
    if "exclude_seen" in request.parameters:
        p = request.parameters["exclude_seen"]
        if p.WhichOneof("parameter_choice") != "bool_param":
            raise invalid("parameter 'exclude_seen' must be a bool_param")
        exclude_seen = p.bool_param
    user_id = _ids(inp.values["USER_ID"], "USER_ID", limits)[0] if "USER_ID" in inp.values else ""
    ranked = engine.recommend(history, k, exclude_seen, user_id)
    scores = np.asarray(ranked.scores, dtype=np.float32)
    outs = [_Output("ITEM_IDS", "BYTES", [len(ranked.item_ids)], [x.encode() for x in ranked.item_ids]),
            _Output("SCORES", "FP32", [len(scores)], scores)]
    return outs, 1, {"source": kpb.InferParameter(string_param=ranked.source)}


# ---------------------------------------------------------------- statistics

@dataclass(slots=True)
class _Stats:
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0


# ---------------------------------------------------------------- servicer

class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, *, manager: EngineManager, registry: Registry, limits: RequestLimits | None = None,
                 batcher: MicroBatcher | None = None) -> None:
        self.batcher = batcher  # inference runs on its compute thread, with its admission control
        self.manager = manager
        self.registry = registry
        self.limits = limits or RequestLimits()
        self._stats: dict[tuple[str, str], _Stats] = {}
        self._stats_lock = threading.Lock()
        self._load_lock = asyncio.Lock()

    # ---- resolution
    def _spec(self, name: str) -> ModelSpec:
        spec = MODELS.get(name)
        if spec is None:
            raise KServeError(grpc.StatusCode.NOT_FOUND,
                              f"Request for unknown model: '{name}' is not found; the models are "
                              f"{', '.join(MODELS)}")
        return spec

    async def _resolve(self, name: str, version: str, field: str = "model_version") -> tuple[ModelSpec, Engine]:
        """The model and the engine that runs it; raises NOT_FOUND / UNAVAILABLE like Triton, INVALID_ARGUMENT
        for a version that is not a number."""
        spec = self._spec(name)
        number = _version_number(version, field)
        engine = self.manager.current  # hold this reference for the whole request
        if engine is None:
            raise KServeError(grpc.StatusCode.UNAVAILABLE,
                              f"Request for unknown model: '{name}' has no available versions: no engine is "
                              "serving yet (the trainer has not published one); retry shortly")
        if number is not None and number != engine.version:
            loaded = f"only the serving engine version {engine.version} is loaded"
            if number in await asyncio.to_thread(self.registry.versions):
                raise KServeError(grpc.StatusCode.UNAVAILABLE,
                                  f"Request for unknown model: '{name}' version {version} is not at ready state: "
                                  f"{loaded}; change the served engine through livetower.v1.EngineAdmin")
            raise KServeError(grpc.StatusCode.NOT_FOUND,
                              f"Request for unknown model: '{name}' version {version} is not found; {loaded}")
        return spec, engine

    @staticmethod
    async def _abort(context, e: KServeError):
        await context.abort(e.code, e.message)

    # ---- health and metadata
    async def ServerLive(self, request, context) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self.manager.current is not None)

    async def ModelReady(self, request, context) -> kpb.ModelReadyResponse:
        engine = self.manager.current
        try:
            number = _version_number(request.version, "version")
        except KServeError as e:
            await self._abort(context, e)
        ready = request.name in MODELS and engine is not None and number in (None, engine.version)
        return kpb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context) -> kpb.ModelMetadataResponse:
        try:
            spec, engine = await self._resolve(request.name, request.version, "version")
        except KServeError as e:
            await self._abort(context, e)
        dim = int(engine.manifest.dim)
        T = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=spec.name, versions=[str(engine.version)], platform=PLATFORM,
            inputs=[T(name=t.name, datatype=t.datatype, shape=t.resolved(dim)) for t in spec.inputs],
            outputs=[T(name=t.name, datatype=t.datatype, shape=t.resolved(dim)) for t in spec.outputs])

    async def ModelConfig(self, request, context) -> kpb.ModelConfigResponse:
        try:
            spec, engine = await self._resolve(request.name, request.version, "version")
        except KServeError as e:
            await self._abort(context, e)
        dim = int(engine.manifest.dim)
        skip = 1 if spec.max_batch_size > 0 else 0  # Triton: dims leave out the batch dim when batching
        params = {"engine_version": str(engine.version), "item_count": str(engine.manifest.item_count),
                  "dim": str(dim), "max_history": str(engine.max_history), "description": spec.description}
        config = mc.ModelConfig(
            name=spec.name, platform=PLATFORM, backend=engine.manifest.backend, max_batch_size=spec.max_batch_size,
            input=[mc.ModelInput(name=t.name, data_type=_CONFIG_TYPE[t.datatype], dims=t.resolved(dim)[skip:],
                                 optional=t.optional) for t in spec.inputs],
            output=[mc.ModelOutput(name=t.name, data_type=_CONFIG_TYPE[t.datatype], dims=t.resolved(dim)[skip:])
                    for t in spec.outputs],
            parameters={k: mc.ModelParameter(string_value=v) for k, v in params.items()})
        return kpb.ModelConfigResponse(config=config)

    # ---- inference
    async def ModelInfer(self, request: kpb.ModelInferRequest, context) -> kpb.ModelInferResponse:
        t0 = time.perf_counter_ns()
        known = request.model_name in MODELS
        try:
            spec, engine = await self._resolve(request.model_name, request.model_version)
            if self.batcher is None:
                response, count = self._infer(spec, engine, request)
            else:
                response, count = await through_batcher(context, self.batcher.run(
                    engine, lambda: self._infer(spec, engine, request), deadline_of(context)))
        except KServeError as e:
            if known:
                self._record(request.model_name, None, False, time.perf_counter_ns() - t0, 0)
            await self._abort(context, e)
        except Exception:
            if known:
                self._record(request.model_name, None, False, time.perf_counter_ns() - t0, 0)
            raise
        self._record(spec.name, engine, True, time.perf_counter_ns() - t0, count)
        return response

    def _infer(self, spec: ModelSpec, engine: Engine,
               request: kpb.ModelInferRequest) -> tuple[kpb.ModelInferResponse, int]:
        inp = read_inputs(request, spec)
        params: dict[str, kpb.InferParameter] = {}
        if spec.name == USER_TOWER:
            outs, count = _run_user_tower(engine, inp, self.limits)
        elif spec.name == ITEM_EMBEDDINGS:
            outs, count = _run_item_embeddings(engine, inp, self.limits)
        else:
            outs, count, params = _run_recommend(engine, inp, self.limits, request)
        if request.outputs:
            by_name = {o.name: o for o in outs}
            wanted = []
            for r in request.outputs:
                if r.name not in by_name:
                    raise invalid(f"unexpected inference output '{r.name}' for model '{spec.name}'; it has "
                                   f"{', '.join(by_name)}")
                wanted.append(by_name[r.name])
            outs = wanted
        response = kpb.ModelInferResponse(model_name=spec.name, model_version=str(engine.version), id=request.id,
                                          parameters=params)
        for o in outs:
            tensor = response.outputs.add(name=o.name, datatype=o.datatype, shape=o.shape)
            if o.datatype == "BYTES":
                if inp.raw:
                    response.raw_output_contents.append(encode_bytes_tensor(o.value))
                else:
                    tensor.contents.bytes_contents.extend(o.value)
            elif inp.raw:
                response.raw_output_contents.append(np.ascontiguousarray(o.value, dtype="<f4").tobytes())
            else:
                tensor.contents.fp32_contents.extend(np.asarray(o.value, dtype=np.float32).ravel().tolist())
        return response, count

    # ---- statistics
    def _record(self, model: str, engine: Engine | None, ok: bool, ns: int, count: int) -> None:
        """Counters per (model, engine version); a failure before an engine was picked goes to the serving one."""
        engine = engine or self.manager.current
        version = str(engine.version) if engine is not None else ""
        with self._stats_lock:
            s = self._stats.setdefault((model, version), _Stats())
            if ok:
                s.success_count += 1
                s.success_ns += ns
                s.inference_count += count
                s.execution_count += 1
                s.last_inference_ms = int(time.time() * 1000)
            else:
                s.fail_count += 1
                s.fail_ns += ns

    async def ModelStatistics(self, request, context) -> kpb.ModelStatisticsResponse:
        if request.name:
            try:
                self._spec(request.name)
            except KServeError as e:
                await self._abort(context, e)
        engine = self.manager.current
        serving = str(engine.version) if engine is not None else ""
        with self._stats_lock:
            snapshot = {key: dataclasses.replace(s) for key, s in self._stats.items()}
        out = []
        for name in ([request.name] if request.name else list(MODELS)):
            keys = sorted({v for (m, v) in snapshot if m == name} | ({serving} if serving else set()))
            if request.version:
                if request.version not in keys:
                    await context.abort(grpc.StatusCode.NOT_FOUND,
                                        f"Request for unknown model: '{name}' version {request.version} is not "
                                        f"found; versions with statistics: {', '.join(keys) or 'none'}")
                keys = [request.version]
            for v in keys:
                s = snapshot.get((name, v), _Stats())
                D = kpb.StatisticDuration
                out.append(kpb.ModelStatistics(
                    name=name, version=v, last_inference=s.last_inference_ms, inference_count=s.inference_count,
                    execution_count=s.execution_count,
                    inference_stats=kpb.InferStatistics(success=D(count=s.success_count, ns=s.success_ns),
                                                        fail=D(count=s.fail_count, ns=s.fail_ns),
                                                        compute_infer=D(count=s.success_count, ns=s.success_ns))))
        return kpb.ModelStatisticsResponse(model_stats=out)

    # ---- repository
    async def RepositoryIndex(self, request, context) -> kpb.RepositoryIndexResponse:
        engine = self.manager.current
        models = []
        for name in MODELS:
            if engine is not None:
                models.append(kpb.RepositoryIndexResponse.ModelIndex(name=name, version=str(engine.version),
                                                                     state="READY"))
            elif not request.ready:
                models.append(kpb.RepositoryIndexResponse.ModelIndex(
                    name=name, state="UNAVAILABLE", reason=f"no engine is serving yet (state {self.manager.state})"))
        return kpb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request, context) -> kpb.RepositoryModelLoadResponse:
        try:
            self._spec(request.model_name)
        except KServeError as e:
            await self._abort(context, e)
        if request.parameters:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"load parameters ({', '.join(sorted(request.parameters))}) are not supported: "
                                "models are defined by the engines the trainer publishes to the registry")
        try:
            async with self._load_lock:  # one registry check at a time from this service
                await asyncio.to_thread(self.manager.poll_once)
        except Exception as e:  # noqa: BLE001 - the registry could not be read; the client may retry
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"failed to load '{request.model_name}': registry check failed ({e}); retry")
        if self.manager.current is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"failed to load '{request.model_name}': no engine of the registry could be loaded "
                                f"(state {self.manager.state}); see EngineAdmin.GetRollout for refused versions")
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context) -> kpb.RepositoryModelUnloadResponse:
        try:
            self._spec(request.model_name)
        except KServeError as e:
            await self._abort(context, e)
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"model '{request.model_name}' cannot be unloaded: this server always serves its stable "
                            "engine; control rollouts through livetower.v1.EngineAdmin")


def add_kserve_to_server(grpc_server: grpc.aio.Server, *, manager: EngineManager, registry: Registry,
                         limits: RequestLimits | None = None, batcher: MicroBatcher | None = None) -> None:
    """Register inference.GRPCInferenceService (name: KSERVE) on the server."""
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeServicer(manager=manager, registry=registry, limits=limits, batcher=batcher), grpc_server)
