"""/health that tells failing workers, and runai-worker's --token-file (runai.ops)."""

import atexit
import base64
import json
import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai.backends.local import LocalWorker
from runai.broker import worker_tap
from runai.core import errors
from runai.core.interfaces import IWorker
from runai.core.jobs import Job
from runai.core.memory import IMemoryControl
from runai.ops import health
from runai.ops.metrics import Metrics
from runai.ops.wiring import ObservedWorker, WatchedWorker, front_metrics, worker_metrics
from runai.options import OptionError
from runai.test import test_e2e as e2e
from runai.test.test_metrics import get, samples

TOKEN = "worker-metrics-token-0123456789"
BROKER = ["--broker", "redis://127.0.0.1:6379/0"]


class _Request:
    action = "txt2img"


class _Thread:
    def is_alive(self):
        return True


class _Pool:
    threads = (_Thread(),)


class FakeWorker:
    """A worker whose thread lives and whose jobs end as ``outcomes`` say, in turn."""

    device = "cpu"
    running = True
    pool = _Pool()

    def __init__(self):
        self.outcomes = []

    def run(self, job):
        outcome = self.outcomes.pop(0)
        return defer.fail(outcome) if isinstance(outcome, Exception) else defer.succeed(outcome)

    def loaded_models(self):
        return ()

    def cache_bytes(self):
        return 0


def run_jobs(worker, *outcomes):
    """Run one job per outcome on ``worker`` (a wrapper of a FakeWorker)."""
    worker.worker.outcomes.extend(outcomes)
    for _ in outcomes:
        job = Job(_Request(), None, None)
        job.state = "running"
        worker.run(job).addErrback(lambda _: None)


def load_failed():
    # What a load failure says can name the file; /health must not repeat it.
    return errors.RunaiError(errors.MODEL_LOAD_FAILED, "cannot read /srv/models/secret-model.safetensors")


class WorkerOptionsTests(SynchronousTestCase):
    def token_file(self, text=TOKEN):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text + "\n")
        return path

    def parse(self, *args):
        options = worker_tap.Options()
        options.parseOptions(BROKER + list(args))
        return options

    def test_no_token_unless_given(self):
        self.assertIsNone(self.parse("--metrics", "0")["token"])

    def test_the_token_guards_the_metrics(self):
        options = self.parse("--metrics", "0", "--token-file", self.token_file())
        self.assertEqual((options["token"], options["metrics-public"]), (TOKEN, 0))
        options = self.parse("--metrics", "0", "--token-file", self.token_file(), "--metrics-public")
        self.assertEqual((options["token"], options["metrics-public"]), (TOKEN, 1))

    def test_bad_token_files_end_the_start_in_one_line(self):
        for args, said in ((["--metrics", "0", "--token-file", "/no/such/file"], "no such file"),
                           (["--metrics", "0", "--token-file", self.token_file("short")], "at least 16"),
                           (["--token-file", self.token_file()], "needs --metrics")):
            with self.assertRaises(OptionError) as caught:
                self.parse(*args)
            self.assertIn("--token-file", str(caught.exception))
            self.assertIn(said, str(caught.exception))
            self.assertEqual(len(str(caught.exception).splitlines()), 1)


class WorkerSiteTests(TestCase):
    """A runai-worker's --metrics site, over a real socket on 127.0.0.1."""

    def listen(self, **config):
        observed, site, started = worker_metrics(dict(config), reactor, [FakeWorker()])
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        started(port)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_the_token_guards_both_pages(self):
        port = self.listen(token=TOKEN)
        basic = "Basic " + base64.b64encode(f"prometheus:{TOKEN}".encode()).decode()
        for path in ("/metrics", "/health"):
            status, _ = yield get(port, path)
            self.assertEqual(status, 401)
            status, _ = yield get(port, path, {"Authorization": "Bearer " + "x" * len(TOKEN)})
            self.assertEqual(status, 401)
            for header in (f"Bearer {TOKEN}", basic):
                status, body = yield get(port, path, {"Authorization": header})
                self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {"status": "ok", "workers": 1, "failing": 0})

    @defer.inlineCallbacks
    def test_public_metrics_need_no_token(self):
        port = self.listen(token=TOKEN, **{"metrics-public": True})
        status, body = yield get(port, "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(samples(body)[("runai_workers", ())], 1)

    def test_beyond_loopback_without_a_token_is_warned_about(self):
        class Port:
            def getHost(self):
                return IPv4Address("TCP", "0.0.0.0", 9108)

        said = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for token, warned in ((TOKEN, 0), (None, 1)):
            _, _, started = worker_metrics({"token": token}, MemoryReactorClock(), [FakeWorker()])
            before = len(said)
            started(Port())
            warnings = [e for e in list(said)[before:] if e["log_level"].name == "warn"]
            self.assertEqual(len(warnings), warned)


class FailingTests(SynchronousTestCase):
    """A worker whose last three jobs failed to load a model or on the device is failing."""

    def setUp(self):
        self.watch = health.FailureWatch()
        self.workers = [ObservedWorker(FakeWorker(), Metrics(), watch=self.watch) for _ in range(2)]
        self.check = health.local_check([w.worker for w in self.workers], self.watch)

    def test_three_failures_make_a_worker_failing_and_a_success_clears_it(self):
        first, second = self.workers
        run_jobs(first, load_failed(), load_failed())
        self.assertEqual(self.check().body(), {"status": "ok", "workers": 2, "failing": 0})
        run_jobs(first, errors.RunaiError(errors.OUT_OF_MEMORY, "out of memory"))
        self.assertEqual(self.check().body(), {"status": "ok", "workers": 1, "failing": 1})
        run_jobs(second, load_failed(), RuntimeError("CUDA error: device lost"), load_failed())
        found = self.check()
        self.assertEqual((found.ok, found.workers, found.failing), (False, 0, 2))
        self.assertIn("every live worker is failing", found.reason)
        self.assertNotIn("secret-model", found.reason)
        self.assertNotIn("/srv", found.reason)
        run_jobs(second, "an image")
        self.assertEqual(self.check().body(), {"status": "ok", "workers": 1, "failing": 1})

    def test_a_requests_own_errors_neither_count_nor_clear(self):
        first, _ = self.workers
        run_jobs(first, load_failed(), errors.JobCancelled(), load_failed(),
                 errors.RunaiError(errors.BAD_REQUEST, "no"), load_failed())
        self.assertTrue(self.watch.failing(first.worker))
        run_jobs(first, errors.JobCancelled())
        self.assertTrue(self.watch.failing(first.worker))

    def test_a_dead_thread_and_a_failing_worker(self):
        first, second = self.workers
        second.worker.running = False
        run_jobs(first, load_failed(), load_failed(), load_failed())
        found = self.check()
        self.assertEqual(found.body()["status"], "unavailable")
        self.assertIn("1 worker thread(s) are not alive", found.reason)
        self.assertEqual(found.failing, 1)

    def test_the_failing_gauge(self):
        metrics = Metrics()
        watch = health.FailureWatch()
        worker = ObservedWorker(FakeWorker(), metrics, watch=watch)
        check = health.local_check([worker.worker], watch)
        metrics.watch(workers=lambda: check().workers, workers_failing=lambda: check().failing)
        run_jobs(worker, load_failed(), load_failed(), load_failed())
        from prometheus_client import generate_latest
        found = samples(generate_latest(metrics.registry).decode("utf-8"))
        self.assertEqual((found[("runai_workers", ())], found[("runai_workers_failing", ())]), (0, 1))

    def test_a_watched_worker_keeps_what_its_worker_provides(self):
        worker = LocalWorker(MemoryReactorClock(), device="cpu")
        watched = WatchedWorker(worker, self.watch)
        self.assertTrue(IWorker.providedBy(watched))
        self.assertTrue(IMemoryControl.providedBy(worker))
        self.assertTrue(IMemoryControl.providedBy(watched))
        self.assertEqual(watched.device, "cpu")


_models = None


def models_with_a_broken_one():
    """A model folder built once: v1/tiny, and v1/broken, the same model with its UNet's
    weights cut short (it is listed and classified, and fails to load)."""
    global _models
    if _models is None:
        from runai.test.tiny import build_tiny_pipeline
        _models = os.path.realpath(tempfile.mkdtemp(prefix="runai-health-"))
        atexit.register(shutil.rmtree, _models, True)
        build_tiny_pipeline(os.path.join(_models, "v1", "tiny"))
        shutil.copytree(os.path.join(_models, "v1", "tiny"), os.path.join(_models, "v1", "broken"))
        for folder, _, names in os.walk(os.path.join(_models, "v1", "broken", "unet")):
            for name in names:
                if name.endswith(".safetensors"):
                    with open(os.path.join(folder, name), "r+b") as f:
                        f.truncate(100)
    return _models


class RealLoadFailureTests(e2e.LiveServer, TestCase):
    """twistd runai's local worker, through the queue: three jobs on a model that fails to
    load make /health 503, one on a good model makes it 200 again."""

    timeout = 300

    def setUp(self):
        self.models = models_with_a_broken_one()
        self.start_server(self.models, idle_timeout=30)
        site, started = front_metrics({"token": None}, reactor, self.core, [self.worker])
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.metrics_port = port.getHost().port

    @defer.inlineCallbacks
    def test_failing_then_serving_again(self):
        broken = os.path.join(self.models, "v1", "broken")
        answers = yield self.talk(*[e2e.legacy_request(self.models, seed=n, txt2img_model=broken) for n in (1, 2)])
        self.assertEqual([a[-1]["error"]["code"] for a in answers], [errors.MODEL_LOAD_FAILED] * 2)
        status, body = yield get(self.metrics_port, "/health")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok", "workers": 1, "failing": 0}))
        [answer] = yield self.talk(e2e.legacy_request(self.models, seed=3, txt2img_model=broken))
        self.assertEqual(answer[-1]["error"]["code"], errors.MODEL_LOAD_FAILED)
        status, body = yield get(self.metrics_port, "/health")
        self.assertEqual(status, 503)
        found = json.loads(body)
        self.assertEqual((found["status"], found["failing"]), ("unavailable", 1))
        self.assertIn("failing", found["reason"])
        self.assertNotIn("broken", body)
        self.assertNotIn(self.models, body)
        self.assertNotIn("lighthouse", body)
        status, body = yield get(self.metrics_port, "/metrics")
        self.assertEqual(samples(body)[("runai_workers_failing", ())], 1)
        [answer] = yield self.talk(e2e.legacy_request(self.models, seed=4))
        self.assertEqual(answer[-1]["action"], "done")
        status, body = yield get(self.metrics_port, "/health")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok", "workers": 1, "failing": 0}))
