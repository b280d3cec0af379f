"""One local Prefect API for every jielong command, instead of a temporary server per command.

Without a configured PREFECT_API_URL, the first `jielong run` (or `eval`) starts a Prefect API server on
127.0.0.1 in the background, says so, and records it in $PREFECT_HOME/jielong-api.json; later commands
find it there and reuse it (starting one costs 5-20 s, reusing it nothing). `jielong server status`
shows it, `jielong server stop` stops it.

The server is the one Prefect itself starts per process when no API is configured (its "ephemeral"
app: no UI, no scheduler, the run-recording services only), launched the way Prefect launches it but
in its own session, so it outlives the command. `connected()` points a command at the API it reports to:
a configured one, else this one. Prefect is imported when a command connects, not with this module.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

STATE_FILE = "jielong-api.json"
START_TIMEOUT = 90.0


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check at `url` (ending in /api)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_server(pid: int) -> bool:
    """Whether `pid` is a live Prefect API server (not another process that reuses a dead server's pid)."""
    if not _alive(pid):
        return False
    try:
        return b"prefect.server.api.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid


def _read_state() -> dict | None:
    try:
        return json.loads((prefect_home() / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def running() -> dict | None:
    """The recorded background server ({"pid", "url", "started_at", "log"}) if it is alive and answers."""
    state = _read_state()
    if state and _is_server(state["pid"]) and answers(state["url"]):
        return state
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(home: Path) -> dict:
    """A Prefect API server in its own session, its database in `home`; returns its state once it answers."""
    port = _free_port()
    log = home / "jielong-api.log"
    prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=home)
    state = {"pid": process.pid, "url": f"http://127.0.0.1:{port}/api", "started_at": time.time(), "log": str(log)}
    deadline = time.monotonic() + START_TIMEOUT
    while not answers(state["url"], timeout=1):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_pid(process.pid)
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the local Prefect API did not start (log {log}):\n{tail}")
        time.sleep(0.1)
    return state


@contextmanager
def _api_lock(home: Path, timeout: float = START_TIMEOUT + 30):
    """The lock around starting and stopping the server; waiting for it is bounded (a command holding it
    is starting a server, which takes at most START_TIMEOUT)."""
    with open(home / ".jielong-api.lock", "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another process has held {home / '.jielong-api.lock'} for {timeout:.0f} s; "
                                       "is a jielong command stuck starting the Prefect API?") from None
                time.sleep(0.1)
        yield


def ensure() -> tuple[dict, bool]:
    """The background server, started if none answers; returns (state, started_now)."""
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    # two commands starting at once must not start two servers (nor migrate one database twice)
    with _api_lock(home):
        state = running()
        if state:
            return state, False
        stale = _read_state()
        if stale and _is_server(stale["pid"]):
            stop_pid(stale["pid"])  # alive but not answering: replace it
        state = launch(home)
        (home / STATE_FILE).write_text(json.dumps(state))
        return state, True


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the server's process group (it runs in its own session), SIGKILL if it lingers."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _reap(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)


def _reap(pid: int) -> bool:
    """Whether `pid` is still running (reaping it first if it is our exited child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: started by another command
    return _alive(pid)


def stop() -> dict | None:
    """Stop the recorded background server; returns its state, or None when none was recorded running."""
    home = prefect_home()
    if not home.is_dir():
        return None
    with _api_lock(home):
        state = _read_state()
        (home / STATE_FILE).unlink(missing_ok=True)
        if not state or not _is_server(state["pid"]):
            return None
        stop_pid(state["pid"])
        return state


# ---------------------------------------------------------------- the API a command reports to


def resolve_prefect_api() -> str:
    """The Prefect API this command reports to: a configured PREFECT_API_URL (e.g. `jielong server`) when it
    answers, else the local background API, started on first use and reused after."""
    from prefect.settings import get_current_settings

    from jielong.tasks.core.schema import UserError

    configured = get_current_settings().api.url or os.environ.get("PREFECT_API_URL")
    if configured:
        _check_configured(configured)
        return configured
    try:
        state, started = ensure()
    except RuntimeError as err:  # e.g. the port taken meanwhile, a broken Prefect database: say so, no traceback
        raise UserError(f"{err}\nOr point PREFECT_API_URL at a running Prefect server (`jielong server`).") from None
    if started:
        print(f"Started a local Prefect API at {state['url']} (pid {state['pid']}); later jielong commands reuse it. "
              "`jielong server stop` stops it.", file=sys.stderr)
    return state["url"]


@contextmanager
def connected() -> Iterator[None]:
    """Point this process's flow and its worker processes (through the environment) at one Prefect API.
    Without one, Prefect would start a temporary server in every process, each taking seconds."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = resolve_prefect_api()
    os.environ["PREFECT_API_URL"] = url
    # Prefect's global settings were read from the environment when it was imported, before the URL was set:
    # threads that start without this context (the task runner's submitting threads) read those
    refresh_global_settings_context()
    with temporary_settings({PREFECT_API_URL: url}):
        yield


def _check_configured(url: str) -> None:
    import requests

    from jielong.tasks.core.schema import UserError

    try:
        requests.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise UserError(f"the Prefect API at {url} (PREFECT_API_URL) is not reachable ({type(err).__name__}): "
                        "start it (`jielong server`) or unset PREFECT_API_URL to use jielong's local background one") from None
