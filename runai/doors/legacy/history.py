# -*- test-case-name: runai.test.test_legacy_history -*-
"""The history actions over the socket: ``history``, ``history_get``, ``history_delete``.

Parsing is torch-free and store-free, like the rest of request validation: bad input is
answered at once, every size the client controls is bounded. Answering needs the
server's store (:mod:`runai.history.store`), which exists only when the server runs with
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
from runai.doors.legacy import replies

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


def parse_history(fields, rid=None):
    """A validated history request from its :class:`runai.core.fields.Fields`; raises
    :class:`runai.core.errors.RunaiError`."""
    action = fields.action
    if action == "history":
        query = fields.string("query", default="", max_chars=MAX_QUERY_CHARS)
        return HistoryList(
            limit=fields.integer("limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
            before=fields.integer("before", None, 1, MAX_REQUEST_ID),
            query=query or None,
            id=rid,
        )
    request_id = fields.integer("request_id", None, 1, MAX_REQUEST_ID, required=True)
    if action == "history_get":
        return HistoryGet(request_id=request_id, id=rid)
    if action == "history_delete":
        return HistoryDelete(request_id=request_id, id=rid)
    raise ValueError(f"not a history action: {action!r}")


# Answers (reactor thread) ------------------------------------------------------------

def answer(store, session, request):
    """Answer a history request for ``session`` (a :class:`runai.doors.legacy.session.Session`);
    the store's reads run on its own thread."""
    if store is None:
        session.send_error(
            errors.RunaiError(errors.NO_STORE, "this server keeps no history; start it with --db to keep one"),
            request.action, request.id)
        return None
    if isinstance(request, HistoryGet) and session.history_get is not None:
        session.send_error(
            errors.RunaiError(errors.QUEUE_FULL, "a history_get is still being sent on this connection; "
                                                 "ask for the next one after its 'done'"),
            request.action, request.id)
        return None
    handler = {HistoryList: _list, HistoryGet: _get, HistoryDelete: _delete}[type(request)]
    d = handler(store, session, request)
    d.addErrback(_failed, session, request)
    return d


def _reply(session, request, message):
    session.send(replies.of_request(request, message))


@inlineCallbacks
def _list(store, session, request):
    # One more than asked tells whether an older page exists.
    items = yield store.history(request.limit + 1, request.before, request.query)
    more = len(items) > request.limit
    items = items[:request.limit]
    _reply(session, request, {
        "action": "history", "items": items,
        "next_before": items[-1]["request_id"] if more else None,
    })


@inlineCallbacks
def _get(store, session, request):
    session.history_get = request
    try:
        yield _send_item(store, session, request)
    finally:
        if session.history_get is request:
            session.history_get = None


@inlineCallbacks
def _send_item(store, session, request):
    item = yield store.get(request.request_id)
    if item is None:
        session.send_error(errors.RunaiError(errors.NOT_FOUND, f"no request {request.request_id} in the history"),
                         request.action, request.id)
        return
    image_list = item.pop("image_list")
    _reply(session, request, {"action": "history_get", "item": item})
    params = item["params"]
    sent = 0
    # One image at a time: a request of 128 large images never sits in memory whole, and
    # each is read only once the client has read what was sent before it.
    for meta in image_list:
        yield session.when_writable()
        if session.closing:
            return
        png = yield store.image(meta["image_id"])
        if png is None:  # deleted meanwhile
            continue
        _reply(session, request, {
            "image": base64.b64encode(png).decode("ascii"), "reqtype": item["action"],
            "pos_x": params.get("pos_x", 0), "pos_y": params.get("pos_y", 0),
            "seed": meta["seed"], "width": meta["width"], "height": meta["height"], "index": meta["index"],
            "request_id": item["request_id"],
        })
        sent += 1
    _reply(session, request, {"action": "done", "images": sent})


@inlineCallbacks
def _delete(store, session, request):
    deleted = yield store.delete(request.request_id)
    if not deleted:
        session.send_error(errors.RunaiError(errors.NOT_FOUND, f"no request {request.request_id} in the history"),
                         request.action, request.id)
        return
    log.info("History: request {request_id} deleted", request_id=request.request_id)
    _reply(session, request, {"action": "history_delete", "request_id": request.request_id, "deleted": True})


def _failed(failure, session, request):
    log.failure("History action {action} failed", failure, action=request.action)
    session.send_error(errors.RunaiError(errors.INTERNAL, "the history database failed; see the server's log"),
                     request.action, request.id)
