"""Schema upgrades: a database made by an earlier version is upgraded in place without losing a row."""

import shutil
from pathlib import Path

from urllib.parse import quote

from sqlalchemy import inspect, select, update

from conftest import Api, make_app, wipe
from models import MIGRATIONS, ActiveSession, SchemaVersion, create_schema, db
from test_sessions import AWKWARD

FIXTURE = Path(__file__).parent / "fixtures" / "schema_v1.db"


def test_first_release_database_is_upgraded_in_place(tmp_path):
    path = tmp_path / "v1.db"
    shutil.copy(FIXTURE, path)
    app = make_app(f"sqlite:///{path}", tmp_path)  # make_app runs create_schema: the upgrade
    try:
        api = Api(app.test_client())
        sessions = api.get("/api/active-sessions?agentId=agent-v1").json["sessions"]
        assert sorted(s["taskId"] for s in sessions) == ["task-v1-0", "task-v1-1", "task-v1-2"]
        assert all(s["taskDescription"].startswith("made by schema v1") for s in sessions)
        assert sessions == [api.get(f"/api/active-sessions/{s['id']}").json["session"] for s in sessions]
        tasks = api.get("/api/tasks?agentId=agent-v1").json
        assert tasks["total"] == 1 and tasks["tasks"][0]["status"] == "in_progress"
        logs = api.get(f"/api/tasks/{tasks['tasks'][0]['id']}").json["logs"]
        assert [(entry["oldValue"], entry["newValue"]) for entry in logs] == [("pending", "in_progress")]
        # The new table works on the upgraded file.
        assert api.delete("/api/active-sessions/by-task/task-v1-0").json == {"deleted": True}
        assert api.get("/api/active-sessions/history").json["total"] == 1
        with app.app_context():
            assert db.session.scalar(select(SchemaVersion.version)) == len(MIGRATIONS)
            create_schema()  # a second start changes nothing
            assert db.session.scalar(select(SchemaVersion.version)) == len(MIGRATIONS)
        assert len(api.get("/api/active-sessions").json["sessions"]) == 2
    finally:
        wipe(app)


def test_upgrade_from_each_earlier_version(database_url, tmp_path):
    """Stop at every earlier version with a row in it, then upgrade: the row survives."""
    app = make_app(database_url, tmp_path)
    try:
        for version in range(1, len(MIGRATIONS)):
            with app.app_context():
                with db.engine.begin() as conn:
                    names = [t for t in inspect(conn).get_table_names()]
                for name in names:
                    with db.engine.begin() as conn:
                        conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}" CASCADE'
                                             if conn.dialect.name == "postgresql" else f'DROP TABLE "{name}"')
                with db.engine.begin() as conn:
                    for step in MIGRATIONS[:version]:
                        step(conn)
            api = Api(app.test_client())
            made = api.post("/api/active-sessions", json={"agentId": "a", "taskId": f"v{version}", "triggerType": "x"})
            assert made.status_code == 201
            with app.app_context():
                create_schema()
                assert db.session.scalar(select(SchemaVersion.version)) == len(MIGRATIONS)
            listed = api.get("/api/active-sessions").json["sessions"]
            assert listed == [made.json["session"]]
    finally:
        wipe(app)


def test_listing_heads_of_existing_rows_are_encoded_by_the_database(database_url, tmp_path):
    """Step 4 fills listing_head in SQL for rows made before it: listed exactly as fetched."""
    app = make_app(database_url, tmp_path)
    try:
        api = Api(app.test_client())
        body = {"agentId": "é-😀", "taskId": "t-é😀\\\"", "triggerType": "t\"\\", "taskDescription": AWKWARD,
                "runnerSessionId": "r\u2028", "inboxMessageId": "<script>&amp;"}
        made = [api.post("/api/active-sessions", json=body).json["session"],
                api.post("/api/active-sessions", json={"agentId": "a", "triggerType": "x"}).json["session"]]
        path = f"/api/active-sessions/provider-session/{quote(body['taskId'], safe='')}"
        assert api.put(path, json={"providerSessionId": "p-\"é"}).json == {"updated": True}
        with app.app_context():
            with db.engine.begin() as conn:
                conn.execute(update(ActiveSession.__table__).values(listing_head=None))
                conn.execute(update(SchemaVersion.__table__).values(version=3))
            create_schema()
        listed = api.get("/api/active-sessions").json["sessions"]
        assert sorted(s["id"] for s in listed) == sorted(s["id"] for s in made)
        assert listed == [api.get(f"/api/active-sessions/{s['id']}").json["session"] for s in listed]
        assert {s["taskDescription"] for s in listed} == {AWKWARD, None}
    finally:
        wipe(app)
