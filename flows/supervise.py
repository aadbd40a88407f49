"""Programs in the background under supervisord, started in order, each waited for until it answers.

supervisord (the ``supervisor`` package) does the process work: it starts each program in its own
process group with its output in a log file, knows their pids and states, and stops a program's
whole group with SIGTERM, then SIGKILL once the program's stop timeout has passed. This module
does what supervisord does not:

  * it writes supervisord's config (``<run_dir>/supervisord.conf``) from a list of ``Program``s,
    starts supervisord when it does not run, and talks to it over its unix socket (XML-RPC);
  * it starts the programs in order: one starts when the programs in its ``after`` answer;
  * it waits until each one answers, by the program's own check, and stops with its log's end if
    it exits first or takes too long;
  * it prints what it did, and says "already running" for what was running.

Adding a process is one more ``Program``. Everything else supervisord offers works on the same
daemon: ``supervisorctl -c <run_dir>/supervisord.conf status|tail -f NAME|restart NAME``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import psutil
from supervisor.xmlrpc import SupervisorTransport

POLL_S = 0.5
LAUNCH_TIMEOUT_S = 30.0  # supervisord itself: from its launch until its socket answers
UP_STATES = {"STARTING", "RUNNING"}


class ServerError(RuntimeError):
    """A process did not start or answer; the message says which and ends with its log."""


@dataclass(frozen=True)
class Program:
    """One background program: a [program:NAME] section of supervisord.conf, and its checks."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of supervisord's (the caller's)
    url: str = ""  # what `up` and `status` print
    # Given the time its process started: does it answer yet? None: it counts once it runs.
    answers: Callable[[float], bool] | None = None
    after: tuple[str, ...] = ()  # programs that must answer before this one starts
    # Its url is a port of its own: an answer there before it starts is some other process's.
    owns_port: bool = False
    stop_timeout_s: int = 60  # SIGTERM to its process group, then this long, then SIGKILL
    autorestart: bool = False  # False: one that dies stays down, and `status` says how it ended
    user: str | None = None  # run as this user (supervisord must run as root to switch)
    stop_signal: str = "TERM"  # e.g. INT: PostgreSQL's fast shutdown (TERM waits for clients)


def _quoted(value: str) -> str:
    """``value`` for supervisord's config: its ``%`` escaped, a line of its own."""
    if "\n" in value or "\r" in value:
        raise ValueError(f"supervisord.conf cannot hold a value with a line break: {value!r}")
    return value.replace("%", "%%")


def _env_value(key: str, value: str) -> str:
    """KEY="value" as supervisord's environment= parses it (quotes kept whole, no escapes)."""
    quote = '"' if '"' not in value else "'"
    if quote in value or value != value.strip("'\""):
        raise ValueError(f"supervisord's environment= cannot hold {key}={value!r}")
    return f"{key}={quote}{_quoted(value)}{quote}"


@dataclass(frozen=True)
class Supervisor:
    """A supervisord for ``programs``, its config, socket, pid file and logs in ``run_dir``."""

    run_dir: Path
    programs: tuple[Program, ...]
    cwd: Path  # where the programs run

    def __post_init__(self) -> None:
        names = [p.name for p in self.programs]
        if len(set(names)) != len(names):
            raise ValueError(f"program names must be unique: {names}")
        for program in self.programs:
            unknown = set(program.after) - set(names)
            if unknown:
                raise ValueError(f"{program.name}: 'after' names no program: {sorted(unknown)}")
        self.waves()  # raises on a cycle

    @property
    def conf(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def server_url(self) -> str:
        """supervisord passes it to every process it starts, as SUPERVISOR_SERVER_URL."""
        return f"unix://{self.socket}"

    @property
    def log(self) -> Path:
        return self.run_dir / "supervisord.log"

    def log_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def waves(self) -> list[list[Program]]:
        """The programs in start order: each wave starts once every earlier wave answers."""
        waves, placed, left = [], set(), list(self.programs)
        while left:
            wave = [p for p in left if set(p.after) <= placed]
            if not wave:
                raise ValueError(f"'after' makes a cycle among {[p.name for p in left]}")
            waves.append(wave)
            placed |= {p.name for p in wave}
            left = [p for p in left if p.name not in placed]
        return waves

    def stop_order(self) -> list[Program]:
        return [p for wave in reversed(self.waves()) for p in reversed(wave)]

    def config(self) -> str:
        """supervisord.conf: the daemon on a private unix socket; every program off until asked."""
        run = _quoted(str(self.run_dir))
        lines = [
            "; Written by flows/supervise.py on each start of supervisord: edit the Program list.",
            "[supervisord]",
            f"logfile={run}/supervisord.log",
            f"pidfile={run}/supervisord.pid",
            f"childlogdir={run}",
            "",
            "[unix_http_server]",
            f"file={_quoted(str(self.socket))}",
            "chmod=0700",
            "",
            "[supervisorctl]",
            f"serverurl=unix://{_quoted(str(self.socket))}",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        ]
        for p in self.programs:
            lines += ["", f"[program:{p.name}]", f"command={_quoted(shlex.join(p.command))}"]
            lines += [f"directory={_quoted(str(self.cwd))}"]
            if p.env:
                lines.append("environment=" + ",".join(_env_value(k, v) for k, v in p.env.items()))
            if p.user:
                lines.append(f"user={_quoted(p.user)}")
            lines += [
                # `up` starts each one in order, and waits for it, instead of supervisord at once.
                "autostart=false",
                f"autorestart={str(p.autorestart).lower()}",
                # RUNNING from its spawn: `up` has its own check of whether it works.
                "startsecs=0",
                "startretries=0",
                f"stopsignal={p.stop_signal}",
                f"stopwaitsecs={p.stop_timeout_s}",
                "stopasgroup=true",
                "killasgroup=true",
                "redirect_stderr=true",
                f"stdout_logfile={run}/{_quoted(p.name)}.log",
                "stdout_logfile_maxbytes=50MB",
                "stdout_logfile_backups=2",
            ]
        return "\n".join(lines) + "\n"

    # --- talking to supervisord --------------------------------------------------------------

    def rpc(self):
        """supervisord's XML-RPC namespace ``supervisor``, over the unix socket."""
        transport = SupervisorTransport(None, None, self.server_url)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def pid(self) -> int | None:
        """supervisord's pid if it answers on the socket; None if none does (or it is stale)."""
        try:
            return int(self.rpc().getPID())
        except (OSError, xmlrpc.client.Error):
            return None

    def processes(self) -> dict[str, dict]:
        """supervisord's info on every process it has, by process name; {} if it does not run."""
        try:
            return {info["name"]: info for info in self.rpc().getAllProcessInfo()}
        except (OSError, xmlrpc.client.Error):
            return {}

    def info(self, program: Program) -> dict | None:
        return self.processes().get(program.name)

    def orphans(self) -> dict[str, list[psutil.Process]]:
        """Live processes that a supervisord on this socket started while none answers on it,
        by process name: left by a supervisord that was killed. supervisord gives everything it
        starts these variables, and their children inherit them."""
        found: dict[str, list[psutil.Process]] = {}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                env = proc.environ()
                if env.get("SUPERVISOR_SERVER_URL") == self.server_url and alive(proc):
                    found.setdefault(env.get("SUPERVISOR_PROCESS_NAME", "?"), []).append(proc)
        return found

    def launch(self) -> int:
        """Write the config and start supervisord as a daemon; return its pid once it answers."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Programs' environments may carry secrets (the team profile's passwords): owner only.
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.config())
        self.conf.chmod(0o600)
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        # It forks into the background and this first process exits; a stale socket it removes.
        done = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)],
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=LAUNCH_TIMEOUT_S,
        )
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while done.returncode == 0 and time.monotonic() < deadline:
            pid = self.pid()
            if pid is not None:
                return pid
            time.sleep(POLL_S / 5)
        raise ServerError(
            f"supervisord did not start (exit {done.returncode}): {done.stdout}{done.stderr}"
            f"the end of {self.log}:\n{log_tail(self.log)}"
        )

    def shutdown(self) -> int | None:
        """Stop supervisord (and whatever it still runs); return its pid, None if it did not run."""
        pid = self.pid()
        if pid is None:
            return None
        with contextlib.suppress(OSError, xmlrpc.client.Error):
            self.rpc().shutdown()
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            # It stops what still runs first; a zombie counts as gone (no init may reap it).
            deadline = time.monotonic() + max(p.stop_timeout_s for p in self.programs) + 10
            while alive(proc) and time.monotonic() < deadline:
                time.sleep(POLL_S / 5)
        return pid


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def shown(path: Path) -> Path:
    """``path`` relative to the working folder when under it, as a user would type it."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def ensure_supervisord(sup: Supervisor) -> None:
    """supervisord runs with this very config afterwards, or this raises ServerError saying why."""
    pid = sup.pid()
    if pid is not None:
        if sup.conf.exists() and sup.conf.read_text() == sup.config():
            print(f"supervisord: already running (pid {pid})", flush=True)
            return
        running = [n for n, i in sup.processes().items() if i["statename"] in UP_STATES]
        if running:
            raise ServerError(
                f"supervisord (pid {pid}) runs {', '.join(running)} with other settings than "
                f"these ({sup.conf}): `make down` first, or give the settings (ports) it runs with"
            )
        sup.shutdown()  # nothing runs: start afresh on the new config
    orphans = sup.orphans()
    if orphans:
        raise ServerError(
            f"{', '.join(orphans)} still run, left by a supervisord that died (`make status` "
            "shows them): `make down` stops them"
        )
    pid = sup.launch()
    print(f"supervisord: started (pid {pid}, config {shown(sup.conf)})", flush=True)


def start(sup: Supervisor, program: Program) -> float:
    """Start ``program`` unless it runs; return the time its process started (for ``answers``)."""
    info = sup.info(program)
    if info is None:  # cannot be while supervisord runs this very config
        raise ServerError(f"{program.name}: supervisord (config {sup.conf}) has no such program")
    if info["statename"] in UP_STATES:
        print(f"{program.name}: already running (pid {info['pid']})", flush=True)
        return info["start"]
    if program.owns_port and program.answers and program.answers(0):
        raise ServerError(
            f"{program.name}: {program.url} already answers, but not from a process of ours "
            f"(supervisord runs no {program.name}): stop that process, or pick another port"
        )
    log = sup.log_file(program.name)
    with log.open("a") as f:  # where this start's output begins, in a log that runs on
        f.write(f"\n=== {datetime.now().isoformat(timespec='seconds')}: ")
        f.write(shlex.join(program.command) + "\n")
    try:
        sup.rpc().startProcess(program.name, False)
    except xmlrpc.client.Fault as fault:
        raise ServerError(
            f"{program.name}: supervisord could not start it ({fault.faultString}); the end of "
            f"{sup.log}:\n{log_tail(sup.log)}"
        ) from fault
    info = sup.info(program)
    print(f"{program.name}: started (pid {info['pid']}, log {shown(log)})", flush=True)
    return info["start"]


def wait_until_answers(sup: Supervisor, program: Program, started: float, timeout_s: float) -> None:
    """Block until ``program`` answers; raise with its log's end if it exits or takes too long."""
    t0, log = time.monotonic(), sup.log_file(program.name)
    while True:
        info = sup.info(program) or {"statename": "GONE", "spawnerr": "", "exitstatus": "?"}
        if info["statename"] not in UP_STATES:
            how = info["spawnerr"] or f"{info['statename']}, exit status {info['exitstatus']}"
            raise ServerError(
                f"{program.name}: exited before answering ({how}); "
                f"the end of {log}:\n{log_tail(log)}"
            )
        if program.answers is None or program.answers(started):
            break
        if time.monotonic() - t0 > timeout_s:
            raise ServerError(
                f"{program.name}: no answer after {timeout_s:.0f} s (pid {info['pid']} still "
                f"runs; `make down` stops it); the end of {log}:\n{log_tail(log)}"
            )
        time.sleep(POLL_S)
    print(f"{program.name}: ready after {time.monotonic() - t0:.0f} s: {program.url}", flush=True)


def up(sup: Supervisor, timeout_s: float) -> dict[str, int]:
    """Start supervisord and every program not running, wave by wave, each waited for until it
    answers (``timeout_s`` each); return {name: pid}."""
    ensure_supervisord(sup)
    for wave in sup.waves():  # the programs of one wave start side by side
        started = {p.name: start(sup, p) for p in wave}
        for program in wave:
            wait_until_answers(sup, program, started[program.name], timeout_s)
    return {name: info["pid"] for name, info in sup.processes().items()}


def stop_orphans(sup: Supervisor) -> list[int]:
    """Stop what a dead supervisord left, in stop order: SIGTERM, then SIGKILL after the
    program's stop timeout; return the pids stopped."""
    orphans, stopped = sup.orphans(), []
    for program in sup.stop_order():
        procs = orphans.get(program.name, [])
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, left = psutil.wait_procs(procs, timeout=program.stop_timeout_s)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if procs:
            how = f", {len(left)} killed after {program.stop_timeout_s} s" if left else ""
            print(f"{program.name}: stopped pid {procs[0].pid} ({len(procs)} process(es){how})")
            stopped += [p.pid for p in procs]
    return stopped


def down(sup: Supervisor) -> list[int]:
    """Stop the programs in the reverse of their start order, then supervisord; return the pids
    stopped. Logs, config and whatever the programs keep on disk stay."""
    if sup.pid() is None:
        stale = sup.socket.exists()
        print("supervisord: not running" + (" (stale socket removed)" if stale else ""))
        sup.socket.unlink(missing_ok=True)
        return stop_orphans(sup)
    stopped: list[int] = []
    for program in sup.stop_order():
        info = sup.info(program)
        if info is None or info["statename"] not in UP_STATES:
            print(f"{program.name}: not running", flush=True)
            continue
        t0 = time.monotonic()
        sup.rpc().stopProcess(program.name, True)  # returns once its process group has exited
        took = time.monotonic() - t0
        # supervisord sends SIGKILL once stopwaitsecs have passed: a stop that long had it.
        kill = (
            f", SIGKILL after {program.stop_timeout_s} s" if took >= program.stop_timeout_s else ""
        )
        print(f"{program.name}: stopped pid {info['pid']} in {took:.1f} s{kill}", flush=True)
        stopped.append(info["pid"])
    pid = sup.shutdown()  # it also stops any program it runs that is not in this list
    print(f"supervisord: stopped (pid {pid})", flush=True)
    return [*stopped, pid]


def describe(info: dict) -> str:
    """supervisord's state of a process: its pid and uptime, or how it ended and its log."""
    state = info["statename"]
    if state in UP_STATES:
        return (
            f"{state:8s} pid {info['pid']:<7d} up {timedelta(seconds=info['now'] - info['start'])}"
        )
    if state == "STOPPED" and not info["stop"]:
        return "STOPPED"  # never started
    return f"{state:8s} {info['description']}  (log {shown(Path(info['stdout_logfile']))})"


def status(sup: Supervisor) -> bool:
    """Print each process's state, pid, uptime and whether it answers; True if all run and answer."""
    pid = sup.pid()
    if pid is None:
        print(f"{'supervisord':15s} not running")
        orphans = sup.orphans()
        for p in sup.programs:
            left = orphans.get(p.name)
            if left:
                print(
                    f"{p.name:15s} ORPHANED pid {left[0].pid}: its supervisord died; `make down` stops it"
                )
            else:
                print(f"{p.name:15s} stopped")
        return False
    uptime = timedelta(seconds=round(time.time() - psutil.Process(pid).create_time()))
    print(f"{'supervisord':15s} RUNNING  pid {pid:<7d} up {uptime}  {shown(sup.conf)}")
    known, ok = sup.processes(), True
    for program in sup.programs:
        info = known.pop(program.name, None)
        if info is None or info["statename"] not in UP_STATES:
            ok = False
            print(f"{program.name:15s} {describe(info) if info else 'not in ' + str(sup.conf)}")
            continue
        answers = program.answers is None or program.answers(info["start"])
        ok = ok and answers
        word = "answers" if answers else "does not answer (yet)"
        print(f"{program.name:15s} {describe(info)}  {program.url}  {word}")
    for info in known.values():  # started from another list of programs
        print(f"{info['name']:15s} {describe(info)}")
    return ok
