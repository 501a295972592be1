"""`s3t serve`: a prediction server that follows deletions, speaking MLflow's scoring protocol.

A registered model version is pinned: a process that loaded it keeps a deleted example's influence until someone
restarts it. This server is the live door instead:

- every request reads the plan in force from the state's plan pointer (ledger.py `_point`: a small file replaced
  atomically before any transaction that records a plan returns, so one `stat` per request, never the ledger's lock):
  a request that starts after a forget returned, through any door (CLI, Dagster, Python, this server's `/forget`),
  is answered by a plan that honours it; every answer names the plan that computed it (`plan_id`);
- the checkpoints a plan may need are kept in memory (every live checkpoint at start, a retrained one when a plan
  first names it, each verified against its sha256);
- concurrent requests are micro-batched: one inference thread takes what is queued (up to `max_batch_rows`), groups
  it by plan, and runs one frozen-trunk pass per group, each live shard's groups on top (ensemble.py);
- `/forget` (a bearer token, created with the state) is the engine's one forget call: it answers as soon as the
  honour committed, with the plan id, while publishing and erasure go on in its thread. That thread first waits
  (at most `PUBLISH_AFTER_S`) until the inference thread has answered with the new plan or has nothing to do:
  publishing (MLflow's log_model, about a second of Python) shares this process's GIL with inference, and
  started at once it tripled the time to the first answer on the new plan (BENCHMARKS.md, "Serving while
  deletions arrive"). Serve first, then tell the registry.

Endpoints (as `mlflow models serve`): GET /ping, /health, /version; POST /invocations with JSON `dataframe_split`,
`dataframe_records`, `instances` or `inputs`, or CSV (`text/csv`), a `text` column; answers `{"predictions": [{label,
prob_<class>...}], "plan_id": N}`. Bad input is a 4xx with one line (`{"error_code", "message"}`); the state is
unchanged and the server keeps serving. SIGTERM drains in-flight requests; after a SIGKILL a restart serves the
ledger's current plan (the opening's repair points the pointer at it).
"""
from __future__ import annotations

import asyncio
import csv
import hmac
import io
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # at the top: FastAPI resolves the handlers' annotations in this module
from fastapi.responses import JSONResponse, PlainTextResponse

from s3t_ops.state import State
from s3t_ops.token import TOKEN_FILE, read_token

log = logging.getLogger("s3t.serve")

MAX_BODY_BYTES = 1 << 20
MAX_ROWS = 1024
MAX_BATCH_ROWS = 256
PUBLISH_AFTER_S = 2.0  # the most a /forget's publishing waits for the first answer on the new plan


class BadInput(ValueError):
    """A request the server refuses: `status` is the HTTP status, the message one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --- the scoring protocol ---------------------------------------------------------------------------------
def texts_from(body: bytes, content_type: str, max_rows: int = MAX_ROWS) -> list[str]:
    """The texts of a scoring request in any of MLflow's input formats (BadInput otherwise)."""
    kind = (content_type or "application/json").split(";")[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"the body is not UTF-8 (byte {exc.start})") from None
    if kind == "text/csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or "text" not in rows[0]:
            raise BadInput("a CSV body needs a header with a `text` column")
        col = rows[0].index("text")
        texts = [r[col] if col < len(r) else None for r in rows[1:] if r]
    elif kind == "application/json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BadInput(f"the body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        texts = _texts_from_json(data)
    else:
        raise BadInput(f"content type {kind!r} is not accepted: use application/json or text/csv", status=415)
    if not texts:
        raise BadInput("no input rows: send at least one text")
    if len(texts) > max_rows:
        raise BadInput(f"{len(texts)} rows exceed this server's limit of {max_rows} per request", status=413)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise BadInput(f"`text` must be a string in every row (row {bad[0]} is {type(texts[bad[0]]).__name__})")
    return texts


def _texts_from_json(data: Any) -> list:
    if not isinstance(data, dict):
        raise BadInput("the JSON body must be an object with one of dataframe_split, dataframe_records, instances, inputs")
    keys = [k for k in ("dataframe_split", "dataframe_records", "instances", "inputs") if k in data]
    if len(keys) != 1:
        raise BadInput("give exactly one of dataframe_split, dataframe_records, instances, inputs"
                       + (f" (got {', '.join(keys)})" if keys else f" (got {', '.join(map(str, data)) or 'none'})"))
    value = data[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("columns"), list) or not isinstance(value.get("data"), list):
            raise BadInput("dataframe_split needs `columns` (a list) and `data` (a list of rows)")
        if "text" not in value["columns"]:
            raise BadInput(f"no `text` column (columns: {', '.join(map(str, value['columns'])) or 'none'})")
        col = value["columns"].index("text")
        if any(not isinstance(r, list) or len(r) <= col for r in value["data"]):
            raise BadInput("every dataframe_split row must be a list holding the `text` column")
        return [r[col] for r in value["data"]]
    if keys[0] == "dataframe_records":
        if not isinstance(value, list) or any(not isinstance(r, dict) for r in value):
            raise BadInput("dataframe_records must be a list of objects")
        if any("text" not in r for r in value):
            raise BadInput("every dataframe_records row needs a `text` field")
        return [r["text"] for r in value]
    if isinstance(value, dict):  # inputs/instances as columns
        if "text" not in value or not isinstance(value["text"], list):
            raise BadInput(f"{keys[0]} as columns needs a `text` list")
        return list(value["text"])
    if not isinstance(value, list):
        raise BadInput(f"{keys[0]} must be a list of texts, of {{\"text\": ...}} objects, or {{\"text\": [...]}}")
    return [r.get("text") if isinstance(r, dict) else r for r in value]


# --- plans in memory -----------------------------------------------------------------------------------
class Plans:
    """The plan in force, read from the pointer per request, and every checkpoint a plan may need, in memory."""

    def __init__(self, state: State):
        self.state = state
        self.pointer = state.ledger.pointer_path
        self._stamp: tuple | None = None
        self._current: tuple[int, dict] | None = None
        self._states: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.preload()

    def preload(self) -> int:
        """Every live checkpoint (any later plan serves a prefix of the stages live now, until a retraining lands)."""
        for key in self.state.checkpoint_rows():
            self.checkpoint(key)
        return len(self._states)

    def checkpoint(self, key: str, sha256: str | None = None) -> dict:
        hit = self._states.get(key)
        if hit is None:
            if sha256 is None:
                self.state.forget_rows()
                row = self.state.checkpoint_rows().get(key)
                sha256 = None if row is None else row["sha256"]
            hit = self.state.checkpoints.load(key, sha256)  # IntegrityError when damaged: never served
            self._states[key] = hit
        return hit

    def current(self) -> tuple[int, dict]:
        """(plan id, record) in force now: the pointer, re-read when its file changed (one stat per call)."""
        try:
            st = os.stat(self.pointer)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or self._current is None:
                found = self.state.ledger.read_pointer()
                if found is None:
                    raise BadInput("no plan is served yet: train first (`s3t train`)", status=503)
                self._current, self._stamp = found, stamp
            return self._current

    def models(self, record: dict) -> list:
        from s3t_ops.ensemble import ShardModel

        sha = record.get("sha256") or {}
        return [ShardModel(int(s), len(keys), [self.checkpoint(k, sha.get(k)) for k in keys])
                for s, keys in sorted(record["checkpoints"].items(), key=lambda x: int(x[0]))]

    def in_memory(self) -> int:
        return len(self._states)


# --- micro-batched inference --------------------------------------------------------------------------------
@dataclass
class Job:
    texts: list[str]
    plan_id: int
    record: dict
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class Batcher:
    """One inference thread (the backbone is one mutable model): it takes what is queued, up to `max_rows` texts,
    groups the jobs by plan and runs one shared-trunk pass per group."""

    def __init__(self, plans: Plans, backbone, num_labels: int, max_rows: int = MAX_BATCH_ROWS):
        self.plans, self.backbone, self.num_labels, self.max_rows = plans, backbone, num_labels, max_rows
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batches = self.batched_jobs = 0
        self.served_plan = 0  # the highest plan id an answer was computed with
        self.busy = False  # a batch is being computed
        self._progress = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="s3t-inference", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.queue.put(job)
        return job

    def wait_served(self, plan_id: int, timeout: float) -> bool:
        """Until an answer was computed with plan `plan_id` (or a later one), or nothing is queued or computing, or
        `timeout` seconds passed; True unless it timed out."""
        with self._progress:
            return self._progress.wait_for(
                lambda: self.served_plan >= plan_id or (not self.busy and self.queue.empty()), timeout=timeout)

    def stop(self) -> None:
        """After every job queued before it (a graceful stop drains)."""
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            with self._progress:
                self.busy = False
                self._progress.notify_all()
            first = self.queue.get()
            if first is None:
                return
            with self._progress:
                self.busy = True
            jobs, rows = [first], len(first.texts)
            while rows < self.max_rows:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
                rows += len(nxt.texts)
            self.batches += 1
            self.batched_jobs += len(jobs)
            by_plan: dict[int, list[Job]] = {}
            for job in jobs:
                by_plan.setdefault(job.plan_id, []).append(job)
            for plan_id, group in sorted(by_plan.items(), reverse=True):  # the newest plan first
                self._infer(group)
                with self._progress:
                    self.served_plan = max(self.served_plan, plan_id)
                    self._progress.notify_all()

    def _infer(self, group: list[Job]) -> None:
        from s3t_ops.ensemble import Ensemble

        try:
            ensemble = Ensemble(self.backbone, self.plans.models(group[0].record), self.num_labels)
            texts = [t for job in group for t in job.texts]
            labels, probs = ensemble.predict(texts)
            at = 0
            for job in group:
                n = len(job.texts)
                job.result = (labels[at:at + n].tolist(), probs[at:at + n].double().tolist())
                at += n
        except BaseException as exc:  # answered per request; the thread keeps serving
            for job in group:
                job.error = exc
        for job in group:
            job.done.set()


# --- the HTTP app ------------------------------------------------------------------------------------------
@dataclass
class ServerConfig:
    token_file: Path | None = None  # default: <state>/server.token
    max_body_bytes: int = MAX_BODY_BYTES
    max_rows: int = MAX_ROWS
    max_batch_rows: int = MAX_BATCH_ROWS


def build_app(engine, config: ServerConfig | None = None):
    """The FastAPI app over an opened engine (S3T): the batcher and the plan cache start with it."""
    from s3t_ops import __version__
    from s3t_ops.backbone import Backbone

    config = config or ServerConfig()
    state = engine.state
    token = read_token(config.token_file or state.root / TOKEN_FILE)
    plans = Plans(state)
    batcher = Batcher(plans, Backbone(state.cfg), len(state.label_names), config.max_batch_rows)
    names = list(state.label_names)
    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.stop()  # after the last in-flight request: a graceful stop drains the queue

    app = FastAPI(title="s3t serve", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.plans, app.state.batcher, app.state.engine = plans, batcher, engine
    counts = {"started": 0, "answered": 0}

    def refuse(status: int, message: str, code: str = "BAD_REQUEST") -> JSONResponse:
        return JSONResponse({"error_code": code, "message": " ".join(message.split())}, status_code=status)

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise BadInput(f"the body ({declared} bytes) exceeds this server's limit of {config.max_body_bytes} bytes", 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise BadInput(f"the body exceeds this server's limit of {config.max_body_bytes} bytes", 413)
        return bytes(body)

    @app.get("/ping")
    @app.get("/health")
    async def ping():
        return PlainTextResponse("\n")

    @app.get("/version")
    async def version():
        return PlainTextResponse(__version__)

    @app.get("/plan")
    async def plan():
        plan_id, record = plans.current()
        return {"plan_id": plan_id, "plan": record["plan"], "checkpoints_in_memory": plans.in_memory(),
                "batches": batcher.batches, "batched_requests": batcher.batched_jobs, **counts}

    @app.post("/invocations")
    async def invocations(request: Request):
        counts["started"] += 1
        try:
            texts = texts_from(await body_of(request), request.headers.get("content-type", ""), config.max_rows)
            plan_id, record = plans.current()  # the plan in force when the request started
        except BadInput as exc:
            return refuse(exc.status, str(exc))
        job = batcher.submit(Job(texts, plan_id, record))
        await asyncio.get_running_loop().run_in_executor(None, job.done.wait)
        if job.error is not None:
            return refuse(500, f"prediction failed: {job.error}", "INTERNAL_ERROR")
        labels, probs = job.result
        counts["answered"] += 1
        rows = [{"label": names[y], **{f"prob_{n}": p[j] for j, n in enumerate(names)}} for y, p in zip(labels, probs)]
        return JSONResponse({"predictions": rows, "plan_id": plan_id}, headers={"X-S3T-Plan-Id": str(plan_id)})

    @app.post("/forget")
    async def forget(request: Request):
        if token is None:
            return refuse(404, "forgetting through this server is off: it has no token file (see `s3t serve --help`)", "NOT_FOUND")
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            return refuse(401, "a bearer token is required: Authorization: Bearer <the state's server.token>", "UNAUTHENTICATED")
        if not hmac.compare_digest(given.removeprefix("Bearer ").strip().encode(), token.encode()):
            return refuse(403, "wrong token", "PERMISSION_DENIED")
        try:
            data = json.loads((await body_of(request)).decode("utf-8"))
        except BadInput as exc:
            return refuse(exc.status, str(exc))
        except (UnicodeDecodeError, ValueError):
            return refuse(400, "the body must be JSON: {\"ids\": [\"<id or exact text>\", ...]}")
        ids = data.get("ids") if isinstance(data, dict) else None
        if not isinstance(ids, list) or not ids or any(not isinstance(i, str) or not i.strip() for i in ids):
            return refuse(400, "`ids` must be a non-empty list of ids (or exact texts)")
        if len(ids) > config.max_rows:
            return refuse(413, f"{len(ids)} ids exceed this server's limit of {config.max_rows} per request")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future = loop.create_future()

        def run() -> None:
            from s3t_ops.forgetting import forget as forget_ids
            from s3t_ops.ledger import UnknownExampleError

            def honoured(receipt) -> None:
                loop.call_soon_threadsafe(answer.set_result, receipt)
                batcher.wait_served(receipt.plan_id, PUBLISH_AFTER_S)  # serve first, then publish (module docstring)

            try:  # forgets in this server's threads queue on the ledger's lock, as those of other processes do
                t0 = time.perf_counter()
                forget_ids(state, ids, on_honoured=honoured, texts=True)
                log.info("forget done in %.3fs", time.perf_counter() - t0)
            except (UnknownExampleError, ValueError) as exc:
                if not answer.done():
                    loop.call_soon_threadsafe(answer.set_exception, BadInput(str(exc)))
            except BaseException as exc:  # after the honour: publishing or erasure failed; the next command retries
                log.warning("after honouring, publishing or erasure failed: %s", " ".join(str(exc).split()))
                if not answer.done():
                    loop.call_soon_threadsafe(answer.set_exception, exc)

        threading.Thread(target=run, name="s3t-forget", daemon=True).start()
        try:
            receipt = await answer
        except BadInput as exc:
            return refuse(exc.status, str(exc))
        except BaseException as exc:
            return refuse(500, f"forget failed: {exc}", "INTERNAL_ERROR")
        return {"plan_id": receipt.plan_id, "new": len(receipt.new), "already": len(receipt.already),
                "dirty": [list(d) for d in receipt.dirty]}

    return app


def serve(state_dir: str | Path, host: str = "127.0.0.1", port: int = 5001, config: ServerConfig | None = None,
          ready=None) -> None:
    """Open the state (repairing it first: the pointer names the ledger's current plan), then serve until SIGTERM
    (in-flight requests are answered first) or SIGINT."""
    import uvicorn

    from s3t_ops.engine import S3T

    engine = S3T.open(state_dir, progress=False)
    app = build_app(engine, config)
    plan_id, _ = app.state.plans.current()
    log.info("serving %s: plan %s, %d checkpoint(s) in memory", state_dir, plan_id, app.state.plans.in_memory())
    if ready is not None:
        ready(plan_id)
    # uvicorn answers SIGTERM with a graceful stop (in-flight requests answered, then the batcher drains), then raises
    # the signal again under the handler found before it: this one makes that a clean exit (0), not a kill
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30, access_log=False)
