"""Shared by the benchmarks: the real server in a subprocess (``twistd ... runai``)."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENING = re.compile(r"runai listening on [^:\s]+:(\d+)")


class Server:
    """``twistd --nodaemon --pidfile= --logfile=- runai --port 0 ...`` from the venv's bin
    folder, in ``workdir``; ``port`` is parsed from its "runai listening on" log line, and
    its log lines are kept in ``log``."""

    def __init__(self, model_dir, workdir, *options, env=None, start_timeout=300):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        args = [twistd, "--nodaemon", "--pidfile=", "--logfile=-", "runai",
                "--port", "0", "--model-dir", model_dir, *options]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", **(env or {}))
        full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        self.log = []
        self.proc = subprocess.Popen(args, cwd=workdir, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.pid = self.proc.pid
        self.port = None
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            match = LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
                break
        if self.port is None:
            self.proc.kill()
            self.proc.wait()
            raise SystemExit("the server did not start:\n" + "".join(self.log[-30:]))
        # Keep reading its log, so that it never blocks on a full pipe.
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    def _read_log(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, timeout=60):
        """SIGINT (what Ctrl-C sends), then SIGKILL if it has not stopped in ``timeout`` s."""
        if self.proc.poll() is not None:
            return
        self.resume()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=5)

    def log_text(self):
        return "".join(self.log)
