"""The framework's ceiling for benchmarks/serve_load.py: FastAPI under uvicorn, run exactly as
serving/app.py runs (``serving.workers.run_server``, serve.http's parser), with a
``POST /predict`` that reads the body and returns a constant.

``model_app`` is the ceiling of any server that runs the champion on this stack, for
benchmarks/serve_wrk.py: the same endpoint, but it parses the body, runs the champion's served
export and answers as the project's server does, with none of the project's own work (no
inference log, metrics, size limit or model polling). The project's server against it is what the
project itself costs; it against the constant is what the model costs.
"""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

app = FastAPI()


@app.get("/ready")
async def ready() -> dict[str, bool]:
    return {"ready": True}


@app.post("/predict")
async def predict(request: Request) -> dict[str, int]:
    await request.body()
    return {"digit": 0}


def constant_app() -> FastAPI:
    return app


def model_app() -> FastAPI:
    """The constant endpoint plus the model (see above), for ``--factory``: the champion named by
    ``MNIST_BENCH_PARAMS``' register and serve sections (default params.yaml), loaded once."""
    import os

    from pipelines import tracking
    from pipelines.config import load_params
    from serving.champion import Champion
    from serving.parsing import parse_instances
    from serving.routes import json_response, predict_answer

    params = load_params(os.environ.get("MNIST_BENCH_PARAMS", "params.yaml"))
    register, serve = params.register, params.serve
    tracking.use_store()
    champion = Champion(register.model_name, register.champion_alias, serve.format, serve.threads)
    if not champion.refresh():
        raise RuntimeError(f"the model baseline has no champion: {champion.last_error}")
    loaded = champion.current

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        champion.stop()  # its download folder goes with it

    model = FastAPI(lifespan=lifespan)
    model.get("/ready")(ready)

    @model.post("/predict")
    async def predict(request: Request):
        probs = loaded.predictor.predict(parse_instances(await request.body(), serve.max_batch))
        return json_response(predict_answer(loaded.version, probs))

    return model


def main() -> None:
    from pipelines.config import load_params
    from serving.workers import run_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--http", default=load_params("params.yaml").serve.http, help="default: serve.http"
    )
    args = parser.parse_args()
    target = app if args.workers == 1 else "benchmarks.constant_app:constant_app"
    run_server(target, "127.0.0.1", args.port, args.workers, log_level="warning", http=args.http)


if __name__ == "__main__":
    main()
