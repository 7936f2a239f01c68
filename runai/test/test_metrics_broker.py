"""--metrics on the real processes: a ``twistd runai --broker`` front with a token and a
``twistd runai-worker``, through a real Redis, with the tiny model."""

import json
import os
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from runai.client import BlockingClient
from runai.test.redis_fixtures import start_redis
from runai.test.store_fixtures import start_twistd, tiny_request
from runai.test.test_broker_e2e import start_worker, wait_for_line

TOKEN = "a-token-for-the-front-and-its-metrics"
LISTENING = r"runai metrics listening on 127\.0\.0\.1:(\d+)"


def fetch(port, path, token=None):
    """``(status, body)`` of GET ``path``, with the token as a Bearer when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class BrokerMetricsTests(SynchronousTestCase):
    def setUp(self):
        self.redis = start_redis(self)

    def health_until(self, port, status, token=None, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            answer = fetch(port, "/health", token)
            if answer[0] == status or time.monotonic() > deadline:
                return answer
            time.sleep(0.1)

    def test_the_front_counts_what_passes_and_the_worker_what_it_runs(self):
        token_file = os.path.realpath(self.mktemp())
        with open(token_file, "w") as f:
            f.write(TOKEN)
        os.chmod(token_file, 0o600)
        _, port, front_log = start_twistd(self, "--broker", self.redis.url, "--token-file", token_file,
                                          "--metrics", "tcp:0:interface=127.0.0.1")
        front = int(wait_for_line(self, front_log, LISTENING).group(1))
        self.assertEqual(fetch(front, "/metrics")[0], 401)
        status, body = fetch(front, "/health", TOKEN)
        self.assertEqual((status, json.loads(body)["status"]), (503, "unavailable"))  # no worker yet

        _, worker_log = start_worker(self, self.redis.url, "--device", "cpu", "--metrics", "0", "--token-file",
                                     token_file)
        worker = int(wait_for_line(self, worker_log, LISTENING).group(1))
        status, body = self.health_until(front, 200, TOKEN)
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok", "workers": 1}))

        with BlockingClient(port=port, timeout=180, token=TOKEN) as client:
            client.send(tiny_request("a lighthouse", seed=3))
            while True:
                message = client.receive()
                if "error" in message or message.get("action") == "done":
                    break
        self.assertEqual(message.get("action"), "done", message)

        status, body = fetch(front, "/metrics", TOKEN)
        found = samples(body)
        self.assertEqual(found[("runai_jobs_total", (("action", "txt2img"), ("door", "legacy"), ("outcome", "ok")))],
                         1)
        self.assertEqual(found[("runai_queue_wait_seconds_count", ())], 1)
        self.assertEqual(found[("runai_workers", ())], 1)
        self.assertEqual(found[("runai_model_loads_total", ())], 0)  # the front loads no model
        self.assertNotIn(("runai_model_cache_bytes", ()), found)

        self.assertEqual(fetch(worker, "/metrics")[0], 401)  # the worker's --token-file guards its metrics
        status, body = fetch(worker, "/metrics", TOKEN)
        self.assertEqual(status, 200)
        found = samples(body)
        self.assertEqual(found[("runai_jobs_total", (("action", "txt2img"), ("door", "broker"), ("outcome", "ok")))],
                         1)
        self.assertEqual(found[("runai_job_seconds_count", ())], 1)
        self.assertEqual(found[("runai_model_loads_total", ())], 1)
        self.assertGreater(found[("runai_model_cache_bytes", ())], 0)
        self.assertEqual(fetch(worker, "/health", TOKEN), (200, json.dumps({"status": "ok", "workers": 1,
                                                                             "failing": 0})))
