"""Run the real MONAI Label server of apps/busi in a subprocess, for tests and experiments.

    with AppServer(studies, model_dir, conf={"preset": "fast"}) as srv:
        client = srv.client()

The app folder is copied to a temporary folder first, because ``monailabel start_server``
creates ``model/``, ``logs/`` and ``bin/`` inside the app it serves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from busi_monai.serve import APP_DIR


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, studies, model_dir, conf: dict | None = None, workdir=None, startup_timeout: float = 180):
        self.studies = str(studies)
        self.model_dir = str(model_dir)
        self.conf = dict(conf or {})
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="busi-app-"))
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"

    def start(self) -> "AppServer":
        app = self.workdir / "app"
        if not app.exists():
            shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__", "*.pyc"))
        cmd = [
            sys.executable, "-m", "monailabel.main", "start_server",
            "--app", str(app), "--studies", self.studies, "--host", "127.0.0.1", "--port", str(self.port),
            "--conf", "model_dir", self.model_dir,
        ]  # fmt: skip
        for k, v in self.conf.items():
            cmd += ["--conf", k, str(v)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MONAI_LABEL_TRACKING_ENABLED": "false"}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir))
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/info/", timeout=5)
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not answer /info/ within {self.startup_timeout}s:\n{self.log_tail()}")

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def client(self, tmpdir=None):
        from monailabel.client import MONAILabelClient

        return MONAILabelClient(self.url, tmpdir=str(tmpdir or self.workdir / "client"))

    def log_tail(self, n: int = 12000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """SIGINT (uvicorn's clean shutdown); the train/scoring subprocesses it started are stopped
        as they appear, so the server's task threads end and the process exits."""
        if self.proc is None:
            return
        import psutil

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        deadline = time.time() + timeout
        while self.proc.poll() is None and time.time() < deadline:
            try:
                for c in psutil.Process(self.proc.pid).children(recursive=True):
                    c.terminate()
            except psutil.Error:
                pass
            time.sleep(0.3)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc = None
        self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
