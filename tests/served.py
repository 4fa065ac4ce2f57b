"""`transformers serve` (transformers[serving]) on 127.0.0.1 for a critic directory: a real OpenAI-compatible server,
as vLLM would be, for the tests and benchmarks/bench_reward.py.

What the tests rely on (transformers 5.24, measured on CPU): the model named on the command line is loaded before
the port opens, so the first 200 from GET /health means it is ready; requests must name it exactly (its path);
it answers one request at a time (a queue, no batching); it ignores `n` and checks no API key; it strips leading
and trailing whitespace from answers (so its greedy texts equal the in-process ones up to .strip()).
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A running `transformers serve`: .url (the API base, .../v1), .model (the served name), .stop()."""

    def __init__(self, model_dir, startup_timeout=180, threads=1):
        self.model, port = str(model_dir), free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log = Path(tempfile.mkstemp(prefix="transformers-serve-", suffix=".log")[1])
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1",  # no hub, no PyPI version check
                   OMP_NUM_THREADS=str(threads))  # one thread: on a small CPU box concurrent requests otherwise thrash
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model, "--device", "cpu",
               "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        with open(self.log, "wb") as out:  # a file, not a pipe: an unread pipe fills up and blocks the server
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"transformers serve not ready after {startup_timeout} s:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)

    @property
    def spec(self):
        """How every script names this critic: URL#served name."""
        return f"{self.url}#{self.model}"

    def tail(self, n=40):
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole process group: the server and its workers
        self.proc.wait()
