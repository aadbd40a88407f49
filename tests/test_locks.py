"""The registry lock (pipelines/locks.py) and the gate's critical section under it (promote).

Which lock a store gets; that a file lock and a PostgreSQL advisory lock each keep a second holder
out, say who holds them when a wait runs out, and are freed when their holder is killed; and that
writers racing through ``promote`` from several processes at once, against a real MLflow store
(sqlite, and PostgreSQL), leave one champion, the best one, with every decision on its version.
Only the scorer is a stand-in: a version's accuracy is a tag it was created with.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines import locks
from pipelines.locks import (
    ENV_VAR,
    HeldLock,
    LockLost,
    LockTimeout,
    advisory_key,
    advisory_lock,
    file_lock,
    lock_target,
    registry_lock,
)

REPO = Path(__file__).resolve().parents[1]
WRITERS = 6
ROUNDS = 3  # races of WRITERS writers each, per store


@pytest.fixture(autouse=True)
def no_lock_setting(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# --- which lock --------------------------------------------------------------------------------


def test_sqlite_store_locks_the_file_beside_its_database(tmp_path):
    assert lock_target(f"sqlite:///{tmp_path}/mlruns/mlflow.db") == (
        "file",
        f"{tmp_path}/mlruns/registry.lock",
    )


def test_postgres_store_takes_an_advisory_lock_in_its_own_database():
    url = "postgresql+psycopg://u:secret@db.example:5433/mlflow"
    assert lock_target(url) == ("postgresql", url)
    assert locks.libpq_url(url) == "postgresql://u:secret@db.example:5433/mlflow"


def test_file_store_locks_a_file_inside_it(tmp_path):
    assert lock_target(tmp_path.as_uri()) == ("file", f"{tmp_path}/registry.lock")


def test_the_setting_wins_over_the_store(monkeypatch, tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv(ENV_VAR, "postgresql://u:pw@10.0.0.1:5433/locks")
    assert lock_target(store) == ("postgresql", "postgresql://u:pw@10.0.0.1:5433/locks")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "shared.lock"))
    assert lock_target(store) == ("file", str(tmp_path / "shared.lock"))
    monkeypatch.setenv(ENV_VAR, (tmp_path / "shared.lock").as_uri())
    assert lock_target(store) == ("file", str(tmp_path / "shared.lock"))


def test_an_unknown_setting_is_refused_without_its_password(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "mysql://u:topsecret@host/db")
    with pytest.raises(ValueError, match=f"{ENV_VAR}=mysql://u:\\*\\*\\*@host/db") as err:
        lock_target("sqlite:///x/mlflow.db")
    assert "topsecret" not in str(err.value) and "postgresql://" in str(err.value)


def test_tracking_server_gets_a_machine_local_lock_and_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with caplog.at_level("WARNING", logger="pipelines.locks"):
        kind, path = lock_target("https://admin:pw@mlflow.example:5000")
    assert kind == "file" and Path(path).parent == tmp_path / "mnist-mlops" / "registry-locks"
    assert "this machine only" in caplog.text and ENV_VAR in caplog.text
    assert "pw@" not in caplog.text
    # the same server under another user's credentials: the same lock
    assert lock_target("https://reader:other@mlflow.example:5000")[1] == path
    assert lock_target("https://mlflow.example:5001")[1] != path


def test_advisory_key_is_stable_and_per_model():
    # Pinned: writers of two releases must agree on the key, or they would not exclude each other.
    assert advisory_key("mnist-classifier") == advisory_key("mnist-classifier")
    assert advisory_key("mnist-classifier") != advisory_key("mnist-classifier-smoke")
    assert -(2**63) <= advisory_key("mnist-classifier") < 2**63
    child = subprocess.run(
        [sys.executable, "-c", "from pipelines.locks import advisory_key as k; print(k('m'))"],
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "123"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(child.stdout) == advisory_key("m")


# --- each lock keeps a second holder out -------------------------------------------------------


def locker(kind: str, tmp_path: Path, postgres_url: str | None):
    """A function (model name, timeout) -> the lock of ``kind`` as a context manager."""
    if kind == "file":
        return lambda name, timeout: file_lock(tmp_path / "registry.lock", timeout, {"pid": 1})
    return lambda name, timeout: advisory_lock(postgres_url, name, timeout)


@pytest.fixture(params=["file", "postgresql"])
def kind_and_url(request, tmp_path):
    if request.param == "file":
        return "file", None
    cluster = request.getfixturevalue("postgres")
    return "postgresql", cluster.url("locks")


def test_second_holder_times_out_naming_the_lock(kind_and_url, tmp_path):
    kind, url = kind_and_url
    lock = locker(kind, tmp_path, url)
    errors = []

    def second():
        try:
            with lock("m-exclude", 0.3):
                errors.append("acquired while held")
        except LockTimeout as exc:
            errors.append(exc)

    with lock("m-exclude", 1) as held:
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], LockTimeout), errors
    message = str(errors[0])
    assert "still taken after waiting 0." in message and "timeout 0.3 s" in message
    if kind == "file":
        assert str(tmp_path / "registry.lock") in message and "held by pid 1" in message
        assert held.kind == "file"
    else:
        assert f"key {advisory_key('m-exclude')} (m-exclude) in database locks" in message
        assert "held by server pid" in message and "mnist registry lock" in message
        assert url.split(":")[2].split("@")[0] not in message  # no password
        assert held.kind == "postgresql-advisory"


def test_second_holder_waits_and_gets_it_once_released(kind_and_url, tmp_path):
    kind, url = kind_and_url
    lock = locker(kind, tmp_path, url)
    order = []

    def second():
        with lock("m-wait", 10) as held:
            order.append(("second", held.waited_s))

    with lock("m-wait", 1):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append(("first done", None))
    thread.join(10)
    assert [step for step, _ in order] == ["first done", "second"]
    assert order[1][1] >= 0.2


def test_advisory_locks_of_two_models_do_not_exclude_each_other(postgres):
    url = postgres.url("locks")
    with advisory_lock(url, "model-a", 1), advisory_lock(url, "model-b", 0.2) as held:
        held.check()


def test_advisory_lock_whose_session_ended_is_reported_lost(postgres):
    import psycopg

    url = postgres.url("locks")
    with advisory_lock(url, "m-lost", 1) as held:
        held.check()
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'mnist registry lock%%' AND pid <> pg_backend_pid()"
            )
        with pytest.raises(LockLost, match="m-lost"):
            held.check()
        # and someone else can take it now
        with advisory_lock(url, "m-lost", 5):
            pass


HOLD = """
import sys, time
from pipelines.locks import registry_lock
with registry_lock(sys.argv[1], 5, store_uri=sys.argv[2]) as held:
    print(held.kind, flush=True)
    time.sleep(120)
"""


def test_a_killed_holder_frees_the_lock(kind_and_url, tmp_path, monkeypatch):
    kind, url = kind_and_url
    store = f"sqlite:///{tmp_path}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if url:
        env[ENV_VAR] = url
        monkeypatch.setenv(ENV_VAR, url)
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, "m-killed", store],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() in {"file", "postgresql-advisory"}
        with pytest.raises(LockTimeout), registry_lock("m-killed", 0.2, store):
            pass
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        with registry_lock("m-killed", 10, store) as held:
            assert held.kind == ("file" if kind == "file" else "postgresql-advisory")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# --- writers racing through the gate ------------------------------------------------------------


def write_versions(job: dict) -> list[tuple[str, str]]:
    """One writer (in a pool process): for each round, create a version of that round's model,
    wait for the other writers, then run the gate's critical section. Returns (model, version)."""
    from mlflow.tracking import MlflowClient

    from pipelines.config import RegisterParams
    from pipelines.register import Evidence, promote

    uri = job["store"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    made = []
    for name, accuracy in zip(job["models"], job["accuracies"], strict=True):
        params = RegisterParams(
            model_name=name,
            champion_alias="champion",
            challenger_alias="challenger",
            min_accuracy=0.1,
            serve_check_images=1,
            max_served_drop=0.0,
            shadow_min_requests=0,
            shadow_min_agreement=0.0,
        )
        version = client.create_model_version(
            name, job["source"], tags={"fake_accuracy": str(accuracy)}, await_creation_for=0
        ).version

        def score(champion: str) -> tuple[float | None, str | None]:
            tags = client.get_model_version(name, champion).tags  # noqa: B023
            if job["between_read_and_write"] is not None:  # every writer has read the champion
                job["between_read_and_write"].wait(30)
            else:
                time.sleep(random.uniform(0, 0.02))  # widen the window between read and write
            return float(tags["fake_accuracy"]), None

        job["start"].wait(120)  # the first round waits for every process to import MLflow
        if job["locked"]:
            lock = registry_lock(name, 120, store_uri=uri)
        else:
            lock = contextlib.nullcontext(HeldLock("none", "no lock (test)"))
        promote(client, params, version, Evidence(candidate_accuracy=accuracy), score, lock=lock)
        made.append((name, version))
    return made


@pytest.fixture(scope="module")
def writers():
    """WRITERS processes (spawned: no state shared but the store and the lock) and a manager for
    their barriers."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(WRITERS) as pool:
        yield pool, manager


def race(writers, store: str, source: str, models: list[str], locked: bool) -> None:
    """Every writer registers one version of each model, all at once, each with its accuracy."""
    pool, manager = writers
    rng = random.Random(len(models))
    accuracies = {
        name: rng.sample([0.9 + i / 100 for i in range(WRITERS)], WRITERS) for name in models
    }
    start = manager.Barrier(WRITERS)
    between = None if locked else manager.Barrier(WRITERS)
    jobs = [
        {
            "store": store,
            "source": source,
            "models": models,
            "accuracies": [accuracies[name][i] for name in models],
            "locked": locked,
            "start": start,
            "between_read_and_write": between,
        }
        for i in range(WRITERS)
    ]
    made = [v for result in pool.map(write_versions, jobs, chunksize=1) for v in result]
    assert len(made) == WRITERS * len(models)


def problems(client, name: str, seeded: str | None = None) -> list[str]:
    """What is wrong with the outcome for ``name``: [] when the gate decided serially."""
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    expected = WRITERS + (1 if seeded else 0)
    found = []
    if len(versions) != expected:
        found.append(f"{len(versions)} versions of {name}, expected {expected}")
    accuracy = {v: float(mv.tags["fake_accuracy"]) for v, mv in versions.items()}
    best = max(accuracy, key=accuracy.get)
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    if champion != best:
        found.append(
            f"champion is v{champion} ({accuracy[champion]}), best v{best} ({accuracy[best]})"
        )
    beaten = []
    for v, mv in versions.items():
        if v == seeded:
            continue
        tags = mv.tags
        if not tags.get("reason") or tags.get("decision") not in {"champion", "challenger"}:
            found.append(f"v{v}: decision {tags.get('decision')!r}, reason {tags.get('reason')!r}")
            continue
        previous = tags["previous_champion"]
        if tags["decision"] == "champion":
            beaten.append(previous)
            if previous != "none" and accuracy[previous] >= accuracy[v]:
                found.append(f"v{v} took champion from the better v{previous}")
        elif previous not in accuracy or accuracy[previous] < accuracy[v]:
            found.append(f"v{v} is challenger to the worse v{previous}")
    twice = sorted({p for p in beaten if beaten.count(p) > 1})
    if twice:
        found.append(f"several versions became champion over the same champion: {twice}")
    return found


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """One sqlite store for the module (its schema takes seconds to create); tests use their own
    model names."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder}/mlruns/mlflow.db"
    (folder / "mlruns").mkdir()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_registered_models()  # creates the schema, before any writer opens the store
    return uri, client, folder


def test_racing_writers_on_sqlite_leave_one_champion_the_best(writers, sqlite_store, tmp_path):
    uri, client, folder = sqlite_store
    models = [f"race-sqlite-{r}" for r in range(ROUNDS)]
    for name in models:
        client.create_registered_model(name)
    race(writers, uri, tmp_path.as_uri(), models, locked=True)
    for name in models:
        assert problems(client, name) == [], name
        tags = client.get_model_version_by_alias(name, "champion").tags
        assert tags["gate_lock"] == f"file: {folder}/mlruns/registry.lock"


def test_racing_writers_on_postgres_leave_one_champion_the_best(writers, postgres, tmp_path):
    from mlflow.tracking import MlflowClient

    postgres.create_databases("race_mlflow")
    uri = postgres.url("race_mlflow")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    models = [f"race-pg-{r}" for r in range(ROUNDS)]
    for name in models:
        client.create_registered_model(name)
    race(writers, uri, tmp_path.as_uri(), models, locked=True)
    for name in models:
        assert problems(client, name) == [], name
        tags = client.get_model_version_by_alias(name, "champion").tags
        assert tags["gate_lock"].startswith(
            f"postgresql-advisory: key {advisory_key(name)} ({name}) in database race_mlflow"
        )


def test_without_the_lock_the_same_race_goes_wrong(writers, sqlite_store, tmp_path):
    # Given a champion, and writers that all read it before any of them writes (a barrier in the
    # scorer: the interleaving the lock forbids, made certain)
    uri, client, _ = sqlite_store
    name = "race-unlocked"
    client.create_registered_model(name)
    seed = client.create_model_version(name, tmp_path.as_uri(), tags={"fake_accuracy": "0.5"})
    client.set_registered_model_alias(name, "champion", seed.version)
    race(writers, uri, tmp_path.as_uri(), [name], locked=False)
    # Then every one of them became champion over the same champion: what the lock prevents
    found = problems(client, name, seeded=seed.version)
    assert any("several versions became champion over the same champion" in p for p in found)
