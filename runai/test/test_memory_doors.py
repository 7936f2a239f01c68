"""Unload, reload and memory through the core (runai.core.memory) and its doors: A1111's
``/sdapi/v1/unload-checkpoint``, ``/reload-checkpoint`` and ``/memory`` over real HTTP on
127.0.0.1, and the socket's ``unload``/``reload``/``memory`` actions, against the real
worker thread and the tiny model; a front without local workers answers for itself."""

import base64

import requests
from twisted.internet import defer
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from runai.core import memory
from runai.core.errors import RunaiError
from runai.core.service import Core
from runai.doors.http.memory import cuda
from runai.test.test_e2e import LegacyClient, legacy_request
from runai.test.test_http import TOKEN, HttpTestCase, pixels


def check_ram(test, ram):
    test.assertEqual(set(ram), {"free", "used", "total"})
    test.assertTrue(all(isinstance(v, int) for v in ram.values()))
    test.assertTrue(0 < ram["used"] <= ram["total"])
    test.assertEqual(ram["free"], ram["total"] - ram["used"])


class HttpMemoryTests(HttpTestCase):
    def get(self, path, **kwargs):
        return requests.get(f"{self.base}/{path}", timeout=120, **kwargs)

    def generate(self, seed=5):
        reply = self.post("txt2img", {"prompt": "a lighthouse", "seed": seed, "steps": 2, "width": 64, "height": 64})
        self.assertEqual(reply.status_code, 200, reply.text)
        return pixels(base64.b64decode(reply.json()["images"][0]))

    @inlineCallbacks
    def test_memory_on_cpu(self):
        reply = yield self.in_thread(self.get, "memory")
        self.assertEqual(reply.status_code, 200)
        body = reply.json()
        self.assertEqual(set(body), {"ram", "cuda"})
        check_ram(self, body["ram"])
        self.assertEqual(body["cuda"], {"error": "unavailable"})
        # A1111's own client reads it too.
        figures = yield self.in_thread(lambda: self.client().get_memory())
        self.assertEqual(set(figures), {"ram", "cuda"})

    @inlineCallbacks
    def test_unload_then_reload(self):
        first = yield self.in_thread(self.generate)
        self.assertEqual(len(self.queue.loaded_models()), 1)
        loads = self.worker._engine.load_count
        reply = yield self.in_thread(self.post, "unload-checkpoint", None)
        self.assertEqual((reply.status_code, reply.json()), (200, {}))
        self.assertEqual(self.queue.loaded_models(), ())
        reply = yield self.in_thread(self.post, "reload-checkpoint", None)
        self.assertEqual((reply.status_code, reply.json()), (200, {}))
        self.assertEqual(len(self.queue.loaded_models()), 1)
        self.assertEqual(self.worker._engine.load_count, loads + 1)
        # Reloading what is loaded costs nothing; the picture is the same as before the unload.
        yield self.in_thread(self.post, "reload-checkpoint", None)
        self.assertEqual(self.worker._engine.load_count, loads + 1)
        again = yield self.in_thread(self.generate)
        self.assertEqual(again, first)

    @inlineCallbacks
    def test_unload_with_nothing_loaded_and_reload_with_nothing_used(self):
        for path in ("unload-checkpoint", "reload-checkpoint"):
            reply = yield self.in_thread(self.post, path, None)
            self.assertEqual((reply.status_code, reply.json()), (200, {}))
        self.assertEqual(self.queue.loaded_models(), ())

    @inlineCallbacks
    def test_wrong_methods(self):
        for reply in (yield self.in_thread(lambda: [self.get("unload-checkpoint"), self.post("memory", None)])):
            self.assertEqual(reply.status_code, 404)


class HttpMemoryTokenTests(HttpTestCase):
    token = TOKEN

    @inlineCallbacks
    def test_the_token_guards_them(self):
        reply = yield self.in_thread(self.post, "unload-checkpoint", None)
        self.assertEqual(reply.status_code, 401)
        reply = yield self.in_thread(lambda: requests.get(f"{self.base}/memory", timeout=60))
        self.assertEqual(reply.status_code, 401)
        reply = yield self.in_thread(lambda: requests.get(
            f"{self.base}/memory", timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}))
        self.assertEqual(reply.status_code, 200)


class SocketMemoryTests(HttpTestCase):
    def ask(self, *messages):
        def run():
            client = LegacyClient(self.port.getHost().port)
            try:
                answers = []
                for message in messages:
                    client.send(message)
                    answers.append(client.until_final() if message.get("action") == "txt2img" else client.receive())
                return answers
            finally:
                client.close()
        return self.in_thread(run)

    @inlineCallbacks
    def test_unload_reload_memory(self):
        answers = yield self.ask(legacy_request(self.models, seed=3), {"action": "unload", "id": 1},
                                 {"action": "unload", "id": 2}, {"action": "reload", "id": "r"},
                                 {"action": "reload"}, {"action": "memory", "id": 9})
        self.assertEqual(answers[0][-1]["action"], "done")
        self.assertEqual(answers[1:5], [{"action": "unload", "unloaded": 1, "id": 1},
                                        {"action": "unload", "unloaded": 0, "id": 2},
                                        {"action": "reload", "loaded": 1, "id": "r"},
                                        {"action": "reload", "loaded": 0, "id": None}])
        figures = answers[5]
        self.assertEqual((figures["action"], figures["id"]), ("memory", 9))
        check_ram(self, figures["ram"])
        self.assertEqual(figures["devices"], [{"device": "cpu", "error": "unavailable"}])

    @inlineCallbacks
    def test_unknown_action_lists_them(self):
        [answer] = yield self.ask({"action": "unloadall", "id": 4})
        self.assertEqual(answer["error"]["code"], "unknown_action")
        self.assertIn("unload, reload, memory", answer["error"]["message"])


class Front:
    """A --broker front's back end, as runai.core.memory sees it: workers by name only."""
    workers = {"gpu-box-0": {"busy": False}}


class FailingWorker:
    def unload(self):
        return defer.fail(RunaiError("model_load_failed", "could not load model 'x'"))

    reload = memory = unload


class FrontTests(SynchronousTestCase):
    def test_a_front_answers_for_itself(self):
        core = Core(Front(), library=None, reactor=None)
        self.assertEqual(self.successResultOf(core.unload_models()), 0)
        self.assertEqual(self.successResultOf(core.reload_models()), 0)
        figures = self.successResultOf(core.memory())
        check_ram(self, figures["ram"])
        self.assertEqual(figures["devices"], [])
        self.assertEqual(cuda(figures["devices"]), {"error": memory.NO_LOCAL_WORKER})

    def test_a_workers_error_reaches_the_door_as_it_is(self):
        from zope.interface import directlyProvides

        worker = FailingWorker()
        directlyProvides(worker, memory.IMemoryControl)

        class Backend:
            workers = [worker]

        failure = self.failureResultOf(memory.reload(Backend()), RunaiError)
        self.assertEqual(failure.value.code, "model_load_failed")

    def test_cuda_takes_the_first_cuda_device(self):
        gpu = {"device": "cuda:1", "system": {"free": 1, "used": 2, "total": 3}}
        self.assertEqual(cuda([{"device": "cpu", "error": "unavailable"}, gpu]),
                         {"system": {"free": 1, "used": 2, "total": 3}})
        self.assertEqual(cuda([{"device": "cpu", "error": "unavailable"}]), {"error": "unavailable"})

