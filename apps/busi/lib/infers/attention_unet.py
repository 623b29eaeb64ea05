"""Infer task ``attention_unet``: the paper's Attention U-Net through ``busi_monai.inference.Predictor``.

The image is read with ``busi_monai.data.io.read_image`` (PNG/JPEG/NIfTI/NRRD, single-slice
volumes squeezed), segmented at the network's size (sigmoid, threshold, processed mask),
restored to the image's own size, and written with ``busi_monai.data.io.write_mask`` in the
extension the client asks for (``result_extension``; Slicer asks for ``.nrrd``) with the
image's own geometry, so the label overlays the image exactly. MONAI Label's Writer is not
used: it transposes 2D arrays and drops the 2D geometry.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.errors import ModelNotAvailable, http_error

logger = logging.getLogger(__name__)

RESULT_EXTENSIONS = (".nrrd", ".seg.nrrd", ".nii.gz", ".nii", ".mha", ".png")


def _allowed_roots() -> list[str]:
    """Folders whose files infer may read: the studies folder (or, for a remote datastore,
    MONAI Label's cache) and MONAI Label's sessions."""
    from monailabel.config import settings

    home = os.path.join(os.path.expanduser("~"), ".cache", "monailabel")
    studies = settings.MONAI_LABEL_STUDIES
    roots = [studies if studies and not studies.startswith(("http://", "https://")) else settings.MONAI_LABEL_DATASTORE_CACHE_PATH or home]
    roots.append(settings.MONAI_LABEL_SESSION_PATH or os.path.join(home, "sessions"))
    return [os.path.realpath(r) for r in roots]


# tempfile.NamedTemporaryFile's names: MONAI Label saves an uploaded image (POST /infer with a file) so.
_UPLOAD_NAME = re.compile(r"tmp[a-z0-9_]{8}(\.[A-Za-z0-9.]+)?")


def public_image_name(path: str) -> str | None:
    """How responses may name ``path``: its name inside the served folders, "the uploaded
    image" for an upload, None for anything else (which must not be read)."""
    from monailabel.config import settings

    if not settings.MONAI_LABEL_STUDIES:
        return os.path.basename(path)  # not under `monailabel start_server` (in-process use)
    real = os.path.realpath(path)
    for root in _allowed_roots():
        if real.startswith(root + os.sep):
            return os.path.relpath(real, root)
    if os.path.dirname(real) == os.path.realpath(tempfile.gettempdir()) and _UPLOAD_NAME.fullmatch(os.path.basename(real)):
        return "the uploaded image"
    return None


def _file_stamp(path: str) -> tuple[int, int] | None:
    """The image file's identity for the outline memory: a file replaced under the same name starts afresh."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class AttentionUNetInfer(InferTask):
    """The automatic outline (Run). ``outlines``: where the answer is remembered as this client's
    outline of the image, so that the click tool's first click after Run corrects it without
    computing it again; ``clicks``: the click tool's models
    (:class:`busi_monai.inference.served.ClickModels`), whose versions key that memory."""

    def __init__(self, served, settings, labels: dict, outlines=None, clicks=None):
        self.served = served
        self.settings = settings
        self.outlines = outlines
        self.clicks = clicks
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=2,
            description=(
                "Breast-lesion segmentation in 2D ultrasound: the paper's Attention U-Net (Jun Cheng), "
                f"preset {settings.preset}, on {settings.device_description()}"
            ),
            config={"device": settings.device},
        )

    def is_valid(self) -> bool:
        return self.served.exists()

    def get_path(self, validate=True):
        v = self.served.version()
        if v is None:
            return None if validate else self.settings.model_path
        return v.path if v.source == "model" else self.settings.model_path

    def info(self):
        i = super().info()
        v = self.served.version()
        i["model_version"] = v.version if v else None
        i["device"] = str(self.settings.resolved_device())
        return i

    def _checked_request(self, request):
        """The request's image, result extension and the served model, or a 4xx/503 naming the problem."""
        from busi_monai.data.io import BusiInputError, read_image

        image = request.get("image")
        if not isinstance(image, str):
            raise http_error(422, "attention_unet works on an image file; in-memory arrays are not supported")
        name = public_image_name(image)
        if name is None:
            # MONAI Label reads any existing path it is given as `image`; only the studies folder,
            # its sessions and its own uploads are served. Same answer as for an unknown id.
            logger.warning("attention_unet: refused an image outside the studies folder: %r", image)
            raise http_error(404, "no such image in the datastore: give the id of a datastore image, or upload the file")
        ext = str(request.get("result_extension") or ".nii.gz")
        ext = ext if ext.startswith(".") else f".{ext}"
        if ext.lower() not in RESULT_EXTENSIONS:
            raise http_error(422, f"result_extension {ext!r}: choose one of {', '.join(RESULT_EXTENSIONS)}")
        try:
            img = read_image(image, max_pixels=self.settings.max_image_pixels)
        except BusiInputError as e:
            raise http_error(422, str(e).replace(image, name)) from None
        try:
            predictor, version = self.served.get()
        except ModelNotAvailable as e:
            raise http_error(503, str(e).replace(self.settings.model_dir, "<model_dir>")) from None
        return image, img, ext, predictor, version

    def predict(self, predictor, img, request, version) -> tuple:
        """The prediction, and what the response's params add about it."""
        pred = predictor.predict([img])[0]
        memory = self._memory_version(version)
        if memory is not None:
            self._remember(request, [], [], None, memory, pred.mask)
        return pred, {}

    def _click_network(self):
        """The click tool's ``(Predictor, ModelVersion)``, or None when it has no loadable weights."""
        if self.clicks is None:
            return None
        try:
            return self.clicks.get()
        except Exception as e:  # the automatic outline must not fail for the click network's sake
            logger.warning("attention_unet: the click network is not available: %s", e)
            return None

    def _memory_version(self, version, click=None) -> str | None:
        """What the outline memory keys on: the automatic and the click network's versions (a new
        model of either starts afresh); None when no click network reads a previous outline."""
        click = click or self._click_network()
        if click is None or not click[0].takes_previous:
            return None
        return version.version if click[1].version == version.version else f"{version.version}+{click[1].version}"

    def _cache_key(self, request) -> tuple[str, str] | None:
        """(client, image) of a request; None for an upload (a temporary file, gone after it)
        or without an outline memory."""
        image = request["image"]
        if self.outlines is None or public_image_name(image) == "the uploaded image":
            return None
        # Slicer sends its client id ("user-xyz" unless set); a client without one is "".
        return str(request.get("client_id") or ""), os.path.realpath(image)

    def _previous(self, request, fg, bg, box, version):
        key = self._cache_key(request)
        if key is None:
            return None
        return self.outlines.previous(*key, fg, bg, box, version, stamp=_file_stamp(key[1]))

    def _remember(self, request, fg, bg, box, version, mask) -> None:
        key = self._cache_key(request)
        if key is not None:
            self.outlines.remember(*key, fg, bg, box, version, mask, stamp=_file_stamp(key[1]))

    def __call__(self, request):
        from busi_monai.data.io import write_mask

        t0 = time.time()
        image, img, ext, predictor, version = self._checked_request(request)
        t_pre = time.time()
        pred, extra = self.predict(predictor, img, request, version)
        t_infer = time.time()
        mask = pred.mask
        fd, out = tempfile.mkstemp(prefix="busi-result-", suffix=ext)
        os.close(fd)
        write_mask(mask, out, like=img)
        t_post = time.time()

        area_px = int(mask.sum())
        sx, sy = (float(s) for s in img.spacing[:2])
        lesion_prob = pred.probability[mask > 0]
        params = {
            "model": request.get("model", "attention_unet"),
            **version.as_params(),
            "preset": predictor.preset,
            "device": str(predictor.device),
            "image_size": predictor.image_size,
            "threshold": predictor.threshold,
            "image_shape": list(img.shape),
            "spacing": [sx, sy],
            "lesion_found": area_px > 0,
            "lesion_area_px": area_px,
            "lesion_area_mm2": round(area_px * sx * sy, 3),
            "lesion_fraction": round(area_px / float(mask.size), 6),
            "lesion_mean_probability": round(float(lesion_prob.mean()), 4) if lesion_prob.size else None,
            "label_names": {"lesion": 1},
            "result_extension": ext,
            **extra,
            "latencies": {
                "pre": round(t_pre - t0, 3),
                "infer": round(t_infer - t_pre, 3),
                "invert": 0.0,
                "post": round(t_post - t_infer, 3),
                "write": round(t_post - t_infer, 3),
                "total": round(t_post - t0, 3),
                "transform": None,
            },
        }
        logger.info(
            "attention_unet: %s -> %s (%s px lesion, model %s, %s, %.2fs)",
            os.path.basename(image), os.path.basename(out), area_px, version.version, predictor.device, t_post - t0,
        )
        return out, params


def request_points(request: dict, key: str, shape: tuple[int, int]) -> list[tuple[float, float]]:
    """A request's click list as (row, col) pixels of the image: Slicer sends each click as the
    image's IJK index [i, j, k] (i the column, j the row; k the slice, 0 for a 2D image)."""
    points = request.get(key) or []
    if not isinstance(points, list) or not all(isinstance(p, (list, tuple)) and len(p) >= 2 for p in points):
        raise http_error(422, f"{key}: expected a list of [x, y] or [i, j, k] points, got {points!r}"[:200])
    from busi_monai.interactive.guidance import rowcol_inside

    out = []
    for p in points:
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError):
            raise http_error(422, f"{key}: point {p!r} is not numeric"[:200]) from None
        try:
            out.append(rowcol_inside(x, y, shape))
        except ValueError as e:
            raise http_error(422, f"{key}: point {list(p)} {e}") from None
    return out


def request_box(request: dict, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """A request's ``roi`` as an inclusive (row0, col0, row1, col1) box on the image, or None.

    Slicer sends its ROI as IJK index ranges [i0, i1, j0, j1, k0, k1] (i the column, j the row,
    k the slice, each pair the ROI's RAS min/max corners converted to IJK and rounded); [] is
    no ROI, and [i0, i1, j0, j1] is accepted too. A pair may come reversed (i0 > i1): on an image
    whose IJK axes point against RAS (a PNG read as LPS) the RAS minimum is the IJK maximum, so
    order is not an error. k is ignored: the image is one slice."""
    roi = request.get("roi")
    if roi is None or (isinstance(roi, (list, tuple)) and len(roi) == 0):
        return None
    if not isinstance(roi, (list, tuple)) or len(roi) not in (4, 6):
        raise http_error(422, f"roi: expected [i0, i1, j0, j1, k0, k1] (or [i0, i1, j0, j1]) image indices, got {roi!r}"[:200])
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in roi):
        raise http_error(422, f"roi {list(roi)!r}: not numeric"[:200])
    from busi_monai.interactive.zoom import box_from_xyxy

    i0, i1, j0, j1 = roi[:4]
    try:
        return box_from_xyxy(i0, j0, i1, j1, shape)
    except ValueError as e:
        raise http_error(422, f"roi {[float(v) for v in roi]}: {e} (i is the column, j the row)"[:300]) from None


class ClickInfer(AttentionUNetInfer):
    """Click-guided segmentation (a DeepGrow-type model for Slicer): the click network redraws the
    outline around the clicks and inside Slicer's ROI box. Slicer's MONAI Label module sends
    ``foreground`` and ``background`` point lists (DeepEdit-style requests name the foreground by
    the label, ``lesion``) and ``roi``; with no clicks and no box it answers the automatic outline.

    A network with the previous-outline channel corrects an outline: the last one this client
    got for this image (from Run or from this model) when the clicks extend the ones that made
    it (``outlines``), else the automatic network's outline, which is what Run shows. Params say
    which: ``previous`` is "reused", "automatic", "box" or "none"."""

    def __init__(self, served, settings, labels: dict, outlines=None, clicks=None):
        from busi_monai.inference.outlines import OutlineCache
        from busi_monai.inference.served import ClickModels

        super().__init__(
            served, settings, labels, outlines if outlines is not None else OutlineCache(settings.outline_cache),
            clicks if clicks is not None else ClickModels(None, served),
        )
        self.type = InferType.DEEPGROW
        self.description = (
            "Click-guided lesion segmentation: click inside what was missed, outside what is wrong, "
            "or draw an ROI box around the lesion; each click corrects the last outline "
            f"(preset {settings.preset}, {settings.device_description()})"
        )

    def is_valid(self) -> bool:
        return self.served.exists() and self.clicks.exists()

    def info(self):
        i = super().info()
        v = self.clicks.version()
        i["model_version"] = v.version if v else None
        return i

    def predict(self, predictor, img, request, version):
        try:
            click, click_version = self.clicks.get()
        except ModelNotAvailable as e:
            raise http_error(503, str(e).replace(self.settings.model_dir, "<model_dir>")) from None
        if not click.takes_clicks:
            raise http_error(409, "the served model takes no clicks: train the app's click-guided network first (Train)")
        fg = request_points(request, "foreground", img.shape) + request_points(request, "lesion", img.shape)
        bg = request_points(request, "background", img.shape)
        box = request_box(request, img.shape)
        extra = {
            **click_version.as_params(), "automatic_model_version": version.version, "image_size": click.image_size,
            "box": list(box) if box else None, "previous": "none",
        }  # fmt: skip
        memory = self._memory_version(version, (click, click_version))
        if not (fg or bg or box):
            # Nothing to correct with: the automatic outline, exactly what Run shows.
            pred = predictor.predict([img])[0]
        else:
            try:
                pred = self._corrected(click, predictor, img, request, fg, bg, box, memory, extra)
            except ValueError as e:  # e.g. a click or a box outside an ultrasound frame's scan region
                raise http_error(422, str(e)) from None
        if memory is not None:
            self._remember(request, fg, bg, box, memory, pred.mask)
        return pred, extra

    def _corrected(self, click, automatic, img, request, fg, bg, box, memory, extra: dict):
        """The click network's outline for these clicks and box, correcting the previous outline
        where it reads one; ``extra["previous"]`` says which outline that was."""
        if not click.takes_previous:
            return click.predict_clicks(img, fg, bg, box=box)
        previous = self._previous(request, fg, bg, box, memory)
        extra["previous"] = "reused"
        if previous is None or previous.shape != img.shape:
            # Afresh: a box starts from its own outline (a box alone from nothing), as the
            # evaluation protocol does; clicks alone correct the automatic outline.
            if box is not None:
                previous = click.predict_clicks(img, box=box).mask if (fg or bg) else None
                extra["previous"] = "box" if previous is not None else "none"
            else:
                previous = automatic.predict([img])[0].mask
                extra["previous"] = "automatic"
        return click.predict_clicks(img, fg, bg, box=box, previous=previous)


GRADCAM_LEVELS = 10


class GradCamInfer(AttentionUNetInfer):
    """Where the network looked: the Grad-CAM heatmap as a volume on the image's own geometry.

    Slicer's MONAI Label module loads every result as a segmentation, so the [0, 1] heatmap
    comes back in ten bands (label k = heat in ((k-1)/10, k/10]), each a segment Slicer colours
    on its own; the exact float map is what `busi-monai explain` writes.
    """

    def __init__(self, served, settings):
        super().__init__(served, settings, {f"gradcam_{10 * k}": k for k in range(1, GRADCAM_LEVELS + 1)})
        self.description = f"Grad-CAM heatmap of the attention_unet lesion output (busi_monai.explain), on {settings.device_description()}"

    def __call__(self, request):
        import numpy as np

        from busi_monai.data.io import write_array
        from busi_monai.explain.gradcam import DEFAULT_LAYER, gradcam

        _, img, ext, predictor, version = self._checked_request(request)
        layer = request.get("layer") or DEFAULT_LAYER
        try:
            heat = gradcam(predictor, img, layer)
        except (KeyError, ValueError) as e:
            raise http_error(422, f"layer {layer!r}: {e}") from None
        bands = np.ceil(np.clip(heat, 0, 1) * GRADCAM_LEVELS).astype(np.uint8)
        fd, out = tempfile.mkstemp(prefix="busi-gradcam-", suffix=ext)
        os.close(fd)
        write_array(bands, out, like=img)
        return out, {"model": "attention_unet_gradcam", **version.as_params(), "layer": layer, "levels": GRADCAM_LEVELS, "device": str(predictor.device)}
