# -*- test-case-name: runai.test.test_http -*-
"""``/sdapi/v1/...``: AUTOMATIC1111's routes, answered by runai's core.

Each generation goes through the same core, queue, limits and validation as a socket
job, and its owner is the HTTP request: a client that disconnects cancels its job.
Errors are an HTTP status and ``{"error": code, "detail": message}``.
"""

import dataclasses
import json
import time

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import resource, server

from runai.core import errors
from runai.core.hires import LATENT_UPSCALE_MODES
from runai.core.hires_loras import job_loras
from runai.core.requests import Limits
from runai.doors.http import memory, parse, replies, samplers, site
from runai.doors.http.checkpoints import Checkpoints
from runai.doors.http.extras import Extras
from runai.doors.http.jobs import HttpJob, progress_reply
from runai.doors.http.lora_hashes import LoraHashes
from runai.models import embeddings, loras

# Bodies larger than this are parsed in the pool, not on the reactor; so is every body
# with images, which are checked by decoding them.
PARSE_IN_THREAD_BYTES = 256 * 1024
# AUTOMATIC1111's options for live previews, and their types.
PREVIEW_OPTIONS = {"live_previews_enable": bool, "show_progress_every_n_steps": int}


def _flag(request, name):
    """A query flag: ``?name=true`` (or 1)."""
    values = request.args.get(name) or [b""]
    return values[0].lower() in (b"true", b"1", b"yes")


# Routes AUTOMATIC1111's clients call for features runai does not have: empty answers.
EMPTY = {
    "hypernetworks": [], "face-restorers": [], "realesrgan-models": [],
    "prompt-styles": [], "sd-vae": [],
    "scripts": {"txt2img": [], "img2img": []},
    "script-info": [], "extensions": [],
}


class Gone(Exception):
    """The client left before its job was queued: nothing to queue, nothing to answer."""


def _still_there(request):
    if request.gone:
        raise Gone()


def _forget(failure):
    """Drop the frames an answered failure holds: they hold the request's body (a large
    one, parsed in a thread, is in its traceback), in reference cycles that only the
    garbage collector would break, seconds or minutes later."""
    error = failure.value
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
    failure.cleanFailure()


def _refused_in_thread(failure):
    """A request refused in the pool: its failure forgets the thread's frames (the pool's
    frame holds the failure, which holds the frame: a cycle that keeps the request's body
    until the garbage collector comes)."""
    if failure.check(errors.RunaiError):
        failure.cleanFailure()
    return failure


class Api(resource.Resource):
    """The routes under ``/sdapi/v1``: ``core`` (:class:`runai.core.service.Core`) runs
    the jobs; ``pool`` parses large bodies and hashes models (None: in line)."""

    isLeaf = True
    log = Logger()

    def __init__(self, core, reactor, pool=None, token=None, limits=Limits()):
        super().__init__()
        self.core = core
        self.reactor = reactor
        self.pool = pool
        self.token = token.encode("utf-8") if isinstance(token, str) else token
        self.limits = limits
        self.checkpoints = Checkpoints(core, reactor, pool)
        self.lora_hashes = LoraHashes(reactor, pool)
        self.extras = Extras(self, _still_there)  # the upscalers and the extras routes
        self.running = []  # this door's jobs in progress (HttpJob), oldest first
        # AUTOMATIC1111's defaults: a preview every 10 steps for /progress.
        self.previews = {"live_previews_enable": True, "show_progress_every_n_steps": 10}
        self.routes = {
            (b"POST", "txt2img"): self.txt2img,
            (b"POST", "img2img"): self.img2img,
            (b"GET", "sd-models"): self.sd_models,
            (b"GET", "sd-modules"): self.sd_modules,
            (b"GET", "upscalers"): self.extras.upscalers,
            (b"POST", "extra-single-image"): self.extras.single,
            (b"POST", "extra-batch-images"): self.extras.batch,
            (b"GET", "latent-upscale-modes"): lambda request: [{"name": name} for name in LATENT_UPSCALE_MODES],
            (b"POST", "refresh-checkpoints"): self.refresh_checkpoints,
            (b"GET", "loras"): lambda request: self._off_reactor(loras.listing, self.core.model_dir),
            (b"POST", "refresh-loras"): lambda request: self._off_reactor(loras.refresh, self.core.model_dir),
            (b"GET", "embeddings"): self.list_embeddings,
            (b"POST", "refresh-embeddings"): self.refresh_embeddings,
            (b"GET", "options"): self.get_options,
            (b"POST", "options"): self.set_options,
            (b"GET", "samplers"): lambda request: samplers.sampler_list(),
            (b"GET", "schedulers"): lambda request: samplers.schedule_list(),
            (b"GET", "progress"): lambda request: progress_reply(
                self.running, self.core.status(), _flag(request, b"skip_current_image")),
            (b"POST", "interrupt"): self.interrupt,
            (b"POST", "skip"): self.interrupt,
        }
        for name, value in EMPTY.items():
            self.routes[(b"GET", name)] = lambda request, value=value: value
        self.routes.update(memory.routes(core))  # unload-checkpoint, reload-checkpoint, memory

    # twisted.web -------------------------------------------------------------------

    def render(self, request):
        request.gone = False
        request.notifyFinish().addErrback(lambda _: setattr(request, "gone", True))
        request.setHeader("content-type", "application/json")
        if not site.authorized(request, self.token):  # the site refused it already; in case
            return self._error(request, site.unauthorized(request))
        route = self.routes.get((request.method, "/".join(p.decode("utf-8", "replace") for p in request.postpath)))
        if route is None:
            request.setResponseCode(404)
            return json.dumps({"detail": "Not Found"}).encode("utf-8")
        d = defer.maybeDeferred(route, request)
        d.addCallbacks(self._answer, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        return server.NOT_DONE_YET

    def _answer(self, value, request):
        if not request.finished and not request.gone:
            request.write(value if isinstance(value, bytes) else json.dumps(value).encode("utf-8"))
            request.finish()

    def _failed(self, failure, request):
        if failure.check(Gone):
            pass
        elif failure.check(errors.RunaiError):
            self.core.refused(failure.value)  # counted unless a job's failure, or counted already
            if not request.finished and not request.gone:
                request.write(self._error(request, failure.value))
                request.finish()
        else:
            self.log.failure("An HTTP request could not be handled", failure)
            if not request.finished and not request.gone:
                request.write(self._error(request, errors.RunaiError(
                    errors.INTERNAL, "the server failed to handle this request")))
                request.finish()
        _forget(failure)

    def _error(self, request, error):
        status, body = replies.error(error)
        request.setResponseCode(status, replies.REASONS.get(status, "Error").encode("ascii"))
        return json.dumps(body).encode("utf-8")

    def _off_reactor(self, f, *args):
        if self.pool is None:
            return defer.maybeDeferred(f, *args)
        return threads.deferToThreadPool(self.reactor, self.pool, f, *args).addErrback(_refused_in_thread)

    def _body(self, request):
        """A Deferred of the body's JSON object; the request holds its bytes no more."""
        data = request.take_body() if hasattr(request, "take_body") else request.content.getvalue()
        if len(data) > PARSE_IN_THREAD_BYTES:
            return self._off_reactor(parse.decode_body, data)
        return defer.maybeDeferred(parse.decode_body, data)

    # Generation ----------------------------------------------------------------------

    def txt2img(self, request):
        return self._generate(request, parse.txt2img, in_thread=False)

    def img2img(self, request):
        return self._generate(request, parse.img2img, in_thread=True)

    @defer.inlineCallbacks
    def _generate(self, request, build, in_thread):
        """The job of a request: checked (in the pool where it reads images), queued unless
        its client left meanwhile, and cancelled when its client leaves. The job keeps its
        request (with the images, checked and counted by the queue) and ``parameters`` to
        repeat, never the body."""
        started = time.time()
        body = yield self._body(request)
        _still_there(request)
        model = yield self.checkpoints.resolve(parse.wanted_model(body))
        _still_there(request)
        args = (build, body, model, self.core.model_dir, self.limits)
        core_request = yield (self._off_reactor(*args) if in_thread else defer.maybeDeferred(*args))
        every = self._preview_every(body)
        if every != core_request.preview_every:
            core_request = dataclasses.replace(core_request, preview_every=every)
        echo = parse.echo(body)
        del body, args
        _still_there(request)
        listener = HttpJob(self.running)
        job = self.core.submit(core_request, request, listener, held_bytes=len(echo))
        # A client that goes away takes its job with it.
        request.notifyFinish().addErrback(lambda _: self.core.cancel(job))
        hashes = self.lora_hashes.of(job_loras(core_request))  # both passes' LoRAs, while the job runs
        images = yield listener.result
        lora_hashes = yield hashes
        return replies.generated(core_request, images, echo, self.checkpoints, started, lora_hashes)

    def _preview_every(self, body):
        """Steps between live previews for ``/progress``: AUTOMATIC1111's options
        (``live_previews_enable``, ``show_progress_every_n_steps``; -1 or 0: none), which
        a body's ``override_settings`` may set for itself."""
        settings = dict(self.previews)
        override = body.get("override_settings")
        if isinstance(override, dict):
            settings.update((k, override[k]) for k in PREVIEW_OPTIONS if k in override)
        every = settings["show_progress_every_n_steps"]
        if settings["live_previews_enable"] is not True or isinstance(every, bool) or not isinstance(every, int):
            return 0
        return max(0, min(every, self.limits.max_steps))

    def interrupt(self, request):
        """Stop this door's running jobs; each answers with the images it has made."""
        for listener in list(self.running):
            if listener.job is not None and listener.job.state == "running":
                listener.interrupted = True
                self.core.cancel(listener.job)
        return {}

    # Models and options ---------------------------------------------------------------

    @defer.inlineCallbacks
    def sd_models(self, request):
        models = yield self.checkpoints.listing()
        return [{k: v for k, v in model.items() if k != "name"} for model in models]

    @defer.inlineCallbacks
    def sd_modules(self, request):
        """Forge's list of companion files (VAEs, text encoders) a model file may take, for
        ``forge_additional_modules``: named relative to the model folder."""
        entries, _ = yield self.core.list_models()
        return [{"model_name": entry.name.rsplit("/", 1)[-1].rsplit(".", 1)[0], "filename": entry.name}
                for entry in entries if entry.is_companion]

    @defer.inlineCallbacks
    def refresh_checkpoints(self, request):
        yield self.checkpoints.listing()
        return None

    @defer.inlineCallbacks
    def list_embeddings(self, request):
        """AUTOMATIC1111's ``loaded`` and ``skipped`` embeddings, for the default model."""
        try:
            model = yield self.checkpoints.resolve(None)
        except errors.RunaiError:
            model = None  # no model to say which fit: every file is listed
        listed = yield self._off_reactor(embeddings.for_model, self.core.model_dir, model)
        return listed

    @defer.inlineCallbacks
    def refresh_embeddings(self, request):
        yield self._off_reactor(embeddings.for_model, self.core.model_dir, None, True)
        return None

    @defer.inlineCallbacks
    def get_options(self, request):
        yield self.checkpoints.listing()
        try:
            name = self.checkpoints.default_model()
        except errors.RunaiError:
            name = None
        model = self.checkpoints.find(name) if name else None
        return {
            "sd_model_checkpoint": model["title"] if model else None,
            "sd_checkpoint_hash": model["sha256"] if model else None,
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
            **self.previews,
        }

    @defer.inlineCallbacks
    def set_options(self, request):
        """``sd_model_checkpoint`` and the live-preview options are honoured (clients post
        back whole option sets: the rest is ignored)."""
        body = yield self._body(request)
        for name, kind in PREVIEW_OPTIONS.items():
            value = body.get(name)
            if value is not None:
                if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
                    raise errors.RunaiError(errors.BAD_REQUEST, f"{name!r} must be {kind.__name__}")
                self.previews[name] = value
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None:
            if not isinstance(wanted, str):
                raise errors.RunaiError(errors.BAD_REQUEST, "'sd_model_checkpoint' must be a string")
            self.checkpoints.default = yield self.checkpoints.resolve(wanted)
            self.log.info("HTTP: the default model is now {name}", name=self.checkpoints.default)
        return None
