"""The model a server serves: which weights (a published checkpoint or a bundle), their
version (a content hash), and a :class:`Predictor` reloaded when they change on disk."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from dataclasses import dataclass

import torch

from busi_monai.bundle.export import checkpoint_from_bundle
from busi_monai.inference.predictor import Predictor
from busi_monai.model.checkpoint import CheckpointError

logger = logging.getLogger(__name__)


class ModelNotAvailable(RuntimeError):
    """No weights to serve yet (no published model and no bundle)."""


def bundle_stamp(bundle: str) -> tuple:
    """Newest mtime and total size of a bundle's files: changes when the bundle is re-exported."""
    newest, size, n = 0, 0, 0
    for root, _, files in os.walk(bundle):
        for f in files:
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:
                continue
            newest, size, n = max(newest, st.st_mtime_ns), size + st.st_size, n + 1
    return (newest, size, n)


@dataclass
class ModelVersion:
    source: str  # "model" (the app's published weights) or "bundle"
    path: str
    version: str  # short content hash
    mtime: float
    stamp: tuple

    def as_params(self) -> dict:
        # The file's name only: responses do not reveal the server's folders.
        return {"model_source": self.source, "model_file": os.path.basename(self.path), "model_version": self.version, "model_mtime": self.mtime}


class ServedModel:
    """The weights a server serves: the published model file, or a bundle, whichever is newer.

    A bundle is served until a training publishes newer weights. Loaded once; reloaded when the
    file's (mtime, size, inode) changes, so a model published atomically (``os.replace``) is used
    by the next request without a restart, and a reader never sees half a file.

    Args:
        model_path: the published checkpoint (it may not exist yet).
        bundle: an exported MONAI bundle folder to serve until then, or None.
        device: where the :class:`Predictor` runs.
    """

    def __init__(self, model_path: str, bundle: str | None = None, device: str = "auto"):
        self.model_path, self.bundle, self.device = model_path, bundle, device
        self._lock = threading.RLock()
        self._predictor = None
        self._version: ModelVersion | None = None
        self._hashes: dict = {}

    # -- which weights ------------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, str, tuple, float]]:
        out = []
        p = self.model_path
        try:
            st = os.stat(p)
            out.append(("model", p, (st.st_mtime_ns, st.st_size, st.st_ino), st.st_mtime))
        except OSError:
            pass
        if self.bundle:
            stamp = bundle_stamp(self.bundle)
            out.append(("bundle", self.bundle, stamp, stamp[0] / 1e9))
        return out

    def exists(self) -> bool:
        return bool(self._candidates())

    def current_source(self) -> tuple[str, str, tuple, float]:
        cands = self._candidates()
        if not cands:
            raise ModelNotAvailable(
                f"no trained weights yet: {self.model_path} does not exist. Train the model first "
                f"(Slicer: Train; or `python -m busi_monai.serve`, which trains a small model on the sample data)"
            )
        return max(cands, key=lambda c: c[3])

    def init_checkpoint(self) -> dict | None:
        """The weights to start a training from (None: there are none)."""
        try:
            ck, _ = self._load(self.current_source())
            return ck
        except ModelNotAvailable:
            return None

    def _load(self, src) -> tuple[dict, ModelVersion]:
        kind, path, stamp, mtime = src
        if kind == "bundle":
            ck = checkpoint_from_bundle(path)
            version = hashlib.sha256(repr(stamp).encode()).hexdigest()[:12]
            return ck, ModelVersion("bundle", path, version, mtime, stamp)
        # Read the bytes through one file descriptor: the stamp then matches what was read
        # even if training replaces the file meanwhile.
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable model checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(ck, dict) or "state_dict" not in ck or "network" not in ck:
            raise CheckpointError(f"{path}: not a busi-monai checkpoint (no network config or weights)")
        ck["source"] = path
        version = hashlib.sha256(data).hexdigest()[:12]
        return ck, ModelVersion("model", path, version, st.st_mtime, stamp)

    def version(self) -> ModelVersion | None:
        """The version that the next request would use, without loading it (None: no model)."""
        try:
            kind, path, stamp, mtime = self.current_source()
        except ModelNotAvailable:
            return None
        with self._lock:
            if self._version is not None and self._version.stamp == stamp and self._version.path == path:
                return self._version
            cached = self._hashes.get((path, stamp))
        if cached is None:
            if kind == "model":
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                cached = h.hexdigest()[:12]
            else:
                cached = hashlib.sha256(repr(stamp).encode()).hexdigest()[:12]
            with self._lock:
                self._hashes = {(path, stamp): cached}
        return ModelVersion(kind, path, cached, mtime, stamp)

    def get(self):
        """``(Predictor, ModelVersion)``, reloading the weights if they changed on disk."""
        with self._lock:
            src = self.current_source()
            if self._predictor is None or self._version is None or self._version.stamp != src[2] or self._version.path != src[1]:
                ck, ver = self._load(src)
                old = self._version.version if self._version else None
                self._predictor = Predictor(ck, device=self.device)
                self._version = ver
                logger.info(
                    "served model: loaded %s %s (version %s%s) on %s",
                    ver.source, ver.path, ver.version, f", was {old}" if old else "", self._predictor.device,
                )
            return self._predictor, self._version


class ClickModels:
    """What a click tool serves: its own network's weights where they exist (``own``), else the
    automatic network's (``automatic``), which answer clicks when that network takes them: a model
    folder from before the networks were separate, a bundle with click inputs, or one network
    for both tools (``own`` None).

    Args:
        own: the click network's published weights (they may not exist yet), or None.
        automatic: the automatic network's.
    """

    def __init__(self, own: ServedModel | None, automatic: ServedModel):
        self.own, self.automatic = own, automatic

    def source(self) -> ServedModel:
        return self.own if self.own is not None and self.own.exists() else self.automatic

    def exists(self) -> bool:
        return self.source().exists()

    def version(self) -> ModelVersion | None:
        return self.source().version()

    def get(self):
        """``(Predictor, ModelVersion)`` of the click network served now."""
        return self.source().get()

    def separate(self) -> bool:
        """Whether the click network is not the automatic one."""
        return self.source() is not self.automatic
