"""gunicorn settings: `gunicorn app:app` reads this file from the working directory."""

import os
import traceback

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '3013')}"
# One worker per core plus one: the database serialises writes, more workers only cost memory.
workers = int(os.environ.get("WEB_CONCURRENCY") or (os.cpu_count() or 1) + 1)
# gunicorn's sync worker, plus a deadline for slow clients and JSON refusals of malformed HTTP.
worker_class = "worker.Worker"
# The longest line gunicorn allows: a list query with two filters of 256 non-ASCII characters
# each, percent-encoded, is over 6 KB.
limit_request_line = 8190
# Longer than the SQLite busy timeout, so a worker waiting on the lock answers 503 before it is killed.
timeout = 30
graceful_timeout = 10
# No access log unless asked (ACCESS_LOG=1): runners heartbeat on every tool call. The format
# leaves out %(u)s and headers, so no credential is ever written.
accesslog = "-" if os.environ.get("ACCESS_LOG", "").lower() in ("1", "true") else None
# gunicorn 27's control socket lives at one path per user: a second server would take it over
# and stopping either would remove it. Nothing here uses it.
control_socket_disable = True
access_log_format = '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'


def on_starting(server):
    """Start-up work once, before any worker forks: key and schema.

    The database work runs in a short-lived child, so no connection can cross into the
    workers. With two or more workers the master imports the app first: workers fork with it
    loaded, answer at once after a (re)start, and share its pages (4 workers: 67 MB PSS
    against 172 MB when each imported it). With one worker there is nothing to share and the
    master's copy would only add ~35 MB of resident memory, so the master stays lean.
    """
    if server.cfg.workers > 1:
        import app as service
        from auth import ensure_key

        ensure_key(service.app)  # a file, no database: here, so the forked workers hold the key
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import app as service

            service.prepare(service.app)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("start-up failed (see above): the database or instance folder is not usable")


def post_worker_init(worker):
    """Each worker runs its own expiry sweeper thread, started after the fork."""
    import app as service
    from sweep import start_sweeper

    start_sweeper(service.app)
