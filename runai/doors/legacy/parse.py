# -*- test-case-name: runai.test.test_legacy_parse -*-
"""The legacy wire format of requests: a JSON object with an ``action``, an optional
``id``, and ``options`` whose names carry the action as a prefix (``txt2img_steps``).

Turns a message into a door action (:class:`Ping`, :class:`Cancel`, :class:`ListModels`,
a history action) or a core request (:mod:`runai.core.requests`), checked; raises
:class:`runai.core.errors.RunaiError`. Touches no connection, so that it may run in a
thread for a large request.
"""

from dataclasses import dataclass

from runai.core import errors
from runai.core.fields import Fields
from runai.core.requests import GENERATION_ACTIONS, Limits, convert_request, generation_request
from runai.core.upscale import upscale_request
from runai.doors.jsonobject import decode_object
from runai.doors.legacy.history import HISTORY_ACTIONS, parse_history
from runai.doors.legacy.memory import MEMORY_ACTIONS, parse_memory

# The model library: list the model folder, convert a checkpoint into a diffusers folder.
LIBRARY_ACTIONS = ("models", "loras", "embeddings", "upscalers", "convert")
# An upscale's fields, in options (upscale_image) or beside the action (image).
UPSCALE_FIELDS = ("image", "upscaler", "scale", "width", "height", "crop", "pos_x", "pos_y")
MAX_ID_LENGTH = 128


@dataclass(frozen=True)
class Ping:
    id: object = None


@dataclass(frozen=True)
class Cancel:
    id: object = None


@dataclass(frozen=True)
class ListModels:
    id: object = None
    what: str = "models"  # or "loras": the LoRA files, as prompts name them; "embeddings"; "upscalers"
    model: object = None  # embeddings: the model whose encoders must take them (None: any)


class LegacyFields(Fields):
    """A legacy request's fields: ``<action>_<name>`` or plain ``<name>`` in ``options``;
    ``top_level`` names may also stand beside ``action`` (``pos_x`` for some clients,
    every history field), looked up first when ``top_first``."""

    def __init__(self, obj, top_level=(), top_first=False):
        self.action = obj.get("action")
        options = obj.get("options", {})
        if not isinstance(options, dict):
            if not top_first:
                raise errors.RunaiError(errors.BAD_REQUEST, "'options' must be a JSON object")
            options = {}  # a history request's fields are at the top level
        self.options = options
        self.obj = obj
        self.top_level = top_level
        self.top_first = top_first

    def _top(self, name):
        if (self.top_level is all or name in self.top_level) and name in self.obj:
            return repr(name), self.obj[name]
        return None

    def _in_options(self, name):
        for key in (f"{self.action}_{name}", name):
            if key in self.options:
                return f"option {key!r}", self.options[key]
        return None

    def lookup(self, name):
        sources = (self._top, self._in_options) if self.top_first else (self._in_options, self._top)
        for source in sources:
            found = source(name)
            if found is not None:
                return found
        # Absent: named as the first place it would have been looked for.
        return (repr(name), None) if self.top_first else (f"option '{self.action}_{name}'", None)


def decode_message(payload):
    """UTF-8 JSON object from a message's bytes, or a RunaiError."""
    return decode_object(payload, "message")


def request_id(obj):
    """The client's optional ``id``, if it is one we can echo; else None."""
    value = obj.get("id")
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and len(value) <= MAX_ID_LENGTH):
        return value
    return None


def reqtype(obj):
    action = obj.get("action")
    return action if isinstance(action, str) and len(action) <= 64 else None


def parse_request(obj, model_dir, limits=Limits()):
    """A validated request from a decoded message; raises :class:`RunaiError`."""
    action = obj.get("action")
    rid = request_id(obj)
    if "id" in obj and obj["id"] is not None and rid is None:
        raise errors.RunaiError(
            errors.BAD_REQUEST, f"'id' must be an integer or a string of at most {MAX_ID_LENGTH} characters"
        )
    if not isinstance(action, str):
        raise errors.RunaiError(errors.BAD_REQUEST, "the request has no 'action' string")
    if action == "ping":
        return Ping(id=rid)
    if action == "cancel":
        return Cancel(id=rid)
    if action in GENERATION_ACTIONS:
        # pos_x/pos_y sit in options for legacy clients, at the top level for some others.
        return generation_request(action, LegacyFields(obj, top_level=("pos_x", "pos_y")), model_dir, limits, rid)
    if action in ("models", "loras", "upscalers"):
        return ListModels(id=rid, what=action)
    if action == "embeddings":
        fields = LegacyFields(obj, top_level=("model",))
        model = fields.raw("model")
        return ListModels(id=rid, what=action, model=None if model is None else fields.string("model", max_chars=4096))
    if action == "convert":
        return convert_request(LegacyFields(obj), model_dir, rid)
    if action == "upscale":
        return upscale_request(LegacyFields(obj, top_level=UPSCALE_FIELDS), model_dir, limits, id=rid)
    if action in HISTORY_ACTIONS:
        return parse_history(LegacyFields(obj, top_level=all, top_first=True), rid)
    if action in MEMORY_ACTIONS:
        return parse_memory(action, rid)
    raise errors.RunaiError(
        errors.UNKNOWN_ACTION,
        f"unknown action {action[:64]!r}; known: "
        f"{', '.join(('ping', 'cancel') + GENERATION_ACTIONS + ('upscale',) + LIBRARY_ACTIONS + HISTORY_ACTIONS + MEMORY_ACTIONS)}",
    )
