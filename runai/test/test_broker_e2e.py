"""The real processes: ``twistd runai --broker`` fronts and ``twistd runai-worker``
workers with the tiny model, through a real Redis; the same images per seed as a local
server; a worker killed mid-job; Redis restarted."""

import base64
import os
import re
import signal
import threading
import time
from io import BytesIO

import webuiapi
from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from runai.client import BlockingClient
from runai.test.redis_fixtures import start_redis
from runai.test.store_fixtures import spawn_twistd, start_twistd, tiny_models, tiny_request


def start_worker(testcase, url, *args):
    """``twistd runai-worker``; returns (process, log path) once it takes jobs."""
    worker, log_path = spawn_twistd(testcase, "runai-worker", "--broker", url, "--model-dir", tiny_models(), *args,
                                    log_name="worker.log")
    wait_for_line(testcase, log_path, r"runai worker \S+: \d+ device", worker)
    return worker, log_path


def wait_for_line(testcase, path, pattern, process=None, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        with open(path) as f:
            found = re.search(pattern, f.read())
        if found:
            return found
        time.sleep(0.05)
    with open(path) as f:
        testcase.fail(f"no {pattern!r} in the log:\n{f.read()}")


def run_job(port, request, on_progress=None):
    """Every reply to ``request`` until its end."""
    with BlockingClient(port=port, timeout=180) as client:
        client.send(request)
        messages = []
        while True:
            message = client.receive()
            messages.append(message)
            if message.get("action") == 4 and on_progress is not None:
                on_progress(message)
            if "error" in message or message.get("action") == "done":
                return messages


def images(messages):
    return [(m["index"], m["seed"], base64.b64decode(m["image"])) for m in messages if "image" in m]


class BrokerEndToEndTests(SynchronousTestCase):
    def setUp(self):
        self.redis = start_redis(self)

    def front(self, *args):
        return start_twistd(self, "--broker", self.redis.url, *args)

    def test_jobs_come_back_from_workers_with_the_images_of_a_local_server(self):
        _, port, _ = self.front()
        for _ in range(2):
            start_worker(self, self.redis.url, "--device", "cpu")
        _, local_port, _ = start_twistd(self)
        request = tiny_request("a lighthouse", seed=11, n_samples=2, rid="r1")
        remote = run_job(port, request)
        self.assertEqual(remote[-1].get("action"), "done", remote[-1])
        self.assertEqual([m["step"] for m in remote if m.get("action") == 4], [1])
        local = run_job(local_port, request)
        self.assertEqual(images(remote), images(local))
        self.assertEqual([(i, s) for i, s, _ in images(remote)], [(0, 11), (1, 12)])
        # The workers say they are idle again at once; the front's next poll reads it.
        deadline = time.monotonic() + 10
        while True:
            with BlockingClient(port=port, timeout=30) as client:
                pong = client.ping()
            if not pong["busy"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual((pong["queued"], pong["busy"]), (0, False))
        # The front counts the workers whose heartbeats it reads.
        self.assertGreaterEqual(pong["workers"], 1)

    def test_a_worker_killed_mid_job_costs_a_restart_and_nothing_doubled(self):
        _, port, _ = self.front()
        workers = [start_worker(self, self.redis.url, "--device", "cpu", "--claim-timeout", "2", "--name", name)
                   for name in ("w-a", "w-b")]
        request = tiny_request("a slow lighthouse", seed=3, n_iter=3)
        request["options"]["txt2img_steps"] = 40
        killed = []

        def kill_the_runner(message):
            if killed or message["step"] < 2:
                return
            for process, log_path in workers:
                with open(log_path) as f:
                    if "Job " in f.read():
                        os.kill(process.pid, signal.SIGKILL)
                        process.wait()
                        killed.append(log_path)
                        return
        messages = run_job(port, request, on_progress=kill_the_runner)
        self.assertEqual(len(killed), 1)
        self.assertEqual(messages[-1].get("action"), "done", messages[-1])
        self.assertEqual([(i, s) for i, s, _ in images(messages)], [(0, 3), (1, 4), (2, 5)])
        steps = [m["step"] for m in messages if m.get("action") == 4]
        # The job restarted on the other worker: progress went back to step 1.
        self.assertEqual(steps.count(1), 2)
        survivor = next(log for _, log in workers if log not in killed)
        with open(survivor) as f:
            self.assertIn("(delivery 2)", f.read())

    def test_redis_restarted_fronts_and_workers_reconnect(self):
        _, port, _ = self.front()
        start_worker(self, self.redis.url, "--device", "cpu")
        self.assertEqual(run_job(port, tiny_request("one", seed=1))[-1].get("action"), "done")
        self.redis.stop()
        refused = run_job(port, tiny_request("two", seed=2))
        self.assertEqual(refused[-1]["error"]["code"], "broker_unavailable")
        self.redis.start()
        deadline = time.monotonic() + 30
        while True:
            answer = run_job(port, tiny_request("three", seed=3))
            if answer[-1].get("action") == "done" or time.monotonic() > deadline:
                break
            self.assertEqual(answer[-1]["error"]["code"], "broker_unavailable")
            time.sleep(0.2)
        self.assertEqual(answer[-1].get("action"), "done", answer[-1])

    def test_two_fronts_share_the_workers(self):
        _, port_a, _ = self.front()
        _, port_b, _ = self.front()
        start_worker(self, self.redis.url, "--device", "cpu", "--device", "cpu")
        # Four clients at once, two on each front; seeds 21 and 22 asked on both fronts.
        jobs = [(port_a, 21), (port_b, 21), (port_a, 22), (port_b, 22)]
        answers = [None] * len(jobs)

        def client(index, port, seed):
            answers[index] = run_job(port, tiny_request("same", seed=seed, n_samples=2))
        threads = [threading.Thread(target=client, args=(i, *job)) for i, job in enumerate(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        for answer, (_, seed) in zip(answers, jobs):
            self.assertEqual(answer[-1].get("action"), "done", answer[-1])
            self.assertEqual([(i, s) for i, s, _ in images(answer)], [(0, seed), (1, seed + 1)])
        self.assertEqual(images(answers[0]), images(answers[1]))
        self.assertEqual(images(answers[2]), images(answers[3]))
        self.assertNotEqual(images(answers[0]), images(answers[2]))

    def test_a_cancel_and_a_disconnect_reach_the_worker(self):
        _, port, _ = self.front()
        _, log_path = start_worker(self, self.redis.url, "--device", "cpu")
        request = tiny_request("cancel me", seed=4, n_iter=8)
        request["options"]["txt2img_steps"] = 100
        with BlockingClient(port=port, timeout=180) as client:
            client.send(request)
            steps = 0
            while True:
                message = client.receive()
                if message.get("action") == 4:
                    steps += 1
                    if steps == 2:
                        client.send_control(b"c")
                if "error" in message or message.get("action") == "done":
                    break
        self.assertEqual(message["error"]["code"], "cancelled")
        self.assertLess(steps, 20)
        # A client that goes away mid-job: the worker stops it too, and is free for the next.
        with BlockingClient(port=port, timeout=180) as client:
            client.send(request)
            while client.receive().get("action") != 4:
                pass
        wait_for_line(self, log_path, r"(?s)failed: cancelled.*failed: cancelled", timeout=30)
        answer = run_job(port, tiny_request("next", seed=5))
        self.assertEqual(answer[-1].get("action"), "done", answer[-1])

    def test_the_http_door_of_a_front(self):
        _, port, log_path = self.front("--http", "tcp:0:interface=127.0.0.1")
        http_port = int(wait_for_line(self, log_path, r"runai HTTP API listening on 127\.0\.0\.1:(\d+)").group(1))
        start_worker(self, self.redis.url, "--device", "cpu")
        client = webuiapi.WebUIApi(host="127.0.0.1", port=http_port)
        result = client.txt2img(prompt="a lighthouse", seed=11, steps=1, width=64, height=64, batch_size=2,
                                cfg_scale=7.5, sampler_name="Euler a",
                                override_settings={"sd_model_checkpoint": "v1/tiny"})
        self.assertEqual([image.size for image in result.images], [(64, 64), (64, 64)])
        self.assertEqual((result.info["seed"], result.info["all_seeds"]), (11, [11, 12]))
        # The same pictures as the socket door of the same front.
        socket_images = images(run_job(port, tiny_request("a lighthouse", seed=11, n_samples=2)))
        self.assertEqual([image.tobytes() for image in result.images],
                         [Image.open(BytesIO(png)).convert("RGB").tobytes() for _, _, png in socket_images])
