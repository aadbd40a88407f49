"""flows/supervise.py and `make up`'s list of programs, without Prefect or MLflow.

The config tests read what flows/supervise.py writes with supervisord's own parser. The others run
a real supervisord in a tmp folder with small stand-in programs (Python's http.server on free
loopback ports, sleepers), and always stop it and everything it started, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from supervisor.options import ClientOptions, ServerOptions

from flows.servers import Layout, http_ok
from flows.supervise import Program, ServerError, Supervisor, alive, down, status, up
from tests.team_support import free_port

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


def web(name: str, port: int, **kwargs) -> Program:
    """Python's http.server on ``port``: it answers once GET / does."""
    return Program(
        name=name,
        command=[sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        url=f"http://127.0.0.1:{port}",
        answers=lambda _: http_ok(f"http://127.0.0.1:{port}/"),
        owns_port=True,
        **kwargs,
    )


def parsed(sup: Supervisor) -> ServerOptions:
    """supervisord's reading of the config ``sup`` writes."""
    sup.run_dir.mkdir(parents=True, exist_ok=True)
    sup.conf.write_text(sup.config())
    options = ServerOptions()
    options.configfile = str(sup.conf)
    options.process_config(do_usage=False)
    return options


# --- the config, no processes -----------------------------------------------------------------


def test_the_config_says_what_supervisord_reads(tmp_path):
    sup = Supervisor(
        run_dir=tmp_path / "run dir",
        cwd=tmp_path,
        programs=(
            Program(
                name="one",
                command=[sys.executable, "-c", "print('100% sure, with spaces')"],
                env={"A_URL": "http://h:1/x?a=1,b=2", "PERCENT": "50%", "QUOTE": 'say "hi" twice'},
                stop_timeout_s=7,
            ),
            Program(name="two", command=SLEEP, after=("one",), autorestart=True),
        ),
    )
    options = parsed(sup)
    assert options.pidfile == str(sup.run_dir / "supervisord.pid")
    assert options.logfile == str(sup.log)
    (server,) = options.configroot.supervisord.server_configs
    assert (server["file"], server["chmod"]) == (str(sup.socket), 0o700)

    groups = {g.name: g for g in options.process_group_configs}
    (one,) = groups["one"].process_configs
    assert shlex.split(one.command) == sup.programs[0].command  # as supervisord splits it
    assert one.environment == {
        "A_URL": "http://h:1/x?a=1,b=2",
        "PERCENT": "50%",
        "QUOTE": 'say "hi" twice',
    }
    assert (one.directory, one.stdout_logfile) == (str(tmp_path), str(sup.run_dir / "one.log"))
    assert (one.autostart, one.autorestart, one.startsecs, one.startretries) == (False, False, 0, 0)
    assert (one.stopasgroup, one.killasgroup, one.stopwaitsecs) == (True, True, 7)
    assert one.stopsignal == signal.SIGTERM and one.redirect_stderr

    client = ClientOptions()  # supervisorctl -c <the config> finds the same socket
    client.configfile = str(sup.conf)
    client.process_config(do_usage=False)
    assert client.serverurl == f"unix://{sup.socket}"

    (two,) = groups["two"].process_configs
    assert two.autorestart and two.stdout_logfile == str(sup.log_file("two"))
    assert two.environment == {}  # none of its own: it inherits supervisord's


def test_values_supervisord_cannot_hold_are_refused(tmp_path):
    for env in ({"BOTH": "a\"b'c"}, {"EDGE": '"quoted"'}, {"LINES": "a\nb"}):
        sup = Supervisor(tmp_path, (Program("p", SLEEP, env=env),), cwd=tmp_path)
        with pytest.raises(ValueError, match="cannot hold"):
            sup.config()


def test_after_orders_the_start_in_waves(tmp_path):
    def program(name: str, *after: str) -> Program:
        return Program(name, SLEEP, after=after)

    db, api, tracking, workers = (
        program("db"),
        program("api", "db"),
        program("tracking", "db"),
        program("workers", "api"),
    )
    sup = Supervisor(tmp_path, (workers, api, tracking, db), cwd=tmp_path)
    assert [[p.name for p in wave] for wave in sup.waves()] == [
        ["db"],
        ["api", "tracking"],
        ["workers"],
    ]
    assert [p.name for p in sup.stop_order()] == ["workers", "tracking", "api", "db"]
    with pytest.raises(ValueError, match="cycle"):
        Supervisor(tmp_path, (program("a", "b"), program("b", "a")), cwd=tmp_path)
    with pytest.raises(ValueError, match="names no program"):
        Supervisor(tmp_path, (program("a", "nobody"),), cwd=tmp_path)
    with pytest.raises(ValueError, match="unique"):
        Supervisor(tmp_path, (program("a"), program("a")), cwd=tmp_path)


def test_make_up_runs_the_two_servers_then_the_deployments(tmp_path):
    layout = Layout(run_dir=tmp_path / ".run", mlruns=tmp_path / "mlruns", prefect_port=4300)
    sup = layout.supervisor()
    by_name = {p.name: p for p in sup.programs}
    assert [[p.name for p in wave] for wave in sup.waves()] == [
        ["prefect-server", "mlflow-server"],
        ["deployments"],
    ]
    assert by_name["prefect-server"].owns_port and by_name["mlflow-server"].owns_port
    assert not by_name["deployments"].owns_port  # it takes no port: its check is the API's
    assert "4300" in by_name["prefect-server"].command
    for program in sup.programs:
        assert program.env["PREFECT_API_URL"] == "http://127.0.0.1:4300/api"
        assert program.env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
        assert program.env["PREFECT_HOME"] == str(tmp_path / ".run" / "prefect")
        assert program.stop_timeout_s == 60
    groups = {g.name for g in parsed(sup).process_group_configs}
    assert groups == set(by_name)


# --- a real supervisord -----------------------------------------------------------------------


@pytest.fixture
def supervised(tmp_path) -> Iterator[Callable[..., Supervisor]]:
    """Make Supervisors in ``tmp_path``; afterwards stop each one and all it started, and fail if
    anything was left running."""
    made: list[Supervisor] = []

    def make(*programs: Program, run_dir: Path | None = None) -> Supervisor:
        sup = Supervisor(run_dir or tmp_path / ".run", programs, cwd=tmp_path)
        made.append(sup)
        return sup

    try:
        yield make
    finally:
        left = []
        for sup in made:
            pid = sup.pid()
            down(sup)
            for procs in sup.orphans().values():  # after down, nothing should carry its socket
                left += procs
            if pid is not None:
                assert not sup.pid(), "supervisord still answers after down"
                with contextlib.suppress(psutil.NoSuchProcess):
                    assert not alive(psutil.Process(pid)), "supervisord still runs after down"
        for proc in left:
            proc.kill()
        assert not left, f"still running after down: {[p.cmdline() for p in left]}"


def lines_of(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_up_starts_in_order_waits_and_down_stops_everything(
    supervised, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # paths under it are shown relative, as in the checkout
    port = free_port()
    # It checks, on start, that the web server already answers: `after` makes that so.
    check = f"import urllib.request, time; urllib.request.urlopen('http://127.0.0.1:{port}/'); time.sleep(600)"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    sup = supervised(
        web("web", port),
        Program("client", [sys.executable, "-c", check], after=("web",), url="client"),
        *[Program(f"worker-{i}", SLEEP, after=("web",)) for i in range(2)],
        # It spawns a child, ignores SIGTERM, and is stopped with its child all the same.
        Program(
            "stubborn",
            ["sh", "-c", f"sleep 600 & exec {sys.executable} -c '{stubborn}'"],
            stop_timeout_s=1,
        ),
    )
    names = ["web", "client", "worker-0", "worker-1", "stubborn"]
    pids = up(sup, timeout_s=30)
    out = lines_of(capsys)
    assert out[0].startswith("supervisord: started (pid ")
    ready = next(i for i, line in enumerate(out) if line.startswith("web: ready after"))
    assert out[ready].endswith(f" s: http://127.0.0.1:{port}")
    later = [i for i, line in enumerate(out) if line.startswith(("client: ", "worker-"))]
    assert min(later) > ready  # the second wave started once web answered
    started = [line.split(":")[0] for line in out if ": started (pid" in line]
    assert started == ["supervisord", "web", "stubborn", "client", "worker-0", "worker-1"]
    assert f"worker-1: started (pid {pids['worker-1']}, log .run/worker-1.log)" in out
    assert set(pids) == set(names)

    assert up(sup, timeout_s=30) == pids  # nothing started twice
    out = lines_of(capsys)
    assert sum("already running" in line for line in out) == 6  # supervisord and the 5 programs

    assert status(sup)
    out = lines_of(capsys)
    assert out[0].startswith("supervisord     RUNNING  pid ")
    assert out[1].startswith(f"web             RUNNING  pid {pids['web']:<7d} up 0:00:")
    assert out[1].endswith(f"http://127.0.0.1:{port}  answers")
    assert [line.split()[0] for line in out[1:]] == names

    os.killpg(pids["worker-1"], signal.SIGKILL)  # one dies
    wait_for(lambda: sup.processes()["worker-1"]["statename"] == "EXITED")
    assert not status(sup)
    (line,) = [line for line in lines_of(capsys) if line.startswith("worker-1")]
    assert line.startswith("worker-1        EXITED   ") and "(log .run/worker-1.log)" in line
    again = up(sup, timeout_s=30)
    out = lines_of(capsys)
    assert [line.split(":")[0] for line in out if ": started (pid" in line] == ["worker-1"]
    assert {n: p for n, p in again.items() if n != "worker-1"} == {
        n: p for n, p in pids.items() if n != "worker-1"
    }
    family = [psutil.Process(pid) for pid in again.values()]
    family += [c for p in family for c in p.children(recursive=True)]
    assert len(family) == len(names) + 1  # stubborn's child

    stopped = down(sup)
    out = lines_of(capsys)
    order = [line.split(":")[0] for line in out]
    assert order == ["worker-1", "worker-0", "client", "stubborn", "web", "supervisord"]
    assert any(
        line.startswith("stubborn: stopped pid") and "SIGKILL after 1 s" in line for line in out
    )
    assert set(again.values()) <= set(stopped)
    assert not [p for p in family if alive(p)]
    assert sup.pid() is None and not sup.orphans()
    assert (tmp_path / ".run" / "web.log").exists()  # logs (and data) stay

    status(sup)
    assert lines_of(capsys) == ["supervisord     not running"] + [f"{n:15s} stopped" for n in names]
    down(sup)
    assert lines_of(capsys) == ["supervisord: not running"]


def wait_for(predicate, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_program_that_exits_fails_with_its_log(supervised):
    crash = "import sys; print('no database here', flush=True); sys.exit(3)"
    sup = supervised(Program("crash", [sys.executable, "-c", crash], answers=lambda _: False))
    with pytest.raises(ServerError) as failed:
        up(sup, timeout_s=30)
    message = str(failed.value)
    assert message.startswith("crash: exited before answering (Bad exit code 3); the end of")
    assert message.endswith("no database here")


def test_a_program_that_never_answers_times_out_and_down_stops_it(supervised):
    sup = supervised(Program("mute", SLEEP, answers=lambda _: False))
    with pytest.raises(ServerError, match=r"mute: no answer after 1 s \(pid \d+ still runs"):
        up(sup, timeout_s=1)
    assert sup.processes()["mute"]["statename"] == "RUNNING"


def test_a_port_that_answers_before_its_program_starts(supervised, tmp_path):
    port = free_port()
    other = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/"))
        sup = supervised(web("web", port))
        with pytest.raises(ServerError, match="already answers, but not from a process of ours"):
            up(sup, timeout_s=30)
    finally:
        other.kill()
        other.wait()


def test_other_settings_while_running_are_refused(supervised, tmp_path, capsys):
    first = supervised(Program("sleeper", SLEEP))
    up(first, timeout_s=30)
    changed = supervised(Program("sleeper", [*SLEEP, "changed"]))
    with pytest.raises(ServerError, match="runs sleeper with other settings"):
        up(changed, timeout_s=30)
    down(first)
    up(changed, timeout_s=30)  # nothing runs: supervisord starts afresh on the new config
    assert "changed" in changed.conf.read_text()
    assert "supervisord: started" in capsys.readouterr().out


def test_a_killed_supervisord_leaves_orphans_that_down_stops(supervised, capsys):
    port = free_port()
    sup = supervised(web("web", port), Program("sleeper", SLEEP, after=("web",)))
    pids = up(sup, timeout_s=30)
    os.kill(sup.pid(), signal.SIGKILL)
    wait_for(lambda: sup.pid() is None)
    assert sup.socket.exists()  # stale
    capsys.readouterr()

    assert not status(sup)
    assert lines_of(capsys) == [
        "supervisord     not running",
        f"web             ORPHANED pid {pids['web']}: its supervisord died; `make down` stops it",
        f"sleeper         ORPHANED pid {pids['sleeper']}: its supervisord died; `make down` stops it",
    ]
    with pytest.raises(
        ServerError, match="web, sleeper still run, left by a supervisord that died"
    ):
        up(sup, timeout_s=30)

    assert sorted(down(sup)) == sorted(pids.values())
    assert lines_of(capsys) == [
        "supervisord: not running (stale socket removed)",
        f"sleeper: stopped pid {pids['sleeper']} (1 process(es))",
        f"web: stopped pid {pids['web']} (1 process(es))",
    ]
    assert not sup.orphans() and not sup.socket.exists()
    up(sup, timeout_s=30)  # and it starts cleanly again
    assert status(sup)
