"""`make ui`: the Dagster webserver and daemon (and, when switched on, the metrics exporter) as one foreground command.

Ctrl-C or SIGTERM stops all of them and waits for them to exit, so nothing is left holding the port or the sqlite
files. Two traps are handled:

- A process started in the background by a non-interactive shell (a script, `make ... &`, CI) inherits SIGINT as
  *ignored*, and Dagster's servers map SIGTERM onto their SIGINT handler, so they would ignore both. The children are
  started with SIGINT reset to its default, and this launcher installs its own handlers whatever it inherited.
- The servers spawn their own children (code-location gRPC servers, run workers): each server gets its own process
  group, and on stop the whole group is signalled, then killed if it has not exited within the grace period.

Usage: python -m asr_assets.ui [--host 127.0.0.1] [--port 3000] [--metrics-port N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

GRACE_S = 20.0


def _reset_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgrp()  # its own group: stopping it reaches the gRPC servers and run workers it started


def start(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    path = log_dir / f"{name}.log"
    print(f"starting {name}: {' '.join(argv)} (log: {path})", flush=True)
    with open(path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_reset_sigint)


def stop(children: dict[str, subprocess.Popen], grace_s: float = GRACE_S) -> None:
    """SIGTERM to each child's process group, then SIGKILL whatever is still there after ``grace_s``."""
    for proc in children.values():
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for name, proc in children.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop within {grace_s:.0f} s; killing it", flush=True)
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        _signal_group(proc, signal.SIGKILL)  # stragglers of the group (a run worker mid-step)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--workspace", default="workspace.yaml")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("ASR_METRICS_PORT", "0")),
        help="serve Prometheus metrics of every run here (0: off); env ASR_METRICS_PORT",
    )
    args = parser.parse_args()
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        print("DAGSTER_HOME is not set (make ui sets it to ./.dagster)", file=sys.stderr)
        return 2
    log_dir = Path(home) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    children: dict[str, subprocess.Popen] = {}
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    # Installed first, whatever this process inherited (a backgrounded launcher inherits SIGINT ignored), so a signal
    # during start-up also ends in the `finally` below and never strands a child in its own process group.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    exit_code = 0
    try:
        # The sqlite databases are created here, once: the webserver and the daemon starting together on a fresh
        # DAGSTER_HOME would race to create them and can leave the schema version table with two heads.
        subprocess.run([str(bin_dir / "dagster"), "instance", "migrate"], env=env, check=True, capture_output=True)
        if args.metrics_port:
            # Every run and step process writes its samples here; the exporter sums them. Cleared at start, as
            # prometheus-client's multiprocess mode requires.
            metrics_dir = Path(home) / "prometheus"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
            env.pop("ASR_METRICS_PORT", None)  # runs write to the folder; only the exporter listens
            exporter = [
                sys.executable,
                "-m",
                "asr_assets.metrics",
                "--host",
                args.host,
                "--port",
                str(args.metrics_port),
            ]
            children["metrics"] = start("metrics", exporter, env, log_dir)
        children["daemon"] = start(
            "daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", args.workspace], env, log_dir
        )
        children["webserver"] = start(
            "webserver",
            [str(bin_dir / "dagster-webserver"), "-w", args.workspace, "-h", args.host, "-p", str(args.port)],
            env,
            log_dir,
        )
        print(f"Dagster UI on http://{args.host}:{args.port} (Ctrl-C stops everything)", flush=True)
        if args.metrics_port:
            print(f"Prometheus metrics on http://{args.host}:{args.metrics_port}/metrics", flush=True)
        while not stopping:
            for name, proc in children.items():
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; stopping the rest", file=sys.stderr, flush=True)
                    stopping, exit_code = True, 1
                    break
            time.sleep(0.5)
    finally:
        print("stopping...", flush=True)
        stop(children)
        print("stopped", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
