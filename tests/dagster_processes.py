"""The real Dagster processes for tests: dagster-webserver and dagster-daemon started with this repository's
workspace and config, addressed by pid, and the webserver's GraphQL API (what the UI itself calls)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCATION = {"repositoryLocationName": "asr_distill", "repositoryName": "__repository__"}

# What the UI sends for "Materialize" over selected partitions (an asset backfill), and how it polls it.
LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}"""
BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status }
    ... on PythonError { message }
  }
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str, variables: dict[str, Any] | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        data = json.loads(response.read())
    if data.get("errors"):
        raise AssertionError(f"GraphQL errors: {data['errors']}")
    return data["data"]


def _own_group() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgrp()


class DagsterProcesses:
    """dagster-webserver and dagster-daemon on a free loopback port, with an instance under ``home``."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = {**os.environ, **env, "DAGSTER_HOME": str(home)}
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())

    def start(self, name: str) -> subprocess.Popen:
        argv = {
            "webserver": [
                str(BIN / "dagster-webserver"),
                "-w",
                "workspace.yaml",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            "daemon": [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
        }[name]
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - the child's stdout, kept for failure messages
        self.procs[name] = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_own_group
        )
        return self.procs[name]

    def stop(self, name: str, sig: int = signal.SIGTERM, group: bool = False) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            (os.killpg if group else os.kill)(proc.pid, sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/server_info", timeout=2)
                return
            except OSError:
                assert self.procs["webserver"].poll() is None, "dagster-webserver exited:\n" + self.log("webserver")
                assert time.monotonic() < deadline, f"dagster-webserver did not start in {timeout_s} s"
                time.sleep(0.5)

    def query(self, query: str, variables: dict[str, Any] | None = None) -> dict:
        return graphql(self.port, query, variables)

    def init_storage(self) -> None:
        """Creates the instance's sqlite databases once, before two processes race to create them (which leaves
        alembic with two heads and one of them dead)."""
        subprocess.run([str(BIN / "dagster"), "instance", "migrate"], env=self.env, check=True, capture_output=True)

    def __enter__(self) -> DagsterProcesses:
        self.init_storage()
        self.start("webserver")
        self.start("daemon")
        return self

    def __exit__(self, *exc: object) -> None:
        for name in list(self.procs):
            self.stop(name, signal.SIGTERM, group=True)
