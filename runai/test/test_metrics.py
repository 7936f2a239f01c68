"""--metrics: the options, what is counted, /metrics and /health (runai.ops)."""

import json
import os
import urllib.error
import urllib.request

import requests
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from runai import tap
from runai.backends.local import LocalWorker
from runai.broker import worker_tap
from runai.core import errors
from runai.core.jobs import Job
from runai.doors.http.api import Api
from runai.doors.http.site import make_site as http_site
from runai.models.library import ModelLibrary
from runai.ops import health, options as ops_options
from runai.ops.metrics import Metrics, cuda_memory, door_of
from runai.ops.site import make_site
from runai.ops.wiring import ObservedWorker, front_metrics
from runai.options import OptionError
from runai.test import test_e2e as e2e
from runai.core.jobs import NullListener
from runai.core.requests import GenerationRequest
from runai.test import support
from runai.test.support import make_server

TOKEN = "s3cret-token-for-metrics"


def samples(text):
    """``{(name, sorted labels): value}`` of a scrape, by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def get(port, path, headers=None):
    """``(status, body)`` of GET ``path`` on 127.0.0.1:``port``, in a thread."""
    def fetch():
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8")
    return threads.deferToThread(fetch)


class OptionsTests(SynchronousTestCase):
    def parse(self, *args):
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def test_off_unless_given(self):
        options = self.parse()
        self.assertIsNone(options["metrics"])
        self.assertFalse(options["metrics-public"])

    def test_a_port_listens_on_loopback_and_an_endpoint_is_kept(self):
        self.assertEqual(self.parse("--metrics", "9108")["metrics"], "tcp:port=9108:interface=127.0.0.1")
        endpoint = "tcp:9108:interface=0.0.0.0"
        options = self.parse("--metrics", endpoint, "--metrics-public")
        self.assertEqual((options["metrics"], options["metrics-public"]), (endpoint, 1))

    def test_bad_values_end_the_start_in_one_line(self):
        for args in (["--metrics", "99999"], ["--metrics", "bogus:1"], ["--metrics", " "], ["--metrics-public"]):
            with self.assertRaises(OptionError) as caught:
                self.parse(*args)
            self.assertIn("--metrics", str(caught.exception))

    def test_runai_worker_takes_them_too(self):
        options = worker_tap.Options()
        options.parseOptions(["--broker", "redis://127.0.0.1:6379/0", "--metrics", "0", "--metrics-public"])
        self.assertEqual(options["metrics"], "tcp:port=0:interface=127.0.0.1")
        self.assertRaises(usage.UsageError, ops_options.check, {"metrics": "tcp:port=x"})

    def test_the_service_tree_listens_only_when_asked(self):
        def names(*args):
            service = tap.makeService(self.parse("--port", "0", "--device", "cpu", *args), reactor=MemoryReactorClock())
            return [s.name for s in service]
        self.assertNotIn("metrics", names())
        self.assertIn("metrics", names("--metrics", "0"))


class _Request:
    action = "txt2img"


class _DoorListener:
    """A listener of no door runai knows."""


class CountingTests(SynchronousTestCase):
    def test_labels_come_from_closed_sets(self):
        metrics = Metrics()
        job = Job(_Request(), None, None)
        job.request.action = "a prompt, never a label"
        metrics.job_ended(job, "somewhere", "ok")
        error = errors.RunaiError("/a/path/never/a/label", "x")
        metrics.count_refused(error)
        metrics.count_refused(error)  # the same error told twice is counted once
        found = samples(_text(metrics))
        self.assertEqual(found[("runai_jobs_total", (("action", "other"), ("door", "other"), ("outcome", "ok")))], 1)
        self.assertEqual(found[("runai_requests_refused_total", (("code", "other"),))], 1)
        self.assertEqual(door_of(_DoorListener()), "other")

    def test_queue_wait_and_run_time_come_from_the_job_states(self):
        metrics = Metrics(clock=lambda: 15.0)
        job = Job(_Request(), None, None)
        job.state = "queued"
        job.state = "running"
        self.assertLessEqual(job.stamps["queued"], job.stamps["running"])
        job.stamps.update(queued=10.0, running=12.0)
        metrics.job_ended(job, "http", "ok")
        cancelled = Job(_Request(), None, None)
        cancelled.state = "queued"
        metrics.job_ended(cancelled, "http", "cancelled")  # never ran: no wait, no run time
        found = samples(_text(metrics))
        self.assertEqual(found[("runai_queue_wait_seconds_count", ())], 1)
        self.assertEqual(found[("runai_queue_wait_seconds_sum", ())], 2.0)
        self.assertEqual(found[("runai_job_seconds_sum", ())], 3.0)
        self.assertEqual(found[("runai_queue_wait_seconds_bucket", (("le", "2.0"),))], 1)
        self.assertEqual(found[("runai_queue_wait_seconds_bucket", (("le", "1.0"),))], 0)
        cancelled = ("runai_jobs_total", (("action", "txt2img"), ("door", "http"), ("outcome", "cancelled")))
        self.assertEqual(found[cancelled], 1)

    def test_a_runai_workers_jobs_are_counted_as_they_end(self):
        metrics = Metrics()
        outcomes = [defer.succeed(1), defer.fail(errors.JobCancelled()), defer.fail(ValueError("bug"))]

        class Worker:
            device = "cpu"

            def run(self, job):
                return outcomes.pop(0)

            def loaded_models(self):
                return ()

        observed = ObservedWorker(Worker(), metrics)
        self.assertEqual(observed.device, "cpu")
        for _ in range(3):
            job = Job(_Request(), None, None)
            job.state = "running"
            observed.run(job).addErrback(lambda _: None)
        self.assertEqual(observed.jobs_running, 0)
        found = samples(_text(metrics))
        for outcome in ("ok", "cancelled", "error"):
            key = ("runai_jobs_total", (("action", "txt2img"), ("door", "broker"), ("outcome", outcome)))
            self.assertEqual(found[key], 1)
        self.assertEqual(found[("runai_job_seconds_count", ())], 3)


def _text(metrics):
    from prometheus_client import generate_latest
    return generate_latest(metrics.registry).decode("utf-8")


class CoreTests(support.FactoryTestCase):
    """The core's hooks, on a real queue and a scripted engine."""

    def setUp(self):
        super().setUp()
        self.metrics = self.core.metrics = Metrics()

    def request(self):
        return GenerationRequest(action="txt2img", model_path=self.models + "/v1/tiny", model_name="v1/tiny",
                                 prompt="a lighthouse", steps=2)

    def test_a_failed_job_is_an_error_not_a_refusal(self):
        core = self.core

        class Door(NullListener):
            """Answers a job's failure as the HTTP door does: through core.refused."""

            def job_failed(self, job, error):
                core.refused(error)

        def broken(*args, **kwargs):
            raise errors.RunaiError(errors.MODEL_LOAD_FAILED, "could not load model")

        self.engine.generate = broken
        self.core.submit(self.request(), "owner", Door())
        self.pool.run_one()
        self.queue.max_queued = 0
        with self.assertRaises(errors.RunaiError) as refused:
            self.core.submit(self.request(), "owner", Door())
        self.core.refused(refused.exception)  # the door tells it again: counted once
        found = samples(_text(self.metrics))
        self.assertEqual(found[("runai_jobs_total", (("action", "txt2img"), ("door", "other"), ("outcome", "error")))],
                         1)
        self.assertEqual(found[("runai_job_seconds_count", ())], 1)
        refusals = {k: v for k, v in found.items() if k[0] == "runai_requests_refused_total"}
        self.assertEqual(refusals, {("runai_requests_refused_total", (("code", errors.QUEUE_FULL),)): 1})

    def test_without_metrics_the_core_counts_nothing(self):
        self.core.metrics = None
        self.core.refused(errors.RunaiError(errors.BAD_REQUEST, "x"))
        self.core.submit(self.request(), "owner", NullListener())
        self.pool.run_one()
        self.assertFalse([k for k in samples(_text(self.metrics)) if k[0] in ("runai_jobs_total",
                                                                              "runai_requests_refused_total")])


class DeviceMemoryTests(SynchronousTestCase):
    def test_read_only_where_torch_has_started_cuda(self):
        class Cuda:
            initialized = False

            def is_initialized(self):
                return self.initialized

            def device_count(self):
                return 2

            def memory_allocated(self, index):
                return (index + 1) * 2 ** 30

        class Torch:
            cuda = Cuda()

        torch = Torch()
        self.assertEqual(cuda_memory({}), {})  # torch not imported: never imported for a scrape
        self.assertEqual(cuda_memory({"torch": torch}), {})  # CUDA not started: never started for a scrape
        torch.cuda.initialized = True
        self.assertEqual(cuda_memory({"torch": torch}), {"cuda:0": 2 ** 30, "cuda:1": 2 ** 31})
        metrics = Metrics()
        metrics.watch(device_memory=lambda: cuda_memory({"torch": torch}))
        found = samples(_text(metrics))
        self.assertEqual(found[("runai_device_memory_bytes", (("device", "cuda:1"),))], 2 ** 31)


class HealthTests(SynchronousTestCase):
    def test_a_front_server_needs_redis_and_a_worker(self):
        class Backend:
            running, available, workers_alive = True, False, 0
        backend = Backend()
        check = health.broker_check(backend)
        self.assertIn("Redis", check().reason)
        backend.available = True
        self.assertIn("no runai-worker", check().body()["reason"])
        backend.workers_alive = 2
        self.assertEqual(check().body(), {"status": "ok", "workers": 2})

    def test_local_workers_need_a_live_thread(self):
        worker = LocalWorker(MemoryReactorClock(), device="cpu")
        check = health.local_check([worker])
        self.assertEqual(check().body()["status"], "unavailable")
        self.assertEqual(health.local_check([])().reason, "this server has no workers")


class SiteTests(TestCase):
    """The token, over a real socket on 127.0.0.1."""

    def listen(self, token):
        site = make_site(Metrics(), lambda: health.Health(1), token=token, reactor=reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_the_token_guards_both_pages(self):
        port = self.listen(TOKEN.encode())
        for path in ("/metrics", "/health"):
            status, _ = yield get(port, path)
            self.assertEqual(status, 401)
            status, _ = yield get(port, path, {"Authorization": "Bearer wrong-token-of-same-size!"})
            self.assertEqual(status, 401)
            status, body = yield get(port, path, {"Authorization": f"Bearer {TOKEN}"})
            self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_public_metrics_need_no_token(self):
        config = {"metrics-public": True, "token": TOKEN}
        from runai.core.queue import JobQueue
        from runai.core.service import Core
        core = Core(JobQueue([]), ModelLibrary(self.mktemp()), reactor)
        site, started = front_metrics(config, reactor, core, [])
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        status, body = yield get(port.getHost().port, "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(("runai_queue_depth", ()), samples(body))


class EndToEndTests(e2e.LiveServer, TestCase):
    """Two jobs through the tiny model, a refusal, then the worker gone."""

    timeout = 300

    def setUp(self):
        self.models = e2e.tiny_model_dir()
        self.worker = LocalWorker(reactor, device="cpu", dtype="float32",
                                  engine_options=dict(library=ModelLibrary(self.models)))
        self.worker.startService()
        self.queue, self.core, self.factory = make_server(reactor, self.models, self.worker,
                                                          pool=reactor.getThreadPool(), idle_timeout=30)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        site, started = front_metrics({"token": None}, reactor, self.core, [self.worker])
        metrics_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        started(metrics_port)
        self.metrics_port = site.port.getHost().port
        self.addCleanup(lambda: self.worker.running and self.worker.stopService())
        self.addCleanup(self.queue.stopService)
        self.addCleanup(self.port.stopListening)
        self.addCleanup(metrics_port.stopListening)
        self.http = reactor.listenTCP(0, http_site(Api(self.core, reactor), max_body=2 ** 20), interface="127.0.0.1")
        self.addCleanup(self.http.stopListening)

    def http_post(self, route, body):
        url = f"http://127.0.0.1:{self.http.getHost().port}/sdapi/v1/{route}"
        return threads.deferToThread(lambda: requests.post(url, json=body, headers={"Connection": "close"},
                                                           timeout=60))

    @defer.inlineCallbacks
    def test_two_jobs_a_refusal_and_the_worker_gone(self):
        answers = yield self.talk(e2e.legacy_request(self.models, seed=1), e2e.legacy_request(self.models, seed=2),
                                  e2e.legacy_request(self.models, txt2img_width=10 ** 6))
        self.assertEqual(answers[0][-1]["action"], "done")
        self.assertEqual(answers[1][-1]["action"], "done")
        code = answers[2][-1]["error"]["code"]
        http = yield self.http_post("txt2img", {"prompt": "a lighthouse", "width": 10 ** 6, "steps": 2})
        self.assertEqual(http.json()["error"], code)
        status, body = yield get(self.metrics_port, "/metrics")
        self.assertEqual(status, 200)
        found = samples(body)
        ok = ("runai_jobs_total", (("action", "txt2img"), ("door", "legacy"), ("outcome", "ok")))
        self.assertEqual(found[ok], 2)
        self.assertEqual(found[("runai_job_seconds_count", ())], 2)
        self.assertEqual(found[("runai_queue_wait_seconds_count", ())], 2)
        self.assertGreater(found[("runai_job_seconds_sum", ())], 0)
        self.assertEqual(found[("runai_model_loads_total", ())], 1)
        self.assertEqual(found[("runai_model_load_seconds_count", ())], 1)
        self.assertEqual(found[("runai_requests_refused_total", (("code", code),))], 2)  # a socket's, an HTTP one
        self.assertGreater(found[("runai_model_cache_bytes", ())], 0)
        self.assertEqual(found[("runai_workers", ())], 1)
        self.assertEqual(found[("runai_queue_depth", ())], 0)
        self.assertEqual(found[("runai_jobs_running", ())], 0)
        self.assertNotIn(os.path.basename(self.models), body)  # no path in any label
        self.assertNotIn("lighthouse", body)  # no prompt
        self.assertNotIn("v1/tiny", body)  # no model name

        status, body = yield get(self.metrics_port, "/health")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok", "workers": 1, "failing": 0}))
        yield self.worker.stopService()
        status, body = yield get(self.metrics_port, "/health")
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body)["status"], "unavailable")
        self.assertIn("no worker thread is alive", json.loads(body)["reason"])
        status, body = yield get(self.metrics_port, "/metrics")
        self.assertEqual(samples(body)[("runai_workers", ())], 0)
