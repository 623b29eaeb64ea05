"""The click model's memory of the last outline (busi_monai.inference.outlines) and the parsing of
Slicer's ROI box (the app's ``request_box``), without a server: the server-level checks are in
test_app_clicks.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from busi_monai.inference.outlines import OutlineCache

A, B, C = (10.0, 20.0), (30.0, 5.0), (12.0, 40.0)


def _mask(seed: int, shape=(9, 13)) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) > 0.5).astype(np.uint8)


def test_an_extending_request_gets_the_last_outline_back_exactly():
    cache = OutlineCache(4)
    m = _mask(0)
    cache.remember("user-xyz", "img.png", [A], [], None, "v1", m)
    got = cache.previous("user-xyz", "img.png", [A, C], [], None, "v1")
    assert got is not None and got.dtype == np.uint8
    np.testing.assert_array_equal(got, m)
    # One list may stay as it was while the other grows.
    cache.remember("user-xyz", "img.png", [A, C], [], None, "v1", _mask(1))
    np.testing.assert_array_equal(cache.previous("user-xyz", "img.png", [A, C], [B], None, "v1"), _mask(1))


@pytest.mark.parametrize(
    ("client", "image", "fg", "bg", "box", "version", "why"),
    [
        ("other", "img.png", [A, C], [B], (1, 2, 5, 8), "v1", "another client"),
        ("user-xyz", "other.png", [A, C], [B], (1, 2, 5, 8), "v1", "another image"),
        ("user-xyz", "img.png", [A], [B], (1, 2, 5, 8), "v1", "the same clicks, none more"),
        ("user-xyz", "img.png", [C, A], [B], (1, 2, 5, 8), "v1", "the clicks in another order"),
        ("user-xyz", "img.png", [C], [B], (1, 2, 5, 8), "v1", "a click moved"),
        ("user-xyz", "img.png", [A, C], [], (1, 2, 5, 8), "v1", "a background click deleted"),
        ("user-xyz", "img.png", [A, C], [B], None, "v1", "the box removed"),
        ("user-xyz", "img.png", [A, C], [B], (1, 2, 5, 9), "v1", "another box"),
        ("user-xyz", "img.png", [A, C], [B], (1, 2, 5, 8), "v2", "new weights"),
    ],
)
def test_anything_but_an_extension_starts_afresh(client, image, fg, bg, box, version, why):
    cache = OutlineCache(4)
    cache.remember("user-xyz", "img.png", [A], [B], (1, 2, 5, 8), "v1", _mask(0))
    assert cache.previous("user-xyz", "img.png", [A, C], [B], (1, 2, 5, 8), "v1") is not None, "the control case reuses"
    assert cache.previous(client, image, fg, bg, box, version) is None, why


def test_a_replaced_image_file_starts_afresh():
    cache = OutlineCache(4)
    cache.remember("u", "img.png", [A], [], None, "v1", _mask(0), stamp=(1, 100))
    assert cache.previous("u", "img.png", [A, C], [], None, "v1", stamp=(1, 100)) is not None
    assert cache.previous("u", "img.png", [A, C], [], None, "v1", stamp=(2, 100)) is None


def test_clients_and_images_are_kept_apart():
    cache = OutlineCache(8)
    for k, (client, image) in enumerate([("u1", "a"), ("u2", "a"), ("u1", "b")]):
        cache.remember(client, image, [A], [], None, "v", _mask(k))
    for k, (client, image) in enumerate([("u1", "a"), ("u2", "a"), ("u1", "b")]):
        np.testing.assert_array_equal(cache.previous(client, image, [A, C], [], None, "v"), _mask(k))
    # A new request for one replaces that one only.
    cache.remember("u1", "a", [B], [], None, "v", _mask(7))
    np.testing.assert_array_equal(cache.previous("u2", "a", [A, C], [], None, "v"), _mask(1))
    assert len(cache) == 3


def test_bounded_least_recently_used_first_out():
    cache = OutlineCache(3)
    for k in range(3):
        cache.remember("u", f"img{k}", [A], [], None, "v", _mask(k))
    assert cache.previous("u", "img0", [A, C], [], None, "v") is not None  # img0 is now the most recent
    for k in range(3, 10):
        cache.remember("u", f"img{k}", [A], [], None, "v", _mask(k))
        assert len(cache) == 3
    assert cache.previous("u", "img0", [A, C], [], None, "v") is None
    assert [cache.previous("u", f"img{k}", [A, C], [], None, "v") is not None for k in range(7, 10)] == [True] * 3
    # Capacity 0 remembers nothing; a negative one is refused.
    off = OutlineCache(0)
    off.remember("u", "img", [A], [], None, "v", _mask(0))
    assert len(off) == 0 and off.previous("u", "img", [A, C], [], None, "v") is None
    with pytest.raises(ValueError, match="capacity"):
        OutlineCache(-1)


def test_the_stored_outline_is_a_copy_packed_small():
    cache = OutlineCache(2)
    m = np.zeros((400, 600), np.uint8)
    m[100:200, 300:450] = 1
    cache.remember("u", "img", [A], [], None, "v", m)
    m[:] = 0  # the caller's array changing later does not change what is remembered
    got = cache.previous("u", "img", [A, C], [], None, "v")
    assert got.sum() == 100 * 150 and got[150, 400] == 1
    assert sum(e.bits.nbytes for e in cache._entries.values()) == 400 * 600 // 8


def test_threads_never_see_a_half_written_cache():
    cache = OutlineCache(5)
    errors = []

    def work(t):
        try:
            for k in range(200):
                cache.remember(f"u{t}", f"img{k % 7}", [A], [], None, "v", _mask(t, (4, 4)))
                got = cache.previous(f"u{t}", f"img{k % 7}", [A, C], [], None, "v")
                if got is not None and not np.array_equal(got, _mask(t, (4, 4))):
                    errors.append((t, k))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(cache) == 5


# ------------------------------------------------------------------------------------------
# Slicer's ROI box
# ------------------------------------------------------------------------------------------
@pytest.fixture
def request_box(monkeypatch):
    from app_server import import_app_lib

    pytest.importorskip("fastapi")
    import_app_lib(monkeypatch)
    pytest.importorskip("monailabel")
    from lib.infers.attention_unet import request_box

    return request_box


def test_roi_in_slicers_order_is_columns_then_rows(request_box):
    shape = (90, 160)  # rows, columns: not square, so swapped axes land elsewhere or outside
    assert request_box({"roi": [100, 150, 10, 40, 0, 0]}, shape) == (10, 100, 40, 150)
    assert request_box({"roi": [100, 150, 10, 40]}, shape) == (10, 100, 40, 150)
    # Reversed pairs (IJK axes against RAS, as for a PNG) are the same box.
    assert request_box({"roi": [150, 100, 40, 10, 1, -1]}, shape) == (10, 100, 40, 150)
    # Partly outside: clipped to the image.
    assert request_box({"roi": [140, 200, -5, 30, 0, 0]}, shape) == (0, 140, 30, 159)
    for no_box in ({}, {"roi": []}, {"roi": None}):
        assert request_box(no_box, shape) is None


@pytest.mark.parametrize(
    ("roi", "why"),
    [
        ([170, 200, 10, 40, 0, 0], "outside the 160x90 image"),
        ([10, 40, 100, 150, 0, 0], "outside the 160x90 image"),  # rows and columns swapped
        ([30, 30, 10, 40, 0, 0], "too small"),
        ([30, 60, 10, 10, 0, 0], "too small"),
        ([float("nan"), 60, 10, 40, 0, 0], "not finite"),
        ([10, float("inf"), 10, 40, 0, 0], "not finite"),
        ([10, 60, 10], "expected [i0, i1, j0, j1, k0, k1]"),
        ("10,60,10,40", "expected [i0, i1, j0, j1, k0, k1]"),
        ([10, "a", 10, 40, 0, 0], "not numeric"),
        ([True, 60, 10, 40, 0, 0], "not numeric"),
    ],
)
def test_a_bad_roi_is_a_422_naming_the_problem(request_box, roi, why):
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as e:
        request_box({"roi": roi}, (90, 160))
    assert e.value.status_code == 422 and why in e.value.detail and "roi" in e.value.detail
