"""The framework's ceiling for benchmarks/serve_load.py: FastAPI under uvicorn, run exactly as
serving/app.py runs, with a ``POST /predict`` that reads the body and returns a constant."""

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


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
