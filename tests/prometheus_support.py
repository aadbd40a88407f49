"""Debian's real Prometheus server for the tests: started on a free loopback port, scraping the
targets it is given every half second, stopped and deleted on the way out even when a test fails.

Without the ``prometheus`` binary the test is skipped with a message; with REQUIRE_TEAM_SERVERS=1
(set by .ci/run, which installs it) it fails instead, so CI never skips it silently.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from tests.team_support import free_port, skip_or_fail


def need_prometheus() -> str:
    binary = shutil.which("prometheus")
    if binary:
        return binary
    skip_or_fail("no prometheus binary: apt-get install prometheus")


@contextmanager
def prometheus_server(job: str, targets: list[str]) -> Iterator[str]:
    """A Prometheus scraping ``targets`` (host:port) as ``job``; its base URL."""
    binary = need_prometheus()
    folder = Path(tempfile.mkdtemp(prefix="mnist-prometheus-"))
    config = {
        "global": {"scrape_interval": "500ms", "scrape_timeout": "400ms"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(folder / 'prometheus.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus not ready in 30 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def query(url: str, promql: str) -> list[dict]:
    """The result of an instant query through Prometheus' HTTP API."""
    address = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(address, timeout=5) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(url: str, promql: str, check, timeout_s: float = 20) -> list[dict]:
    """Query until ``check(result)`` holds; the result, or an AssertionError with the last one."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(url, promql)
        if check(result) or time.monotonic() > deadline:
            assert check(result), f"{promql}: {result}"
            return result
        time.sleep(0.5)
