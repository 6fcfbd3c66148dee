"""Run the real service under gunicorn for tests: a subprocess on a free port, logs kept in files."""

import os
import signal
import socket
import subprocess
import threading
import sys
import time
from pathlib import Path

import requests
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"
# Variables the service reads; the parent's values never leak into a test server.
SERVICE_ENV = ("PORT", "HOST", "WEB_CONCURRENCY", "DATABASE_URL", "AGENT_SWARM_API_KEY", "API_KEY",
               "INSTANCE_PATH", "ACCESS_LOG", "MULTI_RUNTIME_ENABLED", "MAX_BODY_BYTES",
               "SQLITE_BUSY_TIMEOUT_MS", "GUNICORN_CMD_ARGS", "SESSION_TTL_MINUTES", "SWEEP_INTERVAL_SECONDS",
               "HISTORY_DAYS", "CORS_ORIGINS", "START_SWEEPER", "CLIENT_TIMEOUT_SECONDS")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reset_postgres(url):
    """Leave a PostgreSQL database with an empty public schema, as on a fresh install."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


def _alive(pid):
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Server:
    """`gunicorn app:app` from the repository root, so it reads gunicorn.conf.py.

    Use as a context manager: entering starts it and waits for GET /health, leaving stops
    the whole process group (SIGTERM, then SIGKILL). key=None starts it with no key in its
    environment, so the service generates one. Output goes to <log_dir>/<name>.out/.err.
    """

    def __init__(self, log_dir, database_url, key=None, workers=4, instance_path=None,
                 name="gunicorn", start_timeout=20.0, port=None, **env):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.instance_path = Path(instance_path or self.log_dir / "instance")
        self.key = key
        self.port = port or free_port()  # port=: a restart that clients find where they left it
        self.base = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.out_path = self.log_dir / f"{name}.out"
        self.err_path = self.log_dir / f"{name}.err"
        self.env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
        self.env.update(PORT=str(self.port), HOST="127.0.0.1", WEB_CONCURRENCY=str(workers),
                        DATABASE_URL=database_url, INSTANCE_PATH=str(self.instance_path))
        if key is not None:
            self.env["AGENT_SWARM_API_KEY"] = key
        self.env.update({k: str(v) for k, v in env.items()})
        self.proc = None

    def start(self, wait=True):
        """Start gunicorn and wait until /health answers; fail with its output if it never does.

        wait=False returns right after the spawn, for callers that time the start themselves.
        """
        # gunicorn 27 opens a control socket at one fixed path per user by default: a second
        # server would take it over and the first one's shutdown would remove it. Tests need none.
        cmd = [str(GUNICORN), "app:app", "--no-control-socket"]
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        if not wait:
            return self
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"gunicorn exited with {code}:\n{self.output()}")
            try:
                if requests.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer /health within {self.start_timeout} s:\n{self.output()}")

    def stop(self, timeout=10.0):
        """SIGTERM the process group, wait, then SIGKILL whatever is left."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers outliving the master would keep the port and the database busy.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None

    @property
    def master_pid(self):
        """The gunicorn master's pid (also the process group id), or None when stopped."""
        return self.proc.pid if self.proc is not None else None

    def worker_pids(self):
        """The pids of the master's live children: its workers."""
        pids = set()
        for children in Path(f"/proc/{self.master_pid}/task").glob("*/children"):
            try:
                pids.update(int(pid) for pid in children.read_text().split())
            except OSError:
                continue  # the thread or the master is gone
        return sorted(pid for pid in pids if _alive(pid))

    def kill(self):
        """kill -9 the whole process group (master and workers) at once, as a crash would."""
        if self.proc is None:
            return
        workers = self.worker_pids()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc = None
        # Orphaned workers die on their own; wait until none can still hold the port.
        deadline = time.monotonic() + 5
        while workers and time.monotonic() < deadline:
            workers = [pid for pid in workers if _alive(pid)]
            time.sleep(0.01)

    def output(self):
        """Everything the server wrote so far, stdout then stderr."""
        parts = []
        for path in (self.out_path, self.err_path):
            if path.exists():
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "\n".join(parts)

    def url(self, path):
        return self.base + path

    def headers(self, agent=None, key=None):
        """Authorization with this server's key (or key=), plus X-Agent-ID when agent= is given."""
        sent = {"Authorization": f"Bearer {key or self.key}"}
        if agent is not None:
            sent["X-Agent-ID"] = agent
        return sent

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run_threads(count, target, timeout=60):
    """Run target(i) in count threads; return their results, re-raising the first exception."""
    results, errors = [None] * count, []

    def run(i):
        try:
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout} s"
    if errors:
        raise errors[0]
    return results


def assert_clean_log(srv, allowed=()):
    """Stop the server and check its output: no traceback, error, lock error or 503 warning.

    A line containing one of allowed is skipped (the kill test expects gunicorn's SIGKILL line).
    """
    srv.stop()
    lines = [line for line in srv.output().splitlines() if not any(a in line for a in allowed)]
    log = "\n".join(lines)
    for bad in ("Traceback", "[ERROR]", "[CRITICAL]", "database is locked", "database unavailable"):
        assert bad not in log, log[-4000:]
    return srv.output()
