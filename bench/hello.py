"""The ceiling: a hello-world Flask app served exactly like the service.

Each route answers the paths the benchmark drives with a constant JSON body, so the same
wrk scripts (which check every answer) run against it; it reads nothing, checks nothing and
touches no database.

    python bench/hello.py             # Flask's threaded server, like `python app.py`
    python bench/hello.py gunicorn -c gunicorn.conf.py bench.hello:app
    granian --interface wsgi bench.hello:app

The service's gunicorn.conf.py also holds server hooks that do the service's own work
(on_starting imports the service and prepares its database; post_worker_init starts its
expiry sweeper). The ceiling must not carry those: they would import the service into the
master and, through fork, into every worker, and touch a database the ceiling never uses.
So the `gunicorn` form above runs gunicorn's own WSGI application class and, after it has
read the same configuration file (and command line), puts every "Server Hooks" setting back
to gunicorn's default. Everything else (bind, workers, worker class, threads, timeouts,
keep-alive, logging, control socket) stays exactly as configured.
"""

import os
import sys

from flask import Flask

app = Flask(__name__)


@app.get("/health")
def health():
    return {"status": "ok", "version": "hello"}


@app.get("/api/active-sessions")
def list_sessions():
    return {"sessions": []}


@app.post("/api/active-sessions")
def create_session():
    return {"session": {}}, 201


@app.put("/api/active-sessions/heartbeat/<task_id>")
def heartbeat(task_id):
    return {"updated": True}


@app.delete("/api/active-sessions/by-task/<task_id>")
def delete_session_by_task(task_id):
    return {"deleted": True}


def run_gunicorn(argv):
    """Run gunicorn on argv like the `gunicorn` command, minus the config file's server hooks."""
    from gunicorn.app.wsgiapp import WSGIApplication

    class CeilingApplication(WSGIApplication):
        def load_config(self):
            super().load_config()
            for name, setting in self.cfg.settings.items():
                if setting.section == "Server Hooks":
                    self.cfg.set(name, setting.default)

    sys.argv = ["gunicorn", *argv]
    CeilingApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn").run()


if __name__ == "__main__":
    # Run as a script, this folder is sys.path[0] and its bench.py would shadow the `bench`
    # folder that `bench.hello:app` names; the working directory (the repository) serves instead.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    if len(sys.argv) > 1 and sys.argv[1] == "gunicorn":
        sys.exit(run_gunicorn(sys.argv[2:]))
    app.run(host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "3013")), threaded=True)
