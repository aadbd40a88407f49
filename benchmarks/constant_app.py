"""The framework's ceiling for benchmarks/serve_load.py: FastAPI under uvicorn, run exactly as
serving/app.py runs (``serving.workers.run_server``, serve.http's parser), with a
``POST /predict`` that reads the body and returns a constant."""

from __future__ import annotations

import argparse

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
