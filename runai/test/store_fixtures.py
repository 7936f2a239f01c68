"""What the history's tests share: a key, requests and PNGs, a store run in line, a
plain SQLCipher connection to look at the file, and a real ``twistd runai`` to kill."""

import hashlib
import io
import os
import re
import subprocess
import sys
import time

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from runai.core.requests import GenerationRequest
from runai.history import store
from runai.history.key import Key
from runai.test.support import FakeImage, SyncPool, SyncReactor

KEY = Key("correct horse battery staple")
PROMPT_MARKER = "zebra-lighthouse-7f3a9c"


def request(prompt="a lighthouse", seed=42, rid="job-1", **extra):
    fields = dict(action="txt2img", model_path="/home/me/stablediffusion/v1/tiny", model_name="v1/tiny",
                  prompt=prompt, negative_prompt="fog", steps=3, seed=seed, width=64, height=64, id=rid)
    fields.update(extra)
    return GenerationRequest(**fields)


def png(seed, size=64):
    """A real PNG of noise (so that it does not compress away)."""
    data = hashlib.sha256(str(seed).encode()).digest() * (size * size * 3 // 32 + 1)
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), data[:size * size * 3]).save(out, "PNG")
    return out.getvalue()


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def files_state(folder):
    return {name: digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def raw_connect(path, key=KEY):
    """A plain SQLCipher connection, outside runai's code paths."""
    from sqlcipher3 import dbapi2
    conn = dbapi2.connect(path, isolation_level=None)
    conn.execute("PRAGMA cipher_log_level = NONE")
    conn.execute("PRAGMA key = '{}'".format(key.reveal().replace("'", "''")))
    return conn


class StoreTestCase(SynchronousTestCase):
    def setUp(self):
        self.folder = os.path.realpath(self.mktemp())
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "history.db")
        self.clock = [1_700_000_000.0]

    def now(self):
        self.clock[0] += 1
        return self.clock[0]

    def open_store(self, pool=None, key=KEY, **kwargs):
        s = store.Store(self.path, key, SyncReactor(), pool=pool or SyncPool(), now=self.now, **kwargs)
        s.startService()
        self.addCleanup(s.stopService)
        return s

    def result(self, d):
        return self.successResultOf(d)

    def record_done(self, s, req, seeds, pngs=None):
        record = s.begin(req)
        for index, seed in enumerate(seeds):
            s.add_image(record, FakeImage(pngs[index] if pngs else png(seed), seed, 64, 64, index))
        s.finish(record, "done", seconds=1.5)
        return record



# A real server ---------------------------------------------------------------------------

def tiny_models():
    """The tiny model folder shared by the end-to-end tests (read only)."""
    from runai.test.test_e2e import tiny_model_dir
    return tiny_model_dir()


def spawn_twistd(testcase, *args, log_name="server.log", env=None, cwd=None, stderr=None):
    """``twistd --nodaemon ... <args>`` (a plugin and its options), killed when the test
    ends; returns (process, log file). Logs go to a file so that a chatty process never
    blocks on a full pipe."""
    logs = os.path.realpath(testcase.mktemp())
    os.makedirs(logs)
    log_path = os.path.join(logs, log_name)
    log = open(log_path, "w")
    testcase.addCleanup(log.close)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    process = subprocess.Popen([twistd, "--nodaemon", "--pidfile=", "--logfile=-", *args], cwd=cwd or logs, env=env,
                               stdout=log, stderr=stderr or subprocess.STDOUT)
    testcase.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
    return process, log_path


def start_twistd(testcase, *args, env=None, cwd=None, stderr=None):
    """``twistd runai`` on a free port; returns (process, port, log file)."""
    server, log_path = spawn_twistd(testcase, "runai", "--port", "0", "--model-dir", tiny_models(), "--device", "cpu",
                                    *args, env=env, cwd=cwd, stderr=stderr)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        with open(log_path) as f:
            found = re.search(r"runai listening on 127\.0\.0\.1:(\d+)", f.read())
        if found:
            return server, int(found.group(1)), log_path
        time.sleep(0.05)
    with open(log_path) as f:
        testcase.fail(f"the server did not start:\n{f.read()}")


def tiny_request(prompt, seed, n_samples=1, n_iter=1, rid=None):
    from runai.client import txt2img_request
    return txt2img_request(prompt, "v1/tiny", request_id=rid, steps=1, seed=seed, width=64, height=64,
                           n_samples=n_samples, n_iter=n_iter)


def running_store(testcase, reactor):
    """A Store on the real ``reactor`` in a fresh folder of ``testcase``'s, started, and
    stopped when the test ends."""
    from runai.history import store

    folder = os.path.realpath(testcase.mktemp())
    os.makedirs(folder)
    running = store.Store(os.path.join(folder, "h.db"), KEY, reactor)
    running.startService()
    testcase.addCleanup(running.stopService)
    return running
