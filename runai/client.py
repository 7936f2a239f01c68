# -*- test-case-name: runai.test.test_client -*-
"""Clients for runai's socket protocol: a Twisted protocol and a blocking one for scripts.

Both frame exactly like the legacy Krita client (JSON padded to whole packets, then an
EOM packet), so they double as a reference for client authors. Both speak TLS to an
``ssl:`` server when asked (``tls=True``), verifying its certificate and host name.
"""

import base64
import json
import socket
from dataclasses import dataclass

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, fail, succeed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from runai import tls as _tls
from runai.doors.legacy import framing


class ServerError(Exception):
    """The server answered ``{"error": {...}}``."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Image:
    png: bytes
    seed: object
    pos_x: int
    pos_y: int


# Options the legacy clients send as they are, without the action's prefix.
PLAIN_OPTIONS = ("pos_x", "pos_y", "model_base_path", "do_nsfw_filter")


def _base64(image):
    """An image for a request: a file's bytes become base64 text; text is sent as it is."""
    return base64.b64encode(image).decode("ascii") if isinstance(image, (bytes, bytearray)) else image


def generation_request(action, prompt, model, request_id=None, pixels=None, mask=None, **options):
    """A legacy-format request for one of the four modes (``action``: ``txt2img``,
    ``img2img``, ``inpaint``, ``outpaint``). Each option carries the action's prefix
    (``img2img_steps``) except :data:`PLAIN_OPTIONS`; ``pixels`` (the input picture) and
    ``mask`` are an image file's bytes, or base64 text. Options that are None are left out,
    so the server's defaults apply."""
    options.update(pixels=None if pixels is None else _base64(pixels),
                   mask=None if mask is None else _base64(mask))
    request = {"action": action, "options": {f"{action}_prompt": prompt, f"{action}_model": model}}
    for name, value in options.items():
        if value is not None:
            request["options"][name if name in PLAIN_OPTIONS else f"{action}_{name}"] = value
    if request_id is not None:
        request["id"] = request_id
    return request


def txt2img_request(prompt, model, request_id=None, **options):
    """A legacy-format txt2img request (see :func:`generation_request`)."""
    return generation_request("txt2img", prompt, model, request_id, **options)


def encode_request(obj, packet_size=framing.DEFAULT_PACKET_SIZE):
    return framing.encode(json.dumps(obj).encode("utf-8"), packet_size)


# Requests answered by one message whose action names the request.
SINGLE_REPLY_ACTIONS = ("pong", "models", "loras", "embeddings", "history", "history_delete")


def is_final(message):
    """True for the last message of a generation: done, or an error."""
    return "error" in message or message.get("action") == "done"


def image_of(message):
    return Image(base64.b64decode(message["image"]), message.get("seed"),
                 message.get("pos_x", 0), message.get("pos_y", 0))


class BlockingClient:
    """A plain-socket client for scripts: ``with BlockingClient() as c: c.generate(...)``.

    ``tls=True`` speaks TLS to an ``ssl:`` server, its certificate and host name verified
    against ``ca_file`` (PEM: a self-signed server's certificate) or the system's trust
    store; one that does not verify raises :class:`runai.tls.TLSError` before anything
    is sent.
    """

    def __init__(self, host="127.0.0.1", port=50007, packet_size=framing.DEFAULT_PACKET_SIZE, timeout=None,
                 token=None, tls=False, ca_file=None):
        self.packet_size = packet_size
        self.token = token
        if tls:
            self.sock = _tls.connect_socket(host, port, timeout=timeout, ca_file=ca_file)
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.decoder = framing.Decoder(packet_size, max_message_size=1 << 30)
        self._pending = []
        self._over_tls = tls
        self._answered = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

    def send(self, obj):
        if self.token is not None:
            obj = dict(obj, token=self.token)
        self.sock.sendall(encode_request(obj, self.packet_size))

    def send_control(self, byte):
        """``b"c"`` cancels this client's running job; ``b"x"`` asks the server to quit."""
        self.sock.sendall(byte * self.packet_size)

    def receive(self):
        """The next message from the server, as a dict; raises ConnectionError at EOF."""
        while not self._pending:
            data = self.sock.recv(1 << 16)
            if not data:
                if not (self._answered or self._over_tls):
                    # What a TLS server does with plain text: it closes without a word.
                    raise ConnectionError("the server closed the connection without answering; "
                                          "if it listens with an ssl: endpoint, connect with TLS (--tls)")
                raise ConnectionError("the server closed the connection")
            self._answered = True
            self._pending.extend(e for e in self.decoder.feed(data) if isinstance(e, framing.Message))
        return json.loads(self._pending.pop(0).payload)

    def ping(self):
        self.send({"action": "ping"})
        while True:
            message = self.receive()
            if message.get("action") == "pong":
                return message
            if "error" in message:
                raise ServerError(message["error"]["code"], message["error"]["message"])

    def models(self):
        """The server's model list: one dict per model (name, version, format, ...)."""
        self.send({"action": "models"})
        while True:
            message = self.receive()
            if message.get("action") == "models":
                return message.get("models", [])
            if "error" in message:
                raise ServerError(message["error"]["code"], message["error"]["message"])

    def loras(self):
        """The server's LoRA files: one dict per file (name, alias, path, version, size)."""
        self.send({"action": "loras"})
        while True:
            message = self.receive()
            if message.get("action") == "loras":
                return message.get("loras", [])
            if "error" in message:
                raise ServerError(message["error"]["code"], message["error"]["message"])

    def embeddings(self, model=None):
        """The server's textual-inversion embeddings: ``{"loaded": {name: {...}}, "skipped":
        {...}}`` for ``model`` (those its text encoders take, and the rest), or every file
        under ``loaded`` without one."""
        self.send({"action": "embeddings", "options": {} if model is None else {"model": model}})
        while True:
            message = self.receive()
            if message.get("action") == "embeddings":
                return {"loaded": message.get("loaded", {}), "skipped": message.get("skipped", {})}
            if "error" in message:
                raise ServerError(message["error"]["code"], message["error"]["message"])

    def run(self, request, on_message=None):
        """Send a generation request; return its images once done (raises ServerError)."""
        self.send(request)
        images = []
        while True:
            message = self.receive()
            if on_message is not None:
                on_message(message)
            if "image" in message:
                images.append(image_of(message))
            if "error" in message:
                raise ServerError(message["error"].get("code"), message["error"].get("message"))
            if is_final(message):
                return images

    def generate(self, prompt, model, on_message=None, **options):
        return self.run(txt2img_request(prompt, model, **options), on_message)


@implementer(IHandshakeListener)
class RunaiClientProtocol(Protocol):
    """A Twisted client: :meth:`request` returns a Deferred of the request's messages.

    Requests are answered in order by the server's one queue for a single connection's
    jobs, so replies are matched to requests by their ``id``; a request sent without one
    is given one. :func:`connect_client` connects one, over TLS too.
    """

    packet_size = framing.DEFAULT_PACKET_SIZE
    token = None  # the server's shared secret, when it asks for one

    def __init__(self, on_message=None):
        self.on_message = on_message
        self._waiting = {}
        self._next_id = 0
        self._handshake = []  # with TLS: Deferreds waiting for the server to be verified
        self.handshake_done = False

    def handshakeCompleted(self):
        """Twisted's TLS calls this once the server's certificate has verified."""
        self.handshake_done = True
        waiting, self._handshake = self._handshake, []
        for d in waiting:
            d.callback(self)

    def when_handshake_done(self):
        """A Deferred that fires with this protocol once the TLS handshake is done, or
        fails with the reason the connection was lost before that."""
        if self.handshake_done:
            return succeed(self)
        d = Deferred()
        self._handshake.append(d)
        return d

    def connectionMade(self):
        self.decoder = framing.Decoder(self.packet_size, max_message_size=1 << 30)

    def dataReceived(self, data):
        for event in self.decoder.feed(data):
            if isinstance(event, framing.Message):
                self.message_received(json.loads(event.payload))

    def message_received(self, message):
        if self.on_message is not None:
            self.on_message(message)
        rid = message.get("id")
        if rid not in self._waiting:
            return
        messages, d = self._waiting[rid]
        messages.append(message)
        if is_final(message) or message.get("action") in SINGLE_REPLY_ACTIONS:
            del self._waiting[rid]
            d.callback(messages)

    def request(self, obj):
        """Send ``obj``; fires with every message of its answer, the last one final."""
        obj = dict(obj)
        if self.token is not None:
            obj["token"] = self.token
        if obj.get("action") == "cancel":
            # A cancel's id is the job's: its answer is that job's own final message.
            self.transport.write(encode_request(obj, self.packet_size))
            return succeed(None)
        if obj.get("id") is None:
            self._next_id += 1
            obj["id"] = f"c{self._next_id}"
        d = Deferred()
        self._waiting[obj["id"]] = ([], d)
        self.transport.write(encode_request(obj, self.packet_size))
        return d

    def connectionLost(self, reason):
        waiting, self._waiting = self._waiting, {}
        for _, d in waiting.values():
            d.errback(reason)
        handshake, self._handshake = self._handshake, []
        for d in handshake:
            d.errback(reason)


def connect_client(reactor, host="127.0.0.1", port=50007, protocol=None, tls=False, ca_file=None,
                   timeout=30, handshake_timeout=_tls.HANDSHAKE_TIMEOUT):
    """Connect ``protocol`` (a new :class:`RunaiClientProtocol` by default) to a server.

    Fires with the protocol once it is connected; with ``tls=True``, once the TLS
    handshake is done and the server's certificate and host name have verified against
    ``ca_file`` (PEM) or the platform's trust store. A handshake that fails or is not
    answered within ``handshake_timeout`` seconds fails with :class:`runai.tls.TLSError`;
    what the protocol sent before is never sent in plain text.
    """
    protocol = RunaiClientProtocol() if protocol is None else protocol
    endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if not tls:
        return endpoints.connectProtocol(endpoint, protocol)
    try:
        endpoint = endpoints.wrapClientTLS(_tls.client_options(host, ca_file), endpoint)
    except _tls.TLSError:
        return fail()

    def verified(connected):
        d = connected.when_handshake_done().addTimeout(handshake_timeout, reactor)
        return d.addErrback(failed, connected)

    def failed(failure, connected):
        connected.transport.abortConnection()
        if failure.check(DeferredTimeout):
            raise _tls.no_handshake(host, port, handshake_timeout)
        raise _tls.lost_in_handshake(host, port, failure.value, ca_file)

    return endpoints.connectProtocol(endpoint, protocol).addCallback(verified)
