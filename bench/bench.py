"""The benchmark: the service against a hello-world ceiling under the same server, in one run.

    make bench                                   # gunicorn as configured (sync workers)
    .venv/bin/python bench/bench.py --quick      # short rounds: a smoke run (~1 min)
    .venv/bin/python bench/bench.py --server gunicorn-gthread --server granian
    .venv/bin/python bench/bench.py --server all --profile

Every server is a subprocess on a fresh temporary SQLite database, bound to a free port on
127.0.0.1. Sessions are seeded through the API the way runners register them. Each figure
is measured in rounds, service and ceiling interleaved (A B A B ...), because these
machines are noisy: only the ratio of the two medians from one run means something.

Load comes from wrk with the Lua scripts beside this file, which check every answer; wrk
is installed with apt-get when missing (root, or sudo without a password) and otherwise a
Python load generator (processes x threads, http.client keep-alive) takes its place.

The ceiling (bench/hello.py) answers the same paths with constant JSON and is served with
the same server configuration: for gunicorn the same gunicorn.conf.py and command-line
options, minus the config file's server hooks (they do the service's start-up work).

Results: a table on stdout, JSON (and the table as Markdown) under bench/results/.
"""

import argparse
import collections
import contextlib
import http.client
import json
import math
import multiprocessing
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
PYTHON = sys.executable
HOST = "127.0.0.1"
AVOID_PORTS = {3013}
SERVERS = ("gunicorn-sync", "gunicorn-gthread", "granian")
# Server-layer defaults where gunicorn.conf.py says nothing (gunicorn's workers always come from it):
# gthread threads per worker; granian workers and blocking threads per worker (granian's own
# default, backpressure/2 threads per worker, is far too many for a 2-core box).
GTHREAD_THREADS = 4
GRANIAN_WORKERS = os.cpu_count() or 1
GRANIAN_THREADS = 2
SEEDED = 1000  # sessions the heartbeat load rotates over
MANY = 10000  # sessions for the big listing
AGENTS = 40  # agent ids the seeded sessions spread over
MB = 1024 * 1024
SPY_FLAGS = os.environ.get("BENCH_PY_SPY_FLAGS", "--nonblocking").split()

# What each figure is, its unit, whether bigger is better, and its goal from the issue:
# ("ratio", x) compares service/ceiling, ("max", x) / ("min", x) bound the service's value.
FIGURES = [
    ("heartbeat_c16", "heartbeat, 1,000 sessions, 16 conns", "req/s", True, ("ratio", 0.85)),
    ("heartbeat_c64", "heartbeat, 1,000 sessions, 64 conns", "req/s", True, ("ratio", 0.85)),
    ("create_c16", "create, 16 conns", "req/s", True, ("ratio", 0.75)),
    ("delete_c16", "delete by task, 16 conns", "req/s", True, None),
    ("list_1k", "list 1,000 sessions, one request (p50)", "ms", False, None),
    ("list_10k", "list 10,000 sessions, one request (p50)", "ms", False, ("max", 25.0)),
    ("rss_one_worker", "idle RSS, one-worker server (all processes)", "MB", False, ("max", 80.0)),
    ("rss_default", "idle RSS, default configuration (all processes)", "MB", False, None),
    ("rss_single", "idle RSS, single process (python app.py)", "MB", False, ("max", 60.0)),
    ("start_health", "start to first answer, GET /health", "s", False, None),
    ("start_auth", "start to first authenticated answer (fresh db)", "s", False, ("max", 1.5)),
    ("heartbeat_moonshot", "moonshot: heartbeat, 16 conns", "req/s", True, ("min", 3500.0)),
]


def log(*parts):
    """Progress on stderr, so stdout carries only the tables."""
    print(*parts, file=sys.stderr, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, p):
    """Nearest-rank percentile of a list (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def free_port():
    """A free TCP port on 127.0.0.1 (never the service's own 3013)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in AVOID_PORTS:
            return port


# ---------------------------------------------------------------------------- ids and bodies
# The same ids, agents and bodies as bench/common.lua, for seeding and the Python fallback.

DESCRIPTION = (
    "Implement the requested change, run the test suite, and report back with a summary "
    "of what changed and why; keep the diff small and the commit message clear. Then open a pull request. "
)[:200]


def agent_of(n):
    return f"00000000-0000-4000-8000-{n % AGENTS:012d}"


def task_of(prefix, n):
    return f"{prefix}-{n}"


def session_body(prefix, n):
    """A registration like the agent-swarm runner's: description of 40-200 characters."""
    return json.dumps({
        "agentId": agent_of(n), "taskId": task_of(prefix, n), "triggerType": "task_assigned",
        "taskDescription": DESCRIPTION[:40 + (n * 37) % 161],
        "runnerSessionId": f"{prefix}-runner-{n}", "runtimeInstanceId": f"{prefix}-rt-{n % AGENTS}",
    }, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------- processes


def _proc_children():
    """pid -> list of child pids, from /proc."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry))
    return children


def process_tree(pid):
    """pid and all its descendants."""
    children = _proc_children()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def _kb(path, field):
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def memory_of(pid):
    """(RSS, PSS) in bytes summed over a process tree, and how many processes it has."""
    pids = process_tree(pid)
    rss = sum(_kb(f"/proc/{p}/status", "VmRSS") for p in pids) * 1024
    pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in pids) * 1024
    return rss, pss, len(pids)


_control_socket = None


def gunicorn_has_control_socket():
    """gunicorn >= 25 opens a control socket (default ~/.gunicorn/gunicorn.ctl); give each its own."""
    global _control_socket
    if _control_socket is None:
        out = subprocess.run([str(BIN / "gunicorn"), "--help"], capture_output=True, text=True, timeout=60).stdout
        _control_socket = "--control-socket" in out
    return _control_socket


class Server:
    """One server process tree: the service or the ceiling, under one server layer."""

    def __init__(self, app, layer, workers=None, threads=None):
        self.app, self.layer, self.workers, self.threads = app, layer, workers, threads
        self.proc = None
        self.key = secrets.token_urlsafe(24)

    @property
    def name(self):
        return f"{self.app}/{self.layer}" + (f" w={self.workers}" if self.workers else "")

    def _commands(self):
        """(pre-step or None, server command) for this app and layer."""
        service = self.app == "service"
        if self.layer == "single":
            return None, [PYTHON, "app.py"] if service else [PYTHON, "bench/hello.py"]
        if self.layer.startswith("gunicorn"):
            cmd = [str(BIN / "gunicorn"), "app:app"] if service else [PYTHON, "bench/hello.py", "gunicorn", "bench.hello:app"]
            if gunicorn_has_control_socket():
                cmd += ["--control-socket", os.path.join(self.tmp, "gunicorn.ctl")]
            if self.layer == "gunicorn-gthread":
                cmd += ["--worker-class", "gthread", "--threads", str(self.threads or GTHREAD_THREADS)]
            return None, cmd
        if self.layer == "granian":
            # granian has no start-up hook: the service's prepare() runs first, as its own step.
            pre = [PYTHON, "-c", "import app; app.prepare(app.app)"] if service else None
            cmd = [str(BIN / "granian"), "--interface", "wsgi", "--host", HOST, "--port", str(self.port),
                   "--workers", str(self.workers or GRANIAN_WORKERS),
                   "--blocking-threads", str(self.threads or GRANIAN_THREADS), "--log-level", "warning"]
            return pre, cmd + ["app:app" if service else "bench.hello:app"]
        raise ValueError(self.layer)

    def start(self):
        """Spawn on a fresh database; returns at once (see wait_ready)."""
        self.tmp = tempfile.mkdtemp(prefix="agent-swarm-bench-")
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in (
            "ACCESS_LOG", "API_KEY", "GUNICORN_CMD_ARGS", "WEB_CONCURRENCY", "PYTHONPATH")}
        env.update(HOST=HOST, PORT=str(self.port), DATABASE_URL=f"sqlite:///{self.tmp}/b.db",
                   AGENT_SWARM_API_KEY=self.key, INSTANCE_PATH=self.tmp, PYTHONUNBUFFERED="1")
        if self.workers:
            env["WEB_CONCURRENCY"] = str(self.workers)
        self.log_path = os.path.join(self.tmp, "server.log")
        self.log_file = open(self.log_path, "ab")
        pre, cmd = self._commands()
        self.t_spawn = time.monotonic()
        if pre:
            subprocess.run(pre, cwd=REPO, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                           timeout=60, check=True)
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        return self

    def headers(self, agent=None):
        h = {"Authorization": f"Bearer {self.key}"}
        if agent:
            h["X-Agent-ID"] = agent
        return h

    def request(self, method, path, body=None, headers=None, timeout=30):
        """One request on a new connection: (status, body bytes, seconds)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            h = dict(headers or {})
            if body is not None:
                h["Content-Type"] = "application/json"
            t0 = time.perf_counter()
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, data, time.perf_counter() - t0
        finally:
            conn.close()

    def poll(self, path, headers=None, timeout=30.0, interval=0.005):
        """Time from spawn until path first answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.request("GET", path, headers=headers, timeout=5)[0] == 200:
                    return time.monotonic() - self.t_spawn
            time.sleep(interval)
        raise RuntimeError(f"{self.name}: {path} not answering after {timeout}s:\n{self.log_tail()}")

    def wait_ready(self, timeout=60.0):
        """Wait for /health and an authenticated request; returns (t_health, t_auth) from spawn."""
        t_health = self.poll("/health", timeout=timeout)
        t_auth = self.poll("/api/active-sessions?limit=1", headers=self.headers(), timeout=timeout)
        return t_health, t_auth

    def memory(self):
        return memory_of(self.proc.pid)

    def log_tail(self, n=30):
        with contextlib.suppress(OSError):
            with open(self.log_path, "rb") as fh:
                return b"\n".join(fh.read().splitlines()[-n:]).decode(errors="replace")
        return ""

    def stop(self):
        """SIGTERM the master (graceful), then SIGKILL whatever of its tree is left."""
        if self.proc is None:
            return
        tree = process_tree(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:  # idle servers stop at once; granian can hang if signalled while workers boot
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.log_file.close()
        self.keep_errors()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.proc = None

    def keep_errors(self):
        """Copy the server's log to bench/results/ when it holds a traceback or an error line."""
        with contextlib.suppress(OSError):
            text = Path(self.log_path).read_text(errors="replace")
            if "Traceback" in text or "[ERROR]" in text or " ERROR " in text:
                RESULTS.mkdir(parents=True, exist_ok=True)
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                dest = RESULTS / f"server-log-{stamp}-{self.app}-{self.layer}-{self.port}.log"
                dest.write_text(text)
                log(f"    {self.name}: errors in its log, kept as {dest}")


@contextlib.contextmanager
def running(*servers):
    """Start servers, wait until each answers, stop them all at the end."""
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


# ---------------------------------------------------------------------------- load generators


def ensure_wrk(allow_install):
    """Path of wrk, installing the Debian package when missing and possible; None otherwise."""
    found = shutil.which("wrk")
    if found or not allow_install or not shutil.which("apt-get"):
        return found
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        return None
    log("wrk is missing: installing the Debian package (apt-get install -y wrk) ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "install", "-y", "wrk"], ["apt-get", "update"], ["apt-get", "install", "-y", "wrk"]):
        try:
            done = subprocess.run(sudo + step, capture_output=True, timeout=600, env=env)
        except (OSError, subprocess.TimeoutExpired):
            break
        if step[1] == "install" and done.returncode == 0:
            break
    return shutil.which("wrk")


class Wrk:
    """wrk with one of the Lua scripts; one wrk thread (a 2-core box needs no more)."""

    threads = 1

    def __init__(self, path):
        self.path = path

    def run(self, server, script, conns, duration, args, until_done=False):
        """Run a script; until_done: stop as soon as every thread has used up its ids."""
        args = dict(args, key=server.key, threads=self.threads)
        marks = tempfile.mkdtemp(prefix="bench-marks-") if until_done else None
        if marks:
            args["marks"] = marks
        cmd = [self.path, "-t", str(self.threads), "-c", str(conns), "-d", f"{max(1, int(duration))}s",
               "--timeout", "10s", "-s", str(BENCH / f"{script}.lua"), f"http://{HOST}:{server.port}",
               "--", *(f"{k}={v}" for k, v in args.items())]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if marks:
                deadline = time.monotonic() + duration
                while proc.poll() is None and time.monotonic() < deadline:
                    if len(os.listdir(marks)) >= self.threads:
                        proc.send_signal(signal.SIGINT)  # wrk stops, prints, runs done()
                        break
                    time.sleep(0.02)
            out, err = proc.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        finally:
            if marks:
                shutil.rmtree(marks, ignore_errors=True)
        for line in out.splitlines():
            if line.startswith("BENCH_JSON "):
                result = json.loads(line[len("BENCH_JSON "):])
                result["stripes"] = self.threads
                return result
        raise RuntimeError(f"wrk gave no result (rc={proc.returncode}):\n{out}\n{err}")


def _py_worker(spec, first, count, stripes, out):
    """One load-generator process: `count` threads with keep-alive connections."""
    results = [None] * count

    def one(i):
        w = first + i  # this connection's stripe
        conn = http.client.HTTPConnection(HOST, spec["port"], timeout=10)
        ok = bad = sent = 0
        first_bad, lat, t_first, t_last = "", [], 0.0, 0.0
        k = 0
        mode, prefix = spec["mode"], spec["prefix"]
        limit = spec["limits"][w] if mode == "delete" else None
        while time.monotonic() < spec["deadline"]:
            headers = {"Authorization": f"Bearer {spec['key']}"}
            body = None
            if mode == "heartbeat":
                n = spec["lo"] + (w + stripes * k) % spec["count"]
                method, path, want = "PUT", "/api/active-sessions/heartbeat/" + task_of(prefix, n), (200, b'"updated":true')
            elif mode == "create":
                n = spec["lo"] + w + stripes * k
                if spec["hi"] >= 0 and n >= spec["hi"]:
                    break
                method, path, want = "POST", "/api/active-sessions", (201, None)
                body = session_body(prefix, n)
                headers["Content-Type"] = "application/json"
            else:
                if k >= limit:
                    break
                n = w + stripes * k
                method, path, want = "DELETE", "/api/active-sessions/by-task/" + task_of(prefix, n), (200, b'"deleted":true')
            headers["X-Agent-ID"] = agent_of(n)
            k += 1
            sent += 1
            t0 = time.monotonic()
            if not t_first:
                t_first = t0
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                bad += 1
                first_bad = first_bad or f"{type(exc).__name__}"
                continue
            t_last = time.monotonic()
            lat.append((t_last - t0) * 1000)
            if resp.status == want[0] and (want[1] is None or want[1] in data):
                ok += 1
            else:
                bad += 1
                first_bad = first_bad or f"{resp.status} {data[:200]!r}"
        conn.close()
        results[i] = dict(ok=ok, bad=bad, sent=sent, first_bad=first_bad, lat=lat, t_first=t_first, t_last=t_last, w=w)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(results)


class PyLoad:
    """The fallback load generator: processes x threads, one keep-alive connection each."""

    def run(self, server, script, conns, duration, args, until_done=False):
        spec = dict(args, mode="create" if script == "create" else script, port=server.port, key=server.key,
                    deadline=time.monotonic() + duration + 0.0)
        spec.setdefault("lo", 0)
        spec["hi"] = int(spec.get("hi", -1))
        spec["count"] = int(spec.get("count", SEEDED))
        if script == "delete":
            spec["limits"] = [int(x) for x in str(args["limits"]).split(",")]
        ctx = multiprocessing.get_context("fork")
        procs_n = max(1, min(os.cpu_count() or 1, conns))
        out, procs, first = ctx.Queue(), [], 0
        for p in range(procs_n):
            count = conns // procs_n + (1 if p < conns % procs_n else 0)
            procs.append(ctx.Process(target=_py_worker, args=(spec, first, count, conns, out)))
            first += count
        for p in procs:
            p.start()
        rows = []
        for _ in procs:
            rows.extend(out.get(timeout=duration + 120))
        for p in procs:
            p.join(timeout=30)
        rows.sort(key=lambda r: r["w"])
        lat = [x for r in rows for x in r["lat"]]
        firsts = [r["t_first"] for r in rows if r["sent"]]
        lasts = [r["t_last"] for r in rows if r["t_last"]]
        return {
            "ok": sum(r["ok"] for r in rows), "bad": sum(r["bad"] for r in rows), "sent": sum(r["sent"] for r in rows),
            "span": (max(lasts) - min(firsts)) if firsts and lasts else 0.0, "duration": duration,
            "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
            "latency_ms": {"p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99),
                           "mean": statistics.fmean(lat) if lat else None, "max": max(lat) if lat else None},
            "first_bad": next((r["first_bad"] for r in rows if r["first_bad"]), ""),
            "threads": [{"ok": r["ok"], "bad": r["bad"], "sent": r["sent"]} for r in rows],
            "stripes": conns,
        }


# ---------------------------------------------------------------------------- the figures


class Figure:
    """Rounds of one figure for the service (A) and the ceiling (B)."""

    def __init__(self, key):
        self.key = key
        self.rounds = {"service": [], "ceiling": []}
        self.failures = {"service": 0, "ceiling": 0}
        self.notes = []

    def add(self, who, value, **extra):
        self.rounds[who].append(dict(value=value, **extra))

    def values(self, who):
        return [r["value"] for r in self.rounds[who]]

    def summary(self):
        out = {"rounds": self.rounds, "failures": self.failures, "notes": self.notes}
        for who in ("service", "ceiling"):
            out[who] = median(self.values(who))
            for q in ("p50", "p99"):
                out[f"{who}_{q}_ms"] = median([r.get(q) for r in self.rounds[who]])
        a, b = out["service"], out["ceiling"]
        out["ratio"] = (a / b) if a is not None and b else None
        pairs = [x["value"] / y["value"] for x, y in zip(self.rounds["service"], self.rounds["ceiling"]) if y["value"]]
        out["ratio_rounds"] = pairs
        return out


def load_round(fig, who, gen, server, script, conns, duration, args, until_done=False):
    """One measured load round: rate = answers that passed / (first request .. last answer)."""
    r = gen.run(server, script, conns, duration, args, until_done=until_done)
    failed = r["bad"] + sum(v for k, v in r["errors"].items() if k != "status")
    fig.failures[who] += failed
    if failed:
        fig.notes.append(f"{who}: {failed} failed answers, first: {r['first_bad'] or r['errors']}")
    rate = r["ok"] / r["span"] if r["span"] else 0.0
    fig.add(who, rate, ok=r["ok"], bad=r["bad"], span=r["span"], p50=r["latency_ms"]["p50"],
            p99=r["latency_ms"]["p99"], errors=r["errors"])
    log(f"    {fig.key:<14} {who:<8} {rate:8.0f} req/s  p50 {r['latency_ms']['p50'] or 0:6.1f} ms"
        f"  p99 {r['latency_ms']['p99'] or 0:6.1f} ms  ok {r['ok']}{'  FAILED ' + str(failed) if failed else ''}")
    return r


def seed(gen, server, prefix, lo, hi):
    """Register sessions lo..hi-1 through the API with 16 connections; all must answer 201."""
    t0 = time.monotonic()
    r = gen.run(server, "create", 16, 300, {"prefix": prefix, "lo": lo, "hi": hi}, until_done=True)
    if r["ok"] != hi - lo or r["bad"]:
        raise RuntimeError(f"seeding {server.name}: {r['ok']} of {hi - lo} created, first failure: {r['first_bad']}")
    log(f"    seeded {hi - lo} sessions on {server.name} in {time.monotonic() - t0:.1f}s")


def list_round(fig, who, server, expected, samples):
    """samples one-request listings, each on a new connection; checks status and count."""
    times = []
    for _ in range(samples):
        status, data, dt = server.request("GET", "/api/active-sessions", headers=server.headers())
        got = len(json.loads(data).get("sessions", ())) if status == 200 else None
        if status != 200 or (who == "service" and got != expected):
            fig.failures[who] += 1
            fig.notes.append(f"{who}: listing answered {status} with {got} sessions, expected {expected}")
        times.append(dt * 1000)
    fig.add(who, percentile(times, 50), p50=percentile(times, 50), p99=percentile(times, 99), samples=times)
    log(f"    {fig.key:<14} {who:<8} p50 {percentile(times, 50):7.2f} ms  p99 {percentile(times, 99):7.2f} ms")


def measure_load(layer, opts, gen, figures):
    """The load figures: service and ceiling both up, default configuration, rounds interleaved."""
    R, D, samples = opts.rounds, opts.duration, opts.samples
    nonce = secrets.token_hex(3)
    sp = f"s{nonce}"  # seeded sessions: sp-0 .. sp-9999
    service = Server("service", layer, opts.workers, opts.threads)
    ceiling = Server("hello", layer, opts.workers, opts.threads)
    pair = (("service", service), ("ceiling", ceiling))
    with running(service, ceiling):
        log(f"  load: {service.name} on :{service.port}, ceiling on :{ceiling.port}")
        seed(gen, service, sp, 0, SEEDED)
        for who, srv in pair:  # warm every worker up (unmeasured)
            gen.run(srv, "heartbeat", 16, 1, {"prefix": sp, "lo": 0, "count": SEEDED})

        fig = figures["list_1k"]
        for _ in range(R):
            for who, srv in pair:
                list_round(fig, who, srv, SEEDED, samples)
        for conns in (16, 64):
            fig = figures[f"heartbeat_c{conns}"]
            for _ in range(R):
                for who, srv in pair:
                    load_round(fig, who, gen, srv, "heartbeat", conns, D, {"prefix": sp, "lo": 0, "count": SEEDED})

        seed(gen, service, sp, SEEDED, MANY)
        fig = figures["list_10k"]
        for _ in range(R):
            for who, srv in pair:
                list_round(fig, who, srv, MANY, samples)

        # Create rounds register new sessions; delete round i ends those of create round i.
        made = {"service": [], "ceiling": []}
        fig = figures["create_c16"]
        for i in range(R):
            for who, srv in pair:
                r = load_round(fig, who, gen, srv, "create", 16, D, {"prefix": f"c{nonce}r{i}"})
                made[who].append([t["sent"] for t in r["threads"]])
        fig = figures["delete_c16"]
        for i in range(R):
            for who, srv in pair:
                limits = ",".join(str(x) for x in made[who][i])
                load_round(fig, who, gen, srv, "delete", 16, D, {"prefix": f"c{nonce}r{i}", "limits": limits},
                           until_done=True)
        after = {who: srv.memory() for who, srv in pair}
    return service, ceiling, after


def measure_memory(layer, opts, figures, rounds):
    """Idle RSS after a short warm-up: one-worker and default configurations, and python app.py."""

    def warm(srv):
        for i in range(24):
            n = 900000 + i
            if srv.app == "service":
                srv.request("POST", "/api/active-sessions", body=session_body("m", n), headers=srv.headers(agent_of(n)))
            srv.request("PUT", f"/api/active-sessions/heartbeat/{task_of('m', n)}", headers=srv.headers(agent_of(n)))
            srv.request("GET", "/api/active-sessions", headers=srv.headers())
            srv.request("GET", "/health")
        time.sleep(1.0)

    configs = [("rss_one_worker", layer, 1), ("rss_default", layer, opts.workers), ("rss_single", "single", None)]
    for key, lay, workers in configs:
        fig = figures[key]
        for _ in range(rounds):
            for who, app in (("service", "service"), ("ceiling", "hello")):
                with running(Server(app, lay, workers, opts.threads)) as (srv,):
                    warm(srv)
                    rss, pss, nprocs = srv.memory()
                fig.add(who, rss / MB, pss_mb=pss / MB, processes=nprocs)
                log(f"    {key:<14} {who:<8} RSS {rss / MB:6.1f} MB  PSS {pss / MB:6.1f} MB  ({nprocs} processes)")


def measure_start(layer, opts, figures, rounds):
    """Spawn to first 200 on /health and on an authenticated request, fresh database each time."""
    for _ in range(rounds):
        for who, app in (("service", "service"), ("ceiling", "hello")):
            srv = Server(app, layer, opts.workers, opts.threads)
            try:
                srv.start()
                t_health, t_auth = srv.wait_ready()
            finally:
                srv.stop()
            figures["start_health"].add(who, t_health)
            figures["start_auth"].add(who, t_auth)
            log(f"    start          {who:<8} /health {t_health:5.2f} s  authenticated {t_auth:5.2f} s")


# ---------------------------------------------------------------------------- in-process cost
# The same requests straight through each WSGI app in one thread, no server and no network:
# what the application code itself costs, free of the server layer and the load generator.

APP_COST_ROUTES = ("heartbeat", "create", "delete", "list_1k", "list_10k")


def app_cost_child(reps, cprofile):
    """Run inside a fresh interpreter (env already points at a fresh database); print JSON."""
    import io

    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != str(BENCH)]
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import app as service
    from bench import hello

    service.prepare(service.app)
    key = os.environ["AGENT_SWARM_API_KEY"]

    def call(wsgi, method, path, body=b"", agent=None):
        env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": HOST,
               "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": False,
               "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.version": (1, 0),
               "HTTP_AUTHORIZATION": f"Bearer {key}", "REMOTE_ADDR": HOST, "HTTP_HOST": HOST}
        if body:
            env.update(CONTENT_TYPE="application/json", CONTENT_LENGTH=str(len(body)))
        if agent:
            env["HTTP_X_AGENT_ID"] = agent
        status = []
        out = b"".join(wsgi(env, lambda s, h, e=None: status.append(s)))
        return int(status[0][:3]), out

    def create(wsgi, prefix, n):
        return call(wsgi, "POST", "/api/active-sessions", session_body(prefix, n), agent_of(n))

    for n in range(SEEDED):
        assert create(service.app, "s", n)[0] == 201
    ops = {
        "heartbeat": (lambda w, i: call(w, "PUT", f"/api/active-sessions/heartbeat/{task_of('s', i % SEEDED)}",
                                        agent=agent_of(i % SEEDED)), (200, b'"updated":true')),
        "create": (lambda w, i: create(w, "c", i), (201, None)),
        "delete": (lambda w, i: call(w, "DELETE", f"/api/active-sessions/by-task/{task_of('c', i)}", agent=agent_of(i)),
                   (200, b'"deleted":true')),
        "list_1k": (lambda w, i: call(w, "GET", "/api/active-sessions"), (200, None)),
        "list_10k": (lambda w, i: call(w, "GET", "/api/active-sessions"), (200, None)),
    }
    result, profiles = {}, {}
    for route in APP_COST_ROUTES:
        if route == "list_10k":
            for n in range(SEEDED, MANY):
                assert create(service.app, "s", n)[0] == 201
        fn, (want, needle) = ops[route]
        n = max(5, reps // 100) if route.startswith("list") else reps
        result[route] = {}
        for who, wsgi in (("service", service.app), ("ceiling", hello.app)):
            t0 = time.perf_counter()
            for i in range(n):
                status, body = fn(wsgi, i)
            elapsed = time.perf_counter() - t0
            if status != want or (who == "service" and needle and needle not in body):
                raise SystemExit(f"{route} on the {who}: {status} {body[:200]!r}")
            result[route][who] = elapsed / n * 1e6
        if cprofile and route in ("heartbeat", "create"):
            import cProfile
            import pstats

            prof = cProfile.Profile()
            offset = 10 * reps if route == "create" else 0  # fresh ids for create
            prof.enable()
            for i in range(reps):
                fn(service.app, offset + i)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
            profiles[route] = out.getvalue().replace(str(REPO) + "/", "").replace(str(BIN.parent) + "/lib/", "")
    print("APP_COST_JSON " + json.dumps({"us": result, "cprofile": profiles}))


def measure_app_cost(opts, cprofile=False):
    """In-process cost per request of each route, service vs ceiling, in a child interpreter."""
    tmp = tempfile.mkdtemp(prefix="agent-swarm-bench-")
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "WEB_CONCURRENCY")}
    env.update(DATABASE_URL=f"sqlite:///{tmp}/b.db", AGENT_SWARM_API_KEY=secrets.token_urlsafe(24), INSTANCE_PATH=tmp,
               SWEEP_INTERVAL_SECONDS="0")
    reps = 300 if opts.quick else 2000
    try:
        done = subprocess.run([PYTHON, str(BENCH / "bench.py"), "--app-cost-child", str(reps)]
                              + (["--cprofile"] if cprofile else []),
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in done.stdout.splitlines():
        if line.startswith("APP_COST_JSON "):
            return json.loads(line[len("APP_COST_JSON "):])
    raise RuntimeError(f"in-process cost run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def app_cost_rows(cost):
    rows = []
    for route in APP_COST_ROUTES:
        c = cost["us"].get(route)
        if c:
            rows.append([route, f"{c['service']:,.0f} us", f"{c['ceiling']:,.0f} us",
                         f"{c['service'] - c['ceiling']:,.0f} us", f"{c['service'] / c['ceiling']:.1f}"])
    return rows


APP_COST_HEAD = ["route (in-process, one thread)", "service", "ceiling", "service's own cost", "ratio"]


# ---------------------------------------------------------------------------- profiling


def profile(layer, opts, gen, out_dir):
    """py-spy on every worker of the service while heartbeat and then create load run."""
    spy = shutil.which("py-spy") or (str(BIN / "py-spy") if (BIN / "py-spy").exists() else None)
    if not spy:
        log("  profile: py-spy not installed (pip install py-spy); skipped")
        return {}
    report = {}
    service = Server("service", layer, opts.workers, opts.threads)
    with running(service):
        seed(gen, service, "p", 0, SEEDED)
        gen.run(service, "heartbeat", 16, 1, {"prefix": "p", "lo": 0, "count": SEEDED})
        for name, script, args in (("heartbeat", "heartbeat", {"prefix": "p", "lo": 0, "count": SEEDED}),
                                   ("create", "create", {"prefix": "pc"})):
            tree = process_tree(service.proc.pid)
            workers = [p for p in tree if p != service.proc.pid] or tree
            files, spies = [], []
            for pid in workers:
                path = out_dir / f"profile-{layer}-{name}-{pid}.txt"
                files.append(path)
                spies.append(subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", *SPY_FLAGS,
                     "--duration", str(int(opts.duration) + 1), "--output", str(path)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
            r = gen.run(service, script, 16, opts.duration, args)
            for p in spies:
                try:
                    p.wait(timeout=opts.duration + 30)
                except subprocess.TimeoutExpired:
                    p.kill()
            report[name] = summarize_profile(files)
            report[name]["rate_under_profiler"] = r["ok"] / r["span"] if r["span"] else 0
            print_profile(name, report[name])
    return report


# Leaf frames that are waiting, not working (py-spy's idle detection misses some of them).
IDLE_LEAVES = ("Condition.wait", "Event.wait", "SyncWorker.wait", "select (selectors.py)", "poll (selectors.py)",
               "_worker (concurrent/futures/thread.py)", "SimpleQueue.get", "Queue.get")


def summarize_profile(files):
    """Self and inclusive sample shares per function from py-spy's collapsed stacks.

    Leaves out the service's sweeper thread and stacks that end in a wait, so the shares are
    of the time the workers spend handling requests.
    """
    self_t, incl, total, skipped = collections.Counter(), collections.Counter(), 0, 0
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not count.isdigit():
                    continue
                count = int(count)
                frames = [_frame(f) for f in stack.split(";")]
                if any("(sweep.py)" in f for f in frames) or frames[-1].startswith(IDLE_LEAVES):
                    skipped += count
                    continue
                total += count
                self_t[frames[-1]] += count
                for f in set(frames):
                    incl[f] += count
    share = (lambda c: round(100.0 * c / total, 1)) if total else (lambda c: 0)
    return {
        "samples": total, "skipped_idle_or_sweeper": skipped,
        "self": [(f, share(c)) for f, c in self_t.most_common(30)],
        # Frames in (nearly) every stack (the server's outer loop) say nothing: left out.
        "inclusive": [(f, share(c)) for f, c in incl.most_common(120) if c < 0.97 * total][:60],
        "files": [str(p) for p in files],
    }


def _frame(frame):
    """'func (path/to/file.py:123)' -> 'func (file.py)', so lines of one function add up."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    else:
        where = os.path.relpath(where, REPO) if where.startswith(str(REPO)) else where
    return f"{name} ({where})"


def print_profile(name, rep):
    print(f"\nProfile of the service under {name} load ({rep['samples']} samples over all workers; "
          f"{rep.get('rate_under_profiler', 0):.0f} req/s while sampled)")
    print("  self time (top 30):")
    for f, pct in rep["self"]:
        print(f"    {pct:5.1f}%  {f}")
    print("  inclusive (top 60):")
    for f, pct in rep["inclusive"]:
        print(f"    {pct:5.1f}%  {f}")


# ---------------------------------------------------------------------------- report


def evaluate(key, s, goal):
    """Whether a figure meets its goal: True/False, or None without a goal or a value."""
    if goal is None:
        return None
    kind, bound = goal
    if key == "heartbeat_moonshot":
        value = s["service"]
    elif kind == "ratio":
        value = s["ratio"]
    else:
        value = s["service"]
    if value is None:
        return None
    ok = value >= bound if kind in ("ratio", "min") else value <= bound
    return ok and not s["failures"]["service"]


def goal_text(goal):
    if goal is None:
        return ""
    kind, bound = goal
    return {"ratio": f">= {bound:g} x ceiling", "max": f"<= {bound:g}", "min": f">= {bound:g}"}[kind]


def fmt(value, unit):
    if value is None:
        return "-"
    if unit == "req/s":
        return f"{value:,.0f}"
    if unit == "s":
        return f"{value:.2f}"
    if unit == "ms":
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return f"{value:.1f}"


def table_rows(summary):
    rows = []
    for key, label, unit, _bigger, goal in FIGURES:
        s = summary.get(key)
        if s is None:
            continue
        lat = lambda who: ("-" if s.get(f"{who}_p50_ms") is None or unit != "req/s"
                           else f"{s[f'{who}_p50_ms']:.1f} / {s[f'{who}_p99_ms']:.1f}")
        if unit == "ms":  # listing: the value is p50; show p50 / p99
            lat = lambda who: ("-" if s.get(f"{who}_p99_ms") is None
                               else f"{s[f'{who}_p50_ms']:.2f} / {s[f'{who}_p99_ms']:.2f}")
        spread = s["ratio_rounds"]
        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f}"
        if spread and len(spread) > 1:
            ratio += f" ({min(spread):.2f}-{max(spread):.2f})"
        result = {True: "PASS", False: "FAIL", None: ""}[s["pass"]]
        fails = s["failures"]["service"] + s["failures"]["ceiling"]
        if fails:
            result = (result + " " if result else "") + f"[{fails} bad answers]"
        rows.append([label, f"{fmt(s['service'], unit)} {unit}", f"{fmt(s['ceiling'], unit)} {unit}", ratio,
                     lat("service"), lat("ceiling"), goal_text(goal), result])
    return rows


HEAD = ["figure", "service", "ceiling", "ratio (round range)", "svc p50/p99 ms", "ceil p50/p99 ms", "goal", "result"]


COMPARE_HEAD = ["server layer", "heartbeat c16 svc / ceiling", "heartbeat c64 svc / ceiling",
                "create svc / ceiling", "delete svc / ceiling", "list 10k p50 ms", "RSS 1 worker MB", "start s"]


def compare_layers(runs):
    """One row per server layer: the absolute figures side by side."""
    rows = []
    for run in runs:
        f = collections.defaultdict(lambda: {"service": None, "ceiling": None}, run["figures"])
        pair = lambda k: f"{fmt(f[k]['service'], 'req/s')} / {fmt(f[k]['ceiling'], 'req/s')}"
        rows.append([run["server"], pair("heartbeat_c16"), pair("heartbeat_c64"), pair("create_c16"),
                     pair("delete_c16"), fmt(f["list_10k"]["service"], "ms"), fmt(f["rss_one_worker"]["service"], "MB"),
                     fmt(f["start_auth"]["service"], "s")])
    return rows


def render_text(rows, head=HEAD):
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render_markdown(rows, head=HEAD):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine():
    """What the numbers were measured on."""
    info = {"python": platform.python_version(), "kernel": platform.release(), "cores": os.cpu_count()}
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "?")
        info["memory_gb"] = round(_kb("/proc/meminfo", "MemTotal") / MB, 1)
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("flask", "werkzeug", "sqlalchemy", "gunicorn", "granian", "orjson", "marshmallow"):
        with contextlib.suppress(PackageNotFoundError):
            info[pkg] = version(pkg)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["sqlite"] = __import__("sqlite3").sqlite_version
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
        info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                                capture_output=True, text=True, timeout=10).stdout.strip())
    return info


def layer_title(layer, opts):
    """The server configuration in words."""
    conf = f"workers {opts.workers} (WEB_CONCURRENCY)" if opts.workers else "workers from gunicorn.conf.py (cores + 1)"
    if layer == "gunicorn-sync":
        return f"gunicorn sync: `gunicorn app:app`, {conf}"
    if layer == "gunicorn-gthread":
        return f"gunicorn gthread: `gunicorn app:app -k gthread --threads {opts.threads or GTHREAD_THREADS}`, {conf}"
    return (f"granian WSGI: `granian --interface wsgi --workers {opts.workers or GRANIAN_WORKERS} "
            f"--blocking-threads {opts.threads or GRANIAN_THREADS} app:app` (after `prepare()`)")


def run_layer(layer, opts, gen):
    """Every figure for one server layer; returns the JSON-ready result."""
    log(f"\n== {layer} ({'quick' if opts.quick else 'full'}: {opts.rounds} rounds x {opts.duration}s) ==")
    figures = {key: Figure(key) for key, *_ in FIGURES}
    t0 = time.monotonic()
    after = {}
    if "start" in opts.only:
        log("  start to first answer ...")
        measure_start(layer, opts, figures, opts.start_rounds)
    if "memory" in opts.only:
        log("  idle memory ...")
        measure_memory(layer, opts, figures, opts.memory_rounds)
    if "load" in opts.only:
        log("  load ...")
        _, _, after = measure_load(layer, opts, gen, figures)
    figures["heartbeat_moonshot"] = figures["heartbeat_c16"]
    summary = {}
    for key, _label, _unit, _bigger, goal in FIGURES:
        if not figures[key].rounds["service"]:
            continue
        s = figures[key].summary()
        s["pass"] = evaluate(key, s, goal)
        summary[key] = s
    result = {
        "server": layer, "config": layer_title(layer, opts), "workers": opts.workers, "threads": opts.threads,
        "elapsed_s": round(time.monotonic() - t0, 1), "figures": summary,
        "rss_after_load_mb": {who: {"rss": m[0] / MB, "pss": m[1] / MB, "processes": m[2]} for who, m in after.items()},
        "phases": sorted(opts.only),
        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    if opts.profile:
        result["profile"] = profile(layer, opts, gen, RESULTS)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", action="append", choices=SERVERS + ("all",),
                   help="server layer (repeatable; default gunicorn-sync, the configured one)")
    p.add_argument("--quick", action="store_true", help="short rounds: a smoke run")
    p.add_argument("--rounds", type=int, help="rounds per figure (default 5, quick 2)")
    p.add_argument("--duration", type=int, help="seconds per load round (default 5, quick 2)")
    p.add_argument("--workers", type=int,
                   help="workers (default: gunicorn.conf.py's, cores + 1; granian: cores)")
    p.add_argument("--threads", type=int,
                   help=f"gthread threads per worker (default {GTHREAD_THREADS}) / granian blocking threads "
                        f"per worker (default {GRANIAN_THREADS})")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    p.add_argument("--profile", action="store_true", help="also py-spy the service under heartbeat and create load")
    p.add_argument("--profile-only", action="store_true", help="only the profile, no figures")
    p.add_argument("--only", default="start,memory,load,app",
                   help="comma-separated phases: start, memory, load, app (in-process cost per route); default all")
    p.add_argument("--app-cost-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cprofile", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.app_cost_child:
        app_cost_child(opts.app_cost_child, opts.cprofile)
        return 0
    servers = opts.server or ["gunicorn-sync"]
    servers = list(SERVERS) if "all" in servers else list(dict.fromkeys(servers))
    opts.rounds = opts.rounds or (2 if opts.quick else 5)
    opts.duration = opts.duration or (2 if opts.quick else 5)
    opts.samples = 10 if opts.quick else 30
    opts.start_rounds = 1 if opts.quick else 3
    opts.memory_rounds = 1 if opts.quick else 2
    opts.only = {part.strip() for part in opts.only.split(",") if part.strip()}
    if not opts.only <= {"start", "memory", "load", "app"}:
        p.error("--only takes start, memory, load and/or app")

    if "granian" in servers and not (BIN / "granian").exists():
        p.error("granian is not installed in this environment: .venv/bin/pip install granian")
    wrk = None if opts.loadgen == "python" else ensure_wrk(not opts.no_install)
    if opts.loadgen == "wrk" and not wrk:
        p.error("wrk is not installed and could not be installed")
    gen = Wrk(wrk) if wrk else PyLoad()
    if not wrk:
        log("wrk not available: using the Python load generator (its own CPU use lowers every figure)")
    RESULTS.mkdir(parents=True, exist_ok=True)

    meta = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine(),
            "loadgen": f"wrk ({wrk}), 1 thread" if wrk else "python (processes x threads, keep-alive)",
            "rounds": opts.rounds, "duration_s": opts.duration, "listing_samples_per_round": opts.samples}
    runs, texts = [], []
    if opts.profile_only:
        log("\n== in-process cProfile (one thread, no server) ==")
        cost = measure_app_cost(opts, cprofile=True)
        for route, text in cost["cprofile"].items():
            print(f"\ncProfile of {route} requests straight through the WSGI app:\n{text}")
        runs.append({"server": "in-process", "app_cost": cost})
        for layer in servers:
            log(f"\n== profile: {layer} ==")
            runs.append({"server": layer, "profile": profile(layer, opts, gen, RESULTS)})
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS / f"profile-{stamp}-{'-'.join(servers)}.json"
        path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
        print(f"\nWrote {path}", flush=True)
        return 0
    for layer in servers if opts.only & {"start", "memory", "load"} else ():
        result = run_layer(layer, opts, gen)
        runs.append(result)
        rows = table_rows(result["figures"])
        title = layer_title(layer, opts)
        texts.append((title, rows))
        print(f"\n{title}\n{render_text(rows)}", flush=True)

    if len(runs) > 1:
        texts.append(("Server layers compared (absolute req/s, same run)", compare_layers(runs)))
        print(f"\n{texts[-1][0]}\n{render_text(texts[-1][1], COMPARE_HEAD)}", flush=True)
    app_cost = None
    if "app" in opts.only:
        log("\n== in-process cost per request (no server) ==")
        app_cost = measure_app_cost(opts, cprofile=opts.profile)
        texts.append(("In-process cost per request (straight through the WSGI app, one thread, no server)",
                      app_cost_rows(app_cost)))
        print(f"\n{texts[-1][0]}\n{render_text(texts[-1][1], APP_COST_HEAD)}", flush=True)
        for route, text in app_cost["cprofile"].items():
            print(f"\ncProfile of {route} requests straight through the WSGI app:\n{text}")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"bench-{stamp}-{'-'.join(servers)}{'-quick' if opts.quick else ''}"
    out = {"meta": meta, "runs": runs, "app_cost": app_cost}
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    m = meta["machine"]
    md = [f"Measured {meta['when']} on {m.get('cpu', '?')}, {m['cores']} cores, {m.get('memory_gb', '?')} GB, "
          f"Linux {m['kernel']}, Python {m['python']}; load generator {meta['loadgen']} on the same machine; "
          f"{opts.rounds} rounds x {opts.duration} s, service and ceiling interleaved. Command: `{meta['command']}`."]
    for title, rows in texts:
        head = (COMPARE_HEAD if title.startswith("Server layers")
                else APP_COST_HEAD if title.startswith("In-process") else HEAD)
        md += ["", f"**{title}**", "", render_markdown(rows, head)]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print(f"\nWrote {RESULTS / (name + '.json')} and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
