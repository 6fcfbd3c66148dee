"""Background expiry: end sessions whose heartbeat stopped, and prune old history."""

import logging
import os
import random
import threading
from datetime import datetime, timedelta, timezone

import store
from models import stamp

log = logging.getLogger(__name__)
_started = {}  # pid -> sweeper thread: one per process, and a forked child starts its own
_lock = threading.Lock()


def sweep_once(ttl_minutes, history_days):
    """End every session silent for longer than the TTL, prune history; return how many ended."""
    moment = datetime.now(timezone.utc)
    stale = stamp(moment - timedelta(minutes=ttl_minutes))
    old = stamp(moment - timedelta(days=history_days))
    # Read first (a scan of live sessions, an indexed count of history): an idle sweep never
    # takes the write lock.
    with store.tx() as t:
        if not (store.count(t, cutoff=stale) or store.old_history(t, old)):
            return 0
    with store.tx(write=True) as t:
        ended = store.end(t, "expired", stamp(moment), cutoff=stale)
        store.prune_history(t, old)
    return ended


def _run(app, stop):
    """Sweep every SWEEP_INTERVAL_SECONDS (with jitter, so workers spread out) until stopped."""
    interval = app.config["SWEEP_INTERVAL_SECONDS"]
    delay = random.uniform(1, min(interval, 10))  # soon after start: clean up after downtime
    while not stop.wait(delay):
        try:
            with app.app_context():
                ended = sweep_once(app.config["SESSION_TTL_MINUTES"], app.config["HISTORY_DAYS"])
            if ended:
                log.info("sweep ended %d expired sessions", ended)
        except Exception:  # a failed sweep must not end the thread; the next one retries
            log.exception("sweep failed")
        delay = interval * random.uniform(0.8, 1.2)


def start_sweeper(app):
    """Start this process's sweeper thread unless disabled or already running; return it."""
    if not (app.config["SWEEP_INTERVAL_SECONDS"] > 0 and app.config["SESSION_TTL_MINUTES"] > 0):
        return None
    pid = os.getpid()
    if pid in _started:  # the per-request path under servers without a post-fork hook
        return _started[pid]
    with _lock:
        if pid in _started:
            return _started[pid]
        stop = threading.Event()
        thread = threading.Thread(target=_run, args=(app, stop), name="session-sweeper", daemon=True)
        thread.stop = stop
        _started[pid] = thread
        thread.start()
        return thread
