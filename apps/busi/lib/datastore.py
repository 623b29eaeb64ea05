"""The app's datastore: MONAI Label's ``LocalDatastore`` with checked, atomic writes.

MONAI Label 0.8.5 copies whatever ``PUT /datastore/label`` and ``PUT /datastore/image`` send
straight into the studies folder, under names built from the request, and rewrites
``datastore_v2.json`` in place. This subclass, for the same endpoints:

* refuses what the app could not use, with an HTTP 4xx that names the problem and nothing
  written: an unreadable file, an extension the datastore does not list, an image above the
  ``max_image_pixels`` limit, a label whose size differs from its image's, a label with values
  other than 0/1 (0/255, as binary PNG masks are saved, is accepted; the file is stored as
  sent), an unknown image id (404);
* refuses ids and tags that would name a file outside the studies folder (``../``, ``/``);
* writes each file to a temporary name beside it, then renames it over the old one, so a
  crash leaves the previous label (or none), never half of one; the same for the index file.

FastAPI turns an ``HTTPException`` raised here into its status and ``detail``; any other
exception would be a bare 500.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from busi_monai.data.io import DEFAULT_MAX_PIXELS, BusiInputError, read_image, read_mask
from busi_monai.jsonio import dumps
from lib.errors import http_error

logger = logging.getLogger(__name__)


def check_name(value: str, what: str) -> str:
    """An id or tag that is one plain file/folder name: never a path, never hidden."""
    if (
        not isinstance(value, str)
        or not value.strip()
        or value.startswith(".")
        or any(c in value for c in ("/", "\\", "\0"))
        or os.path.isabs(value)
        or any(ord(c) < 32 for c in value)
    ):
        raise http_error(422, f"{what} {value!r}: must be a plain name (no '/', '\\', leading '.' or control characters)")
    return value


def replace_file(src: str, dest: str) -> None:
    """Copy ``src`` onto ``dest`` atomically (temporary name in the same folder, fsync, rename).

    The temporary name ends in ``.partial``, which no datastore pattern matches, so the folder
    watcher never lists a half-copied file.
    """
    folder = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class BusiDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, max_image_pixels: int = DEFAULT_MAX_PIXELS, **kwargs):
        self.max_image_pixels = int(max_image_pixels)
        super().__init__(datastore_path, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:
            # Atomic writes arrive as renames, which LocalDatastore's watcher ignores: without
            # this the server would miss the scores a scoring subprocess saves in the index.
            handler.on_moved = self._on_moved_event

    def _on_moved_event(self, event):
        if os.fsdecode(event.dest_path) == self._datastore_config_path:
            self._init_from_datastore_file()
        else:
            self._on_any_event(event)

    # -- checks ----------------------------------------------------------------------------
    def _ext_of(self, filename: str, what: str) -> str:
        _, ext = self._to_id(os.path.basename(filename))
        known = [e.replace("*", "") for e in self._extensions]
        if ext not in known:
            raise http_error(422, f"{what}: file type {ext or '(none)'!r} is not one of {', '.join(dict.fromkeys(e.lower() for e in known))}")
        return ext

    def _inside(self, path: str, folder: str) -> str:
        real, root = os.path.realpath(path), os.path.realpath(folder)
        if os.path.dirname(real) != root:
            raise http_error(422, f"{os.path.basename(path)!r}: would be written outside the studies folder")
        return real

    @staticmethod
    def _public(e: BusiInputError, tmp_path: str, name: str) -> str:
        # The upload's temporary path means nothing to the client and reveals the server's layout.
        return str(e).replace(tmp_path, name)

    # -- writes ----------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        ext = self._ext_of(image_filename, "image")
        image_id = check_name(image_id or self._to_id(os.path.basename(image_filename))[0], "image id")
        try:
            read_image(image_filename, max_pixels=self.max_image_pixels)
        except BusiInputError as e:
            raise http_error(422, self._public(e, image_filename, f"image {image_id!r}")) from None
        name = self._filename(image_id, ext)
        dest = self._inside(os.path.join(self._datastore.image_path(), name), self._datastore.image_path())
        with FileLock(self._lock_file):
            replace_file(image_filename, dest)
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        logger.info("added image %s (%s)", image_id, name)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        tag = check_name(label_tag, "label tag")
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise http_error(404, f"image {image_id!r} is not in the datastore")
        what = f"label for {image_id!r}"
        ext = self._ext_of(label_filename, what)
        try:
            shape = read_image(self.get_image_uri(image_id), max_pixels=self.max_image_pixels).shape
        except BusiInputError as e:
            raise http_error(422, f"image {image_id!r} cannot be read, so its label cannot be checked: {e}") from None
        try:
            read_mask(label_filename, expected_shape=shape, strict_binary=True, max_pixels=self.max_image_pixels)
        except BusiInputError as e:
            raise http_error(422, self._public(e, label_filename, what)) from None

        folder = self._datastore.label_path(tag)
        name = self._filename(image_id, ext)
        with FileLock(self._lock_file):
            # Fetched again under the lock: the watcher may have reloaded the index meanwhile.
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise http_error(404, f"image {image_id!r} is not in the datastore")
            os.makedirs(folder, exist_ok=True)
            dest = self._inside(os.path.join(folder, name), folder)
            replace_file(label_filename, dest)
            old = obj.labels.get(tag)
            if old is not None and old.ext != ext:
                # A re-submission in another format replaces the old file, or both would be listed.
                stale = os.path.join(folder, self._filename(image_id, old.ext))
                if os.path.isfile(stale):
                    os.unlink(stale)
            info = dict(label_info or {}, ts=int(time.time()), name=name)
            obj.labels[tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        logger.info("saved %s label of %s (%s)", tag, image_id, name)
        return image_id

    def remove_image(self, image_id: str) -> None:
        try:
            super().remove_image(image_id)
        except ImageNotFoundException:
            raise http_error(404, f"image {image_id!r} is not in the datastore") from None

    def _update_datastore_file(self, lock=True):
        """The index (datastore_v2.json) written atomically: a crash mid-write would otherwise
        leave a truncated file that stops the next server start."""

        def write():
            fd, tmp = tempfile.mkstemp(prefix=".datastore.", suffix=".partial", dir=self._datastore_path)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(dumps(self._datastore.model_dump(exclude={"base_path"}), what="datastore index"))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._datastore_config_path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
