"""What the app's tasks raise, defined once: a 4xx/5xx with a readable reason, and no model yet."""

from __future__ import annotations

from busi_monai.inference.served import ModelNotAvailable  # noqa: F401 (the app's tasks raise it)


def http_error(status: int, msg: str) -> Exception:
    """An HTTP error whose ``detail`` Slicer shows, instead of a bare 500. Outside a server
    (fastapi missing), a RuntimeError with the same message."""
    try:
        from fastapi import HTTPException
    except ImportError:  # pragma: no cover - fastapi is part of monailabel's runtime
        return RuntimeError(msg)
    return HTTPException(status_code=status, detail=msg)
