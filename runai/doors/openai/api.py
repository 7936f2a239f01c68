# -*- test-case-name: runai.test.test_openai -*-
"""``/v1/...``: OpenAI's images API, answered by runai's core.

Each generation goes through the same core, queue, limits, validation and history as a
socket job, and its owner is the HTTP request: a client that disconnects cancels its
job. Errors are an HTTP status and ``{"error": {"message", "type", "param", "code"}}``.
Bodies with images, and large ones, are parsed in the pool, as images are converted.
"""

import json
import re

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import resource, server

from runai.core import errors
from runai.core.requests import Limits
from runai.doors.jsonobject import decode_object
from runai.doors.openai import multipart, parse, replies, site
from runai.doors.openai.store import ImageStore
from runai.doors.openai.stream import EventStream, OpenAIJob

PARSE_IN_THREAD_BYTES = 256 * 1024
# What a url reply may name as its host: the Host header when it is one, else the socket's.
HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
STREAMED = object()  # a route that answered by itself


class Raw:
    """A route's answer that is not JSON: bytes of a Content-Type."""

    def __init__(self, data, content_type):
        self.data = data
        self.content_type = content_type


def _take_body(request):
    """The request's body (bytes), which the request, and its site's budget of bodies,
    hold no more."""
    data = request.content.getvalue()
    if hasattr(request, "drop_body"):
        request.drop_body()
    return data


class Api(resource.Resource):
    """The routes under ``/v1``: ``core`` (:class:`runai.core.service.Core`) runs the
    jobs; ``pool`` parses bodies and converts images (None: in line); ``clock`` expires the
    images of url replies (by default ``reactor``)."""

    isLeaf = True
    log = Logger()

    def __init__(self, core, reactor, pool=None, token=None, limits=Limits(), clock=None):
        super().__init__()
        self.core = core
        self.reactor = reactor
        self.pool = pool
        self.token = token.encode("utf-8") if isinstance(token, str) else token
        self.limits = limits
        self.store = ImageStore(clock if clock is not None else reactor)

    # twisted.web -------------------------------------------------------------------

    def render(self, request):
        request.gone = False
        request.notifyFinish().addErrback(lambda _: setattr(request, "gone", True))
        request.setHeader("content-type", "application/json")
        if not site.authorized(request, self.token):
            return self._error(request, site.unauthorized(request))
        route = self._route(request.method, [p.decode("utf-8", "replace") for p in request.postpath])
        if route is None:
            path = request.path.decode("ascii", "replace")[:200]
            return self._error(request, errors.RunaiError(
                errors.NOT_FOUND, f"Invalid URL ({request.method.decode('ascii', 'replace')} {path})"))
        d = defer.maybeDeferred(route, request)
        d.addCallbacks(self._answer, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        return server.NOT_DONE_YET

    def _route(self, method, path):
        if path and path[-1] == "":
            path = path[:-1]
        if method == b"GET":
            if path == ["models"]:
                return self.models
            if len(path) >= 2 and path[0] == "models":
                return lambda request: self.model("/".join(path[1:]), request)
            if len(path) == 3 and path[:2] == ["images", "content"]:
                return lambda request: self.content(path[2], request)
        elif method == b"POST" and len(path) == 2 and path[0] == "images":
            return {"generations": self.generations, "edits": self.edits,
                    "variations": self.variations}.get(path[1])
        return None

    def _answer(self, value, request):
        if value is STREAMED or request.finished or request.gone:
            return
        if isinstance(value, Raw):
            request.setHeader("content-type", value.content_type)
            request.setHeader("cache-control", "private, no-store")
            request.write(value.data)
        else:
            request.write(json.dumps(value).encode("utf-8"))
        request.finish()

    def _failed(self, failure, request):
        if failure.check(errors.RunaiError):
            error = failure.value
            self.core.refused(error)  # counted unless a job's failure, or counted already
        else:
            self.log.failure("An OpenAI API request could not be handled", failure)
            error = errors.RunaiError(errors.INTERNAL, "the server failed to handle this request")
        if not request.finished and not request.gone:
            request.write(self._error(request, error))
            request.finish()

    def _error(self, request, error):
        status, body = replies.error_reply(error)
        request.setResponseCode(status)
        return json.dumps(body).encode("utf-8")

    def _off_reactor(self, f, *args):
        if self.pool is None:
            return defer.maybeDeferred(f, *args)
        return threads.deferToThreadPool(self.reactor, self.pool, f, *args)

    def _json_body(self, request):
        data = _take_body(request)
        if len(data) > PARSE_IN_THREAD_BYTES:
            return self._off_reactor(decode_object, data, "body")
        return defer.maybeDeferred(decode_object, data, "body")

    def _form(self, request):
        """The multipart form of a request (parsed in the pool: it holds images)."""
        content_type = (request.getHeader("content-type") or "")[:1000]
        return self._off_reactor(multipart.parse, _take_body(request), content_type)

    # Models ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _served(self):
        entries, _ = yield self.core.list_models()
        return [entry.name for entry in entries if entry.served]

    @staticmethod
    def _model_object(name):
        return {"id": name, "object": "model", "created": 0, "owned_by": "runai"}

    @defer.inlineCallbacks
    def models(self, request):
        names = yield self._served()
        return {"object": "list", "data": [self._model_object(name) for name in names]}

    @defer.inlineCallbacks
    def model(self, name, request):
        names = yield self._served()
        if name not in names:
            raise errors.RunaiError(errors.MODEL_NOT_FOUND, f"no model {name!r}: see GET /v1/models")
        return self._model_object(name)

    @defer.inlineCallbacks
    def _model_for(self, body):
        """The model a body names, or the first one served."""
        wanted = parse.wanted_model(body)
        if wanted is not None:
            return wanted
        names = yield self._served()
        if not names:
            raise errors.RunaiError(errors.MODEL_NOT_FOUND, "the model folder holds no model this server can run")
        return names[0]

    # Images ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def generations(self, request):
        body = yield self._json_body(request)
        reply = parse.reply_options(body)
        model = yield self._model_for(body)
        core_request = parse.generation(body, model, self.core.model_dir, self.limits)
        return (yield self._run(request, core_request, reply, "image_generation"))

    @defer.inlineCallbacks
    def edits(self, request):
        form = yield self._form(request)
        body = parse.form_body(form)
        reply = parse.reply_options(body)
        model = yield self._model_for(body)
        core_request = yield self._off_reactor(parse.edit, body, form.files, model, self.core.model_dir, self.limits)
        return (yield self._run(request, core_request, reply, "image_edit"))

    @defer.inlineCallbacks
    def variations(self, request):
        form = yield self._form(request)
        body = parse.form_body(form)
        reply = parse.reply_options(body, streams=False)
        model = yield self._model_for(body)
        core_request = yield self._off_reactor(parse.variation, body, form.files, model, self.core.model_dir,
                                               self.limits)
        return (yield self._run(request, core_request, reply, None))

    @defer.inlineCallbacks
    def _run(self, request, core_request, reply, prefix):
        if request.gone:
            raise errors.RunaiError(errors.CANCELLED, "the client went away before its job was queued")
        listener = OpenAIJob()
        job = self.core.submit(core_request, request, listener)
        # A client that goes away takes its job with it.
        request.notifyFinish().addErrback(lambda _: self.core.cancel(job))
        if reply.stream:
            EventStream(request, listener, core_request, reply, prefix, self._off_reactor)
            return STREAMED
        images = yield listener.result
        encoded = yield self._off_reactor(replies.encode_all, images, reply)
        return replies.images_response(encoded, core_request, reply, lambda data, ext: self._keep(request, data, ext))

    def _keep(self, request, data, extension):
        """Keep an image for a url reply; its URL, on the host the client asked."""
        key = self.store.put(data, parse.FORMATS[extension][0], extension)
        host = (request.getHeader("host") or "").strip()
        if not HOST_RE.match(host):
            address = request.getHost()
            name = getattr(address, "host", "127.0.0.1")
            host = f"[{name}]:{address.port}" if ":" in name else f"{name}:{getattr(address, 'port', '')}"
        scheme = "https" if request.isSecure() else "http"
        return f"{scheme}://{host}/v1/images/content/{key}.{extension}"

    def content(self, name, request):
        """``GET /v1/images/content/<id>.<ext>``: an image a url reply named, while kept."""
        key, _, extension = name.rpartition(".")
        kept = self.store.get(key, extension)
        if kept is None:
            raise errors.RunaiError(errors.NOT_FOUND, f"no image {name[:80]!r}: images of url replies are kept "
                                                      f"for {self.store.ttl // 60:g} minutes")
        return Raw(*kept)
