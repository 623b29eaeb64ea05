"""A stand-in for the GPU machine's Python, for the wheelhouse tests: a venv that sees only the
packages the H200 image has (its package list as read on 2026-11-17, torch included, MONAI,
ITK and monailabel not), taken from the running interpreter by symbolic links. An offline
install into a venv made from it must then bring everything else from the wheelhouse."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

# Names as the H200 image lists them (device KINDS.md, 2026-11-17), those the app could touch.
GPU_PREINSTALLED = """
absl-py annotated-doc anyio attrs certifi charset-normalizer click cloudpickle contourpy cycler
filelock fonttools fsspec grpcio h11 httpcore httpx hypothesis idna imageio iniconfig jinja2 joblib
kiwisolver lazy-loader markdown markupsafe matplotlib mpmath networkx numpy packaging pillow pip
pluggy protobuf psutil pygments pyparsing pytest pytest-timeout python-dateutil pyyaml requests
scikit-image scikit-learn scipy setuptools six sortedcontainers sympy tensorboard
tensorboard-data-server threadpoolctl tifffile torch tqdm typing-extensions urllib3 werkzeug wheel
einops
""".split()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_gpu_like_python(root: Path) -> Path:
    """``root/base`` (a venv) whose only packages are links to this interpreter's copies of
    :data:`GPU_PREINSTALLED`; returns its python."""
    site = root / "gpu-site-packages"
    site.mkdir(parents=True)
    wanted = {_norm(n) for n in GPU_PREINSTALLED}
    for dist in md.distributions():
        if _norm(dist.metadata["Name"]) not in wanted or not dist.files:
            continue
        tops = {f.parts[0] for f in dist.files if f.parts and f.parts[0] not in ("..", "__pycache__")}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    base = root / "base"
    subprocess.run([_base_interpreter(), "-m", "venv", "--without-pip", str(base)], check=True)
    py = base / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(purelib, "gpu_image.pth").write_text(str(site) + "\n")
    return py


def _base_interpreter() -> str:
    """The interpreter under this venv (a venv made from a venv's python is made from it anyway)."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")
