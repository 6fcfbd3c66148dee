"""A first end-to-end pass over the main runner flow."""


def test_register_heartbeat_end(api):
    r = api.post("/api/active-sessions", json={"agentId": "a1", "taskId": "t1", "triggerType": "task_assigned"})
    assert r.status_code == 201, r.json
    s = r.json["session"]
    assert s["startedAt"] == s["lastHeartbeatAt"]
    assert api.put("/api/active-sessions/heartbeat/t1", agent="a1").json == {"updated": True}
    assert api.put("/api/active-sessions/heartbeat/t1", agent="a2").status_code == 403
    assert api.delete("/api/active-sessions/by-task/t1/").json == {"deleted": True}
    assert api.get("/api/active-sessions").json == {"sessions": []}
