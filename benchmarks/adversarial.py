"""Benchmark: adversarial training against plain training, on the same budget.

Baseline: PLAIN, the train stage's settings (params.yaml's train and augment sections with the
tune stage's chosen overrides, ``adversarial.enabled: false``). Compared: ADVERSARIAL, the same settings and epochs with
``adversarial.enabled: true`` (params.yaml's epsilon and ratio, or ``--epsilon``/``--ratio``).
Each arm trains in a fresh process on the full training data (or ``--images``), one after the
other. Printed for each: clean test accuracy and test accuracy under FGSM at
``--epsilons`` on the full test set, training time, and the differences.

    python -m benchmarks.adversarial                       # both arms, params.yaml's epochs (~30 min)
    python -m benchmarks.adversarial --baseline data/model/model.keras
        # PLAIN = the pipeline's trained model: valid only while `dvc status train` is clean,
        # i.e. it was trained with these very settings
    python -m benchmarks.adversarial --images 3000 --epochs 1   # a quick look (tests use this)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EPSILONS = (0.05, 0.1, 0.2)


def arm(args: argparse.Namespace, adversarial: bool, model_out: Path) -> dict:
    """Train one arm (in this process) and score it; returns the JSON-able result."""
    from pipelines.config import load_params
    from pipelines.data import load_raw
    from pipelines.train import train_model, tuned_settings

    params = load_params(args.params)
    policy = params.augment  # what the augment stage writes to policy.json
    if Path(args.best_params).exists():
        params, policy = tuned_settings(params, policy, Path(args.best_params))
    update = {"max_images": args.images}
    if args.epochs:
        update.update(epochs=args.epochs)
    train = params.train.model_copy(update=update)
    settings = params.adversarial.model_copy(
        update={
            "enabled": adversarial,
            **({"epsilon": args.epsilon} if args.epsilon else {}),
            **({"ratio": args.ratio} if args.ratio else {}),
        }
    )
    data = load_raw(Path(args.raw), params.ingest.file_names)
    start = time.perf_counter()
    result = train_model(train, policy, data.x_train, data.y_train, adversarial=settings)
    seconds = time.perf_counter() - start
    result.model.save(model_out)
    return score(result.model, data, args.epsilons, params.evaluate) | {
        "train_seconds": seconds,
        "epochs_run": len(result.history.get("loss", [])),
        "adversarial": settings.model_dump(),
        "train_images": int(train.max_images or len(data.x_train)),
    }


def score(model, data, epsilons: list[float], evaluate) -> dict:
    from pipelines.insight import fgsm
    from pipelines.model import predict_probabilities

    probs = predict_probabilities(model, data.x_test, evaluate.batch_size)
    return {
        "clean_accuracy": float((probs.argmax(axis=1) == data.y_test).mean()),
        "fgsm_accuracy": {
            str(e): a
            for e, a in fgsm(
                model, data.x_test, data.y_test, epsilons, evaluate.insight_batch_size
            ).items()
        },
    }


def run_arm(args: argparse.Namespace, adversarial: bool, tmp: Path) -> dict:
    out = tmp / f"{'adversarial' if adversarial else 'plain'}.json"
    argv = [sys.executable, "-m", "benchmarks.adversarial", "--worker", "--result", str(out)]
    argv += ["--adversarial"] if adversarial else []
    for key in ("params", "best_params", "raw", "images", "epochs", "epsilon", "ratio"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    argv += ["--epsilons", *map(str, args.epsilons)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(argv, env=env)
    if done.returncode != 0:
        raise SystemExit(
            f"the {'adversarial' if adversarial else 'plain'} arm failed (exit {done.returncode})"
        )
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--best-params",
        default="data/tune/best_params.json",
        help="the tune stage's overrides; a missing file (e.g. 'none'): params.yaml as it is",
    )
    parser.add_argument("--raw", default="data/dataset")
    parser.add_argument("--images", type=int, default=0, help="training images (0 = all)")
    parser.add_argument("--epochs", type=int, default=0, help="0 = params.yaml's train.epochs")
    parser.add_argument("--epsilon", type=float, default=0.0, help="0 = params.yaml's")
    parser.add_argument("--ratio", type=float, default=0.0, help="0 = params.yaml's")
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    parser.add_argument("--baseline", help="a saved .keras model to score as the PLAIN arm")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adversarial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        result = arm(args, args.adversarial, Path(args.result).with_suffix(".keras"))
        Path(args.result).write_text(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            import keras

            from pipelines.config import load_params
            from pipelines.data import load_raw

            data = load_raw(Path(args.raw), load_params(args.params).ingest.file_names)
            plain = score(keras.models.load_model(args.baseline), data, args.epsilons)
            plain |= {"train_seconds": float("nan"), "epochs_run": 0, "source": args.baseline}
        else:
            plain = run_arm(args, False, Path(tmp))
        adversarial = run_arm(args, True, Path(tmp))

    settings = adversarial["adversarial"]
    print(
        f"\n{adversarial['train_images']} training images, {adversarial['epochs_run']} epochs; "
        f"adversarial: FGSM eps {settings['epsilon']:g} on {settings['ratio']:.0%} of each batch; "
        f"accuracy on the full test set"
    )
    header = f"{'arm':12} {'clean':>8} " + " ".join(
        f"{'eps ' + f'{e:g}':>9}" for e in args.epsilons
    )
    print(header + f" {'train s':>8}")
    for name, r in (
        ("plain" + (" (given)" if args.baseline else ""), plain),
        ("adversarial", adversarial),
    ):
        cells = " ".join(f"{r['fgsm_accuracy'][str(e)]:9.2%}" for e in args.epsilons)
        print(f"{name:12} {r['clean_accuracy']:8.2%} {cells} {r['train_seconds']:8.0f}")
    diff = " ".join(
        f"{100 * (adversarial['fgsm_accuracy'][str(e)] - plain['fgsm_accuracy'][str(e)]):+8.2f}p"
        for e in args.epsilons
    )
    clean = 100 * (adversarial["clean_accuracy"] - plain["clean_accuracy"])
    print(f"{'difference':12} {clean:+7.2f}p {diff}", end="")
    if plain["train_seconds"] == plain["train_seconds"]:  # not NaN
        print(f" {adversarial['train_seconds'] / plain['train_seconds']:7.2f}x")
    else:
        print()


if __name__ == "__main__":
    main()
