"""What comes in: reading JSON bodies and query strings, and the marshmallow schemas that check them."""

import orjson
from flask import request
from marshmallow import EXCLUDE, Schema, ValidationError, fields, pre_load, validate
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge, UnsupportedMediaType

from models import STATUSES

MAX_DEPTH = 32
_CONTROL = frozenset(chr(c) for c in (*range(0x20), *range(0x7F, 0xA0)))


class Text(fields.String):
    """A JSON string (never a coerced number) of bounded length in code points, without NUL."""

    def __init__(self, lo=0, hi=None, **kwargs):
        super().__init__(validate=validate.Length(min=lo, max=hi), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in value:
            raise ValidationError("Must not contain NUL characters.")
        return value


class Id(Text):
    """An id: 1-256 code points, no '/', no control characters, not '.' or '..'."""

    def __init__(self, **kwargs):
        super().__init__(1, 256, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if not is_id(value):
            raise ValidationError("Not a valid id: no '/', no control characters, not '.' or '..'.")
        return value


class Int(fields.Integer):
    """A JSON integer within bounds: "30", 30.5 and true are refused, not coerced."""

    def __init__(self, lo, hi, **kwargs):
        super().__init__(strict=True, validate=validate.Range(min=lo, max=hi), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool):
            raise ValidationError("Not a valid integer.")
        return super()._deserialize(value, attr, data, **kwargs)


class QueryInt(fields.Integer):
    """A query-string integer: plain decimal digits within bounds."""

    def __init__(self, lo, hi, **kwargs):
        super().__init__(validate=validate.Range(min=lo, max=hi), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12):
            raise ValidationError("Not a valid integer.")
        return super()._deserialize(value, attr, data, **kwargs)


def is_id(value):
    """Tell whether a string could be an id that a create accepts (so path lookups can skip others)."""
    return (
        0 < len(value) <= 256
        and "/" not in value
        and value not in (".", "..")
        and "\x00" not in value
        and _CONTROL.isdisjoint(value)
    )


class Body(Schema):
    """Base for JSON bodies: unknown keys are ignored, an optional null counts as not given."""

    class Meta:
        unknown = EXCLUDE

    @pre_load
    def drop_optional_nulls(self, data, **kwargs):
        """Drop optional fields sent as null so their defaults apply."""
        return {
            k: v for k, v in data.items()
            if v is not None or (k in self.fields and self.fields[k].required)
        }


class Query(Schema):
    """Base for query strings: unknown keys are ignored, an empty value is no filter."""

    class Meta:
        unknown = EXCLUDE

    @pre_load
    def drop_empty(self, data, **kwargs):
        """Treat ?agentId= like an absent agentId."""
        return {k: v for k, v in data.items() if v != ""}


class SessionCreateSchema(Body):
    """POST /api/active-sessions."""

    agentId = Id(required=True)
    triggerType = Text(1, 256, required=True)
    taskId = Id()
    inboxMessageId = Id()
    runnerSessionId = Id()
    runtimeInstanceId = Id()
    taskDescription = Text(0, 4096)


class ProviderSessionSchema(Body):
    """PUT /api/active-sessions/provider-session/{taskId}."""

    providerSessionId = Id(required=True)


class CleanupSchema(Body):
    """POST /api/active-sessions/cleanup; maxAgeMinutes has no load default: absent differs."""

    agentId = Id()
    maxAgeMinutes = Int(1, 525600)


class RecoverSchema(Body):
    """POST /api/active-sessions/recover-orphaned-tasks."""

    agentId = Id(required=True)
    minAgeSeconds = Int(1, 31536000, load_default=60)


class PagingQuery(Query):
    """limit and offset, where a route offers paging."""

    limit = QueryInt(1, 1000)
    offset = QueryInt(0, 10**9)


class SessionListQuery(PagingQuery):
    """GET /api/active-sessions filters."""

    agentId = Id()
    taskId = Id()
    runtimeInstanceId = Id()
    triggerType = Text(1, 256)


class HistoryQuery(PagingQuery):
    """GET /api/active-sessions/history filters."""

    agentId = Id()
    taskId = Id()


class TaskCreateSchema(Body):
    """POST /api/tasks."""

    task = Text(1, 65536, required=True)
    agentId = Id()
    priority = Int(0, 100, load_default=50)


class StatusList(fields.String):
    """One status or a comma-separated list of known ones."""

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        wanted = [part.strip() for part in value.split(",") if part.strip()]
        unknown = [part for part in wanted if part not in STATUSES]
        if unknown or not wanted:
            raise ValidationError(f"Unknown status; use one or more of: {', '.join(STATUSES)}.")
        return wanted


class TaskListQuery(PagingQuery):
    """GET /api/tasks filters."""

    agentId = Id()
    status = StatusList()


class TaskProgressSchema(Body):
    """POST /api/tasks/{id}/progress."""

    progress = Text(1, 65536, required=True)


class TaskSessionSchema(Body):
    """PUT /api/tasks/{id}/session."""

    claudeSessionId = Id(required=True)


class TaskFinishSchema(Body):
    """POST /api/tasks/{id}/finish."""

    status = fields.String(required=True, validate=validate.OneOf(("completed", "failed")))
    output = Text(0, 65536)
    failureReason = Text(0, 65536)


session_create_schema = SessionCreateSchema()
provider_session_schema = ProviderSessionSchema()
cleanup_schema = CleanupSchema()
recover_schema = RecoverSchema()
session_list_query = SessionListQuery()
history_query = HistoryQuery()
task_create_schema = TaskCreateSchema()
task_list_query = TaskListQuery()
task_progress_schema = TaskProgressSchema()
task_session_schema = TaskSessionSchema()
task_finish_schema = TaskFinishSchema()


def _too_deep(value):
    """Tell whether JSON nests objects/arrays more than MAX_DEPTH levels deep, without recursion."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return True
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return False


def _is_json(mimetype):
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def read_json():
    """Return the parsed body, or None when there is none; raise 400/413/415 for bad ones."""
    try:
        data = request.get_data(cache=True)  # a Content-Length over MAX_CONTENT_LENGTH raises 413 before reading
    except HTTPException:
        raise
    except Exception:  # the server's own error for a broken body (a bad chunk, a stalled client)
        raise BadRequest("Request body could not be read") from None
    if not data:
        return None
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        # A streamed (chunked) body is cut at the limit, not refused: one that reaches it is over it.
        raise RequestEntityTooLarge()
    if request.mimetype and not _is_json(request.mimetype):
        raise UnsupportedMediaType("Unsupported Content-Type: send application/json")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadRequest("Malformed JSON body") from None
    if _too_deep(value):
        raise BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
    if not isinstance(value, dict):  # also a JSON null: only an empty body is "no body"
        raise BadRequest("Request body must be a JSON object")
    return value


def load_body(schema):
    """Validate the JSON body against a schema; no body means every field takes its default."""
    value = read_json()
    return schema.load({} if value is None else value)


def load_query(schema):
    """Validate the query string against a schema (first value of each key)."""
    return schema.load(request.args.to_dict())
