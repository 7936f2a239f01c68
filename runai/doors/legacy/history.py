"""The history actions over the socket: ``history``, ``history_get``, ``history_delete``.

Parsing is torch-free and store-free, like the rest of request validation: bad input is
answered at once, every size the client controls is bounded. Answering needs the
factory's store (:mod:`runai.store`), which exists only when the server runs with
``--db``; without it the actions are answered with the error ``no_store``.

Wire formats (each reply carries ``reqtype`` and the client's ``id``)::

    {"action": "history", "limit": 50, "before": 120, "query": "lighthouse"}
    -> {"action": "history", "items": [ITEM, ...], "next_before": 71 or null}

    {"action": "history_get", "request_id": 12}
    -> {"action": "history_get", "item": ITEM}
       {"image": "<base64 PNG>", "reqtype": "txt2img", "pos_x": 0, "pos_y": 0, "seed": 42,
        "width": 512, "height": 512, "index": 0, "request_id": 12}   (one per image)
       {"action": "done", "images": 1}

    {"action": "history_delete", "request_id": 12}
    -> {"action": "history_delete", "request_id": 12, "deleted": true}

An ITEM is ``{"request_id", "time", "finished", "action", "model", "prompt",
"negative_prompt", "params", "client_id", "status", "error", "seconds", "images"}``.
The image messages are those of a generation (their ``reqtype`` is the stored request's
action), so a legacy client shows them as it showed the originals.

One ``history_get`` at a time per connection: another one sent before the first's
``done`` is answered with the error ``queue_full``. Each image is read and sent only once
the client has read enough of what came before (:meth:`runai.doors.legacy.protocol.RunaiProtocol.when_writable`),
so a client that does not read cannot make the server queue a whole request's images.
"""

import base64
from dataclasses import dataclass
from typing import Optional

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from runai.core import errors

HISTORY_ACTIONS = ("history", "history_get", "history_delete")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_QUERY_CHARS = 1000
MAX_REQUEST_ID = 2**63 - 1

log = Logger(namespace="runai.doors.legacy.history")


@dataclass(frozen=True)
class HistoryList:
    action = "history"
    limit: int = DEFAULT_LIMIT
    before: Optional[int] = None
    query: Optional[str] = None
    id: object = None


@dataclass(frozen=True)
class HistoryGet:
    action = "history_get"
    request_id: int
    id: object = None


@dataclass(frozen=True)
class HistoryDelete:
    action = "history_delete"
    request_id: int
    id: object = None


HistoryRequest = (HistoryList, HistoryGet, HistoryDelete)


def _field(obj, name):
    """A field at the top level, or else in ``options`` (with or without the action prefix)."""
    if name in obj:
        return obj[name]
    options = obj.get("options")
    if isinstance(options, dict):
        for key in (f"{obj.get('action')}_{name}", name):
            if key in options:
                return options[key]
    return None


def _integer(obj, name, low, high, default=None, required=False):
    value = _field(obj, name)
    if value is None:
        if required:
            raise errors.RunaiError(errors.BAD_REQUEST, f"missing {name!r}")
        return default
    return errors.check_integer(value, repr(name), low, high)


def parse_history(action, obj, rid=None):
    """A validated history request; raises :class:`runai.core.errors.RunaiError`."""
    if action == "history":
        query = _field(obj, "query")
        if query is not None:
            if not isinstance(query, str):
                raise errors.RunaiError(errors.BAD_REQUEST, "'query' must be a string")
            if len(query) > MAX_QUERY_CHARS:
                raise errors.RunaiError(errors.OUT_OF_RANGE, f"'query' is longer than {MAX_QUERY_CHARS} characters")
        return HistoryList(
            limit=_integer(obj, "limit", 1, MAX_LIMIT, default=DEFAULT_LIMIT),
            before=_integer(obj, "before", 1, MAX_REQUEST_ID),
            query=query or None,
            id=rid,
        )
    request_id = _integer(obj, "request_id", 1, MAX_REQUEST_ID, required=True)
    if action == "history_get":
        return HistoryGet(request_id=request_id, id=rid)
    if action == "history_delete":
        return HistoryDelete(request_id=request_id, id=rid)
    raise ValueError(f"not a history action: {action!r}")


# Answers (reactor thread) ------------------------------------------------------------

def answer(store, proto, request):
    """Answer a history request on ``proto``; the store's reads run on its own thread."""
    if store is None:
        proto.send_error(
            errors.RunaiError(errors.NO_STORE, "this server keeps no history; start it with --db to keep one"),
            request.action, request.id)
        return None
    if isinstance(request, HistoryGet) and getattr(proto, "history_get", None) is not None:
        proto.send_error(
            errors.RunaiError(errors.QUEUE_FULL, "a history_get is still being sent on this connection; "
                                                 "ask for the next one after its 'done'"),
            request.action, request.id)
        return None
    handler = {HistoryList: _list, HistoryGet: _get, HistoryDelete: _delete}[type(request)]
    d = handler(store, proto, request)
    d.addErrback(_failed, proto, request)
    return d


def _reply(proto, request, message):
    message.setdefault("reqtype", request.action)
    message["id"] = request.id
    proto.send_message(message)


@inlineCallbacks
def _list(store, proto, request):
    # One more than asked tells whether an older page exists.
    items = yield store.history(request.limit + 1, request.before, request.query)
    more = len(items) > request.limit
    items = items[:request.limit]
    _reply(proto, request, {
        "action": "history", "items": items,
        "next_before": items[-1]["request_id"] if more else None,
    })


@inlineCallbacks
def _get(store, proto, request):
    proto.history_get = request
    try:
        yield _send_item(store, proto, request)
    finally:
        if proto.history_get is request:
            proto.history_get = None


@inlineCallbacks
def _send_item(store, proto, request):
    item = yield store.get(request.request_id)
    if item is None:
        proto.send_error(errors.RunaiError(errors.NOT_FOUND, f"no request {request.request_id} in the history"),
                         request.action, request.id)
        return
    image_list = item.pop("image_list")
    _reply(proto, request, {"action": "history_get", "item": item})
    params = item["params"]
    sent = 0
    # One image at a time: a request of 128 large images never sits in memory whole, and
    # each is read only once the client has read what was sent before it.
    for meta in image_list:
        yield proto.when_writable()
        if proto.closing:
            return
        png = yield store.image(meta["image_id"])
        if png is None:  # deleted meanwhile
            continue
        _reply(proto, request, {
            "image": base64.b64encode(png).decode("ascii"), "reqtype": item["action"],
            "pos_x": params.get("pos_x", 0), "pos_y": params.get("pos_y", 0),
            "seed": meta["seed"], "width": meta["width"], "height": meta["height"], "index": meta["index"],
            "request_id": item["request_id"],
        })
        sent += 1
    _reply(proto, request, {"action": "done", "images": sent})


@inlineCallbacks
def _delete(store, proto, request):
    deleted = yield store.delete(request.request_id)
    if not deleted:
        proto.send_error(errors.RunaiError(errors.NOT_FOUND, f"no request {request.request_id} in the history"),
                         request.action, request.id)
        return
    log.info("History: request {request_id} deleted", request_id=request.request_id)
    _reply(proto, request, {"action": "history_delete", "request_id": request.request_id, "deleted": True})


def _failed(failure, proto, request):
    log.failure("History action {action} failed", failure, action=request.action)
    proto.send_error(errors.RunaiError(errors.INTERNAL, "the history database failed; see the server's log"),
                     request.action, request.id)
