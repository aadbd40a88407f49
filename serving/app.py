"""The REST API and drawing page serving ``models:/mnist-classifier@champion``.

    make serve                      # http://127.0.0.1:8000 (PORT=... to change it)
    python -m serving.app --port 8001 --workers 2   # one process (and model) per worker

Endpoints (errors are JSON ``{"error": message, "field": name}``: 4xx for bad input, 503 from the
predict endpoints while no model is loaded; ``/ready`` says 503 ``{"ready": false, "reason": ...}``):
  POST /v1/models/mnist-classifier:predict  TensorFlow Serving's REST predict API (row format)
  POST /predict                             the same body; digit, probabilities and model version
  POST /predict/image                       an uploaded PNG/JPEG of one digit (MNIST preprocessing)
  POST /predict/number                      an uploaded PNG/JPEG of a whole number: each digit's
                                            box, reading and runner-up (pipelines.segment)
  POST /feedback                            a corrected digit, queued for review in
                                            data/incoming/pending/ (the page's "correct" button);
                                            needs MNIST_SERVE_TOKEN when set (and it must be set
                                            whenever the server binds beyond loopback)
  GET  /health  /ready  /model              liveness, readiness (503 until loaded), what is served
  GET  /metrics                             Prometheus' text format (serving.metrics; serve.metrics)
  GET|POST /v2/...                          the Open Inference Protocol (v2): serving.oip
  GET  /                                    the drawing page
Here the application is put together and started; the routes are ``serving.routes``, reading
request bodies ``serving.parsing``, the error format ``serving.errors``, the size limit
``serving.limits``, model loading and hot reload ``serving.champion``, preprocessing
``serving.preprocess``, worker processes ``serving.workers``, inference ``pipelines.runtime``,
the metrics ``serving.metrics`` and the inference log ``serving.inference_log``.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from pipelines.config import Params, ServeParams, load_params
from pipelines.merge import INCOMING_DIR
from serving.batching import Batcher
from serving.champion import Champion
from serving.errors import add_error_handlers
from serving.inference_log import InferenceLog
from serving.limits import BodyLimit
from serving.metrics import MULTIPROC_ENV, RequestMetrics, ServerMetrics
from serving.routes import UPLOAD_PATHS, add_routes
from serving.shadow import Shadow
from serving.workers import run_server

TOKEN_ENV = "MNIST_SERVE_TOKEN"  # the write token; from the environment, never from a file in git


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def create_app(
    params: Params,
    champion: Champion | None = None,
    poll: bool = True,
    incoming_dir: Path = INCOMING_DIR,
    log_dir: Path | None = None,
    write_token: str | None = None,
) -> FastAPI:
    """The application. ``champion`` defaults to ``models:/<register.model_name>@<champion_alias>``;
    corrections (POST /feedback) are saved under ``incoming_dir`` for the merge stage, and the
    inference log goes to ``log_dir`` (default ``serve.log_dir``). ``write_token`` (default:
    MNIST_SERVE_TOKEN from the environment) is what POST /feedback requires when given."""
    serve: ServeParams = params.serve
    name = params.register.model_name
    champion = champion or Champion(
        name, params.register.champion_alias, serve.format, serve.threads, serve.poll_interval_s
    )
    metrics = ServerMetrics() if serve.metrics else None
    if metrics is not None:
        champion.on_loaded.append(lambda m: metrics.now_serving(m.name, m.version, m.format))
        champion.on_failure.append(lambda _: metrics.reload_failures.inc())
    inference_log = None
    if serve.log_inference:
        inference_log = InferenceLog(
            Path(log_dir or serve.log_dir),
            max_bytes=int(serve.log_max_mb * 1e6),
            flush_interval_s=serve.log_flush_s,
            keep_images=serve.log_images,
            on_drop=metrics.log_dropped.inc if metrics is not None else None,
        )
    shadow = None
    if serve.shadow:  # a second model, on serve.shadow's alias, scoring each answer in a thread
        shadow_model = Champion(
            name, serve.shadow, serve.format, serve.threads, serve.poll_interval_s, required=False
        )
        shadow = Shadow(
            shadow_model,
            forward=inference_log.record if inference_log is not None else None,
            on_scored=metrics.shadow_scored if metrics is not None else None,
            on_drop=metrics.shadow_dropped.inc if metrics is not None else None,
        )
        if metrics is not None:
            shadow_model.on_loaded.append(
                lambda m: metrics.now_shadowing(name, serve.shadow, m.version if m else None)
            )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from pipelines import tracking

        tracking.use_store()
        if inference_log is not None:
            inference_log.start()
        champion.refresh()  # a failure leaves /ready at 503 with the reason; polling retries
        if shadow is not None:
            shadow.model.refresh()
            shadow.start()
        if poll:
            champion.start()
            if shadow is not None:
                shadow.model.start()
        if serve.freeze_gc:
            # The libraries and the model make a few hundred thousand objects that live as long
            # as the server. Each full pass of the cyclic collector walked them all while the
            # event loop, and every request in flight, waited; frozen, they are not walked again
            # (docs/results/2026-12-03-serving-gc.md).
            gc.collect()
            gc.freeze()
        yield
        if serve.freeze_gc:
            gc.unfreeze()  # an app made in a process that goes on (tests) leaves nothing pinned
        champion.stop()
        if shadow is not None:  # before the log, which it hands its last answers to
            shadow.stop()
            shadow.model.stop()
        if inference_log is not None:
            inference_log.stop()  # what is queued is written before the process goes
        if metrics is not None:
            metrics.process_exited()

    app = FastAPI(
        title="MNIST digit classifier",
        description=f"Serves models:/{name}@{params.register.champion_alias}.",
        lifespan=lifespan,
    )
    app.state.champion = champion
    app.state.metrics, app.state.inference_log, app.state.shadow = metrics, inference_log, shadow
    add_error_handlers(app)
    token = write_token or os.environ.get(TOKEN_ENV) or None
    batcher = None
    if serve.batch_requests:
        batcher = Batcher(serve.batch_max_images, serve.max_batch_wait_ms / 1000)
    add_routes(
        app,
        serve,
        name,
        champion,
        incoming_dir,
        metrics,
        inference_log,
        token,
        shadow,
        batcher,
        params.numbers.segment,
    )
    app.add_middleware(
        BodyLimit,
        max_body_bytes=serve.max_body_bytes,
        max_upload_bytes=serve.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
    )
    if metrics is not None:  # outermost, so a 413 from the size limit is counted as well
        endpoints = frozenset(getattr(route, "path", "") for route in app.routes)
        app.add_middleware(RequestMetrics, metrics=metrics, endpoints=endpoints)
    return app


def app_from_environment() -> FastAPI:
    """The application for one of several worker processes (``--workers`` above 1): each worker
    builds its own from the params file named in ``MNIST_SERVE_PARAMS`` and polls the alias
    itself (``MNIST_SERVE_INCOMING``: where corrections go)."""
    log_dir = os.environ.get("MNIST_SERVE_LOG_DIR")
    return create_app(
        load_params(os.environ.get("MNIST_SERVE_PARAMS", "params.yaml")),
        incoming_dir=Path(os.environ.get("MNIST_SERVE_INCOMING", INCOMING_DIR)),
        log_dir=Path(log_dir) if log_dir else None,
    )


def main() -> None:
    import argparse

    from pipelines.cli import configure_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument(
        "--workers", type=int, help="server processes, each with its own model (serve.workers)"
    )
    parser.add_argument(
        "--incoming",
        default=str(INCOMING_DIR),
        help=f"where POST /feedback saves corrected digits (default: {INCOMING_DIR})",
    )
    parser.add_argument("--log-dir", help="where the inference log goes (default: serve.log_dir)")
    args = parser.parse_args()
    configure_logging()
    # The server logs each model it loads; MLflow's download progress bar (tqdm) would add bars
    # to that log on every reload, and its multiprocessing lock, left in each worker, made Python
    # warn of "leaked semaphore objects" whenever a --workers 2 server stopped. Inherited by
    # the worker processes. Set MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true to have the bars back.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    params = load_params(args.params)
    host = args.host or params.serve.host
    port = args.port or int(os.environ.get("PORT", params.serve.port))
    workers = args.workers or params.serve.workers
    if not is_loopback(host) and not os.environ.get(TOKEN_ENV):
        parser.error(
            f"--host/serve.host is {host}, beyond loopback: set {TOKEN_ENV} to a secret, which "
            "POST /feedback will then require (Authorization: Bearer <token>)"
        )
    log_dir = Path(args.log_dir) if args.log_dir else None
    if workers == 1:
        app = create_app(params, incoming_dir=Path(args.incoming), log_dir=log_dir)
        run_server(app, host, port, http=params.serve.http)
        return
    os.environ["MNIST_SERVE_PARAMS"] = args.params
    os.environ["MNIST_SERVE_INCOMING"] = args.incoming
    if log_dir is not None:
        os.environ["MNIST_SERVE_LOG_DIR"] = str(log_dir)
    # Several workers: prometheus-client's multiprocess mode, in a folder of this server's own
    # (emptied at each start, as the values of a previous server would add to this one's).
    own_folder = params.serve.metrics and not os.environ.get(MULTIPROC_ENV)
    if own_folder:
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="mnist-serve-metrics-")
    try:
        run_server("serving.app:app_from_environment", host, port, workers, http=params.serve.http)
    finally:
        if own_folder:
            shutil.rmtree(os.environ.pop(MULTIPROC_ENV), ignore_errors=True)


if __name__ == "__main__":
    main()
