"""Running the bundled app through Flower's own ``flwr run`` (the real simulation engine).

``flwr run`` starts a local SuperLink that outlives the command; :func:`flwr_run` gives
every run its own ``FLWR_HOME`` and free ports, never lets Flower install dependencies at
run time, and stops that SuperLink (and its children) afterwards, also on failure.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parents[2]


def format_run_config(values: Mapping[str, Any]) -> str:
    """``--run-config`` text: ``key=value`` pairs, strings single-quoted, bools lower-case."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, str):
            if "'" in value:
                raise ValueError(f"run config value for {key!r} may not contain a single quote")
            text = f"'{value}'"
        else:
            raise TypeError(f"run config value for {key!r} must be a scalar, got {value!r}")
        parts.append(f"{key}={text}")
    return " ".join(parts)


APP_FILES = ("pyproject.toml", "server_app", "client_app")


def stage_app(app_dir: Path, target: Path, files: Sequence[str] = APP_FILES) -> Path:
    """Copy the app's entry points and pyproject (``files``) to ``target`` and return it.

    ``flwr run`` walks the whole app directory to build the FAB (a ``.venv`` of tens of
    thousands of files costs seconds per run); the FAB only needs these files, since the
    library itself is an installed dependency (see ``fab-include`` in pyproject).
    """
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in files:
        source = app_dir / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    return target


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, chosen *below* the kernel's ephemeral
    range: ports from ``bind(0)`` come from that range, which every outgoing connection also
    draws from, so a port chosen there can be taken by some connection before the process it
    was chosen for binds it (seen with several SuperNodes starting at once)."""
    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - 12_000), low))
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower commands: own FLWR_HOME, own local-SuperLink ports, no runtime
    dependency installation, and this interpreter's bin directory first on PATH."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(free_port()))
    env.setdefault("FLWR_LOCAL_CONTROL_API_PORT", str(free_port()))
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env.update(extra or {})
    return env


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
                found.extend(_children(int(entry.name)))
    return found


def terminate(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, every pid that still exists."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_local_superlink(flwr_home: Path) -> int:
    """Stop the SuperLink ``flwr run`` started for ``flwr_home`` and its children.

    Returns the number of processes signalled. The SuperLink is recognised by its log
    file path, which contains ``flwr_home``.
    """
    marker = str(Path(flwr_home) / "local-superlink")
    roots = _processes_mentioning(marker)
    pids = [p for root in roots for p in (*_children(root), root)]
    terminate(pids)
    return len(pids)


@dataclass
class RunOutcome:
    """Exit code, combined output and final status of one ``flwr run``.

    ``flwr run --stream`` exits 0 even when the ServerApp fails; ``status`` is the run's
    status from the SuperLink (``finished:completed``, ``finished:failed``, ...).
    """

    returncode: int
    output: str
    run_id: int | None = None
    status: str = "unknown"
    status_details: str = ""

    @property
    def ok(self) -> bool:
        """The command succeeded and the run completed."""
        return self.returncode == 0 and self.status == "finished:completed"


def run_status(flwr: str, run_id: int, env: Mapping[str, str]) -> tuple[str, str]:
    """Status and details of ``run_id`` from the local SuperLink (``flwr ls``)."""
    try:
        listing = subprocess.run(
            [flwr, "ls", "--run-id", str(run_id), "--format", "json"],
            env=dict(env), capture_output=True, text=True, timeout=60, check=False,
        )
        runs = json.loads(listing.stdout).get("runs", [])
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        return "unknown", f"flwr ls failed: {exc}"
    if not runs:
        return "unknown", "flwr ls returned no run"
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", ""))


def flwr_run(
    run_config: Mapping[str, Any],
    *,
    flwr_home: Path,
    num_supernodes: int = 5,
    client_cpus: int = 1,
    app_dir: Path = APP_DIR,
    app_files: Sequence[str] = APP_FILES,
    timeout: float = 900.0,
    echo: bool = False,
    extra_env: Mapping[str, str] | None = None,
) -> RunOutcome:
    """Run the app at ``app_dir`` in Flower's simulation engine and wait for the end.

    Parameters
    ----------
    run_config : mapping
        Run-config overrides (scalars).
    flwr_home : Path
        A directory of this run's own (Flower's config, local SuperLink state and logs).
    num_supernodes : int
        Simulated nodes. For the bundled app, unless ``run_config`` sets it,
        ``min-available-nodes`` is set to this, so that no round starts before every node
        has registered.
    client_cpus : int
        CPUs Ray reserves per client (1 lets as many clients run at once as there are cores).
    app_dir, app_files : Path, sequence of str
        The app, and the files of it that ``flwr run`` needs (see :func:`stage_app`).
    echo : bool
        Also copy Flower's output to this process's stdout as it arrives.
    """
    flwr_home = Path(flwr_home).resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    staged = stage_app(Path(app_dir), flwr_home / "app", app_files)
    command = [
        flwr, "run", str(staged), "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus}",
    ]
    if Path(app_dir).resolve() == APP_DIR:  # the bundled app declares this key
        run_config = {"min-available-nodes": num_supernodes, **run_config}
    command += ["--run-config", format_run_config(run_config)]
    env = flower_env(flwr_home, extra_env)
    lines: list[str] = []

    def pump(stream: Any) -> None:
        for line in stream:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    try:
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        ) as process:
            reader = threading.Thread(target=pump, args=(process.stdout,), daemon=True)
            reader.start()
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                returncode = process.wait()
                lines.append(f"flwr_run: killed after {timeout:.0f} s\n")
            reader.join(timeout=10)
        output = "".join(lines)
        match = re.search(r"Successfully started run (\d+)", output)
        run_id = int(match.group(1)) if match else None
        status, details = ("unknown", "no run id in the output")
        if run_id is not None:
            status, details = run_status(flwr, run_id, env)
    finally:
        stop_local_superlink(flwr_home)
    return RunOutcome(returncode, output, run_id, status, details)
