"""Run the real MONAI Label server of apps/busi in a subprocess, for tests and experiments.

    with AppServer(studies, model_dir, conf={"preset": "fast"}) as srv:
        client = srv.client()

The app folder is copied to a temporary folder first, because ``monailabel start_server``
creates ``model/``, ``logs/`` and ``bin/`` inside the app it serves: tests write nothing into
the repository.
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


def import_app_lib(monkeypatch) -> None:
    """Make the app's ``lib`` package importable in this process, as MONAI Label loads it: the
    app folder first on sys.path and no ``lib`` module cached by an earlier test (undone after it)."""
    monkeypatch.syspath_prepend(str(APP_DIR))
    for m in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
        monkeypatch.delitem(sys.modules, m)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``serve_args``: start through ``python -m busi_monai.serve`` (what ``make serve`` runs:
    studies and warm-up model first) with these extra arguments, instead of ``monailabel
    start_server`` on a copy of the app."""

    def __init__(
        self, studies, model_dir, conf: dict | None = None, workdir=None, startup_timeout: float = 180,
        env: dict | None = None, serve_args: list[str] | None = None,
    ):  # fmt: skip
        self.studies = str(studies)
        self.model_dir = str(model_dir)
        self.conf = dict(conf or {})
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="busi-app-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self.serve_args = serve_args
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        conf = ["--conf", "model_dir", self.model_dir]
        for k, v in self.conf.items():
            conf += ["--conf", k, str(v)]
        app = self.workdir / "app"
        if not app.exists():
            shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__", "*.pyc"))
        if self.serve_args is not None:
            return [
                sys.executable, "-m", "busi_monai.serve", "--studies", self.studies, "--port", str(self.port),
                "--app-dir", str(app), *self.serve_args, *conf,
            ]  # fmt: skip
        return [
            sys.executable, "-m", "monailabel.main", "start_server",
            "--app", str(app), "--studies", self.studies, "--host", "127.0.0.1", "--port", str(self.port), *conf,
        ]  # fmt: skip

    def start(self, attempts: int = 3) -> "AppServer":
        """Start and wait for /info; a port that another process took between :func:`free_port`
        and the server's bind is retried on a new port."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except RuntimeError as e:
                taken = "address already in use" in str(e).lower() or "error while attempting to bind" in str(e).lower()
                if not taken or attempt + 1 == attempts:
                    raise
                self.port = free_port()
        raise AssertionError("not reached")

    def _start_once(self) -> "AppServer":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MONAI_LABEL_TRACKING_ENABLED": "false", **self.env}
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir))
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                self._log.close()
                raise RuntimeError(f"server exited with {code}:\n{self.log_tail()}")
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
