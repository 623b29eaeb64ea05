"""The batched ultrasound augmentation: image and mask move together, masks stay masks."""

import pytest
import torch

from busi_monai.training.augmentation import AUGMENTATIONS, BatchAugment, augmentation

GEOMETRY_ONLY = dict(p_gamma=0.0, p_contrast=0.0, p_blur=0.0, p_noise=0.0)


def _blobs(n: int = 8, size: int = 64) -> torch.Tensor:
    """Binary (n, 1, S, S) masks: an off-centre ellipse each, so flips and warps show."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        cy, cx = size * (0.3 + 0.04 * i), size * (0.25 + 0.05 * i)
        out[i, 0] = (((yy - cy) / (size * 0.15)) ** 2 + ((xx - cx) / (size * 0.1)) ** 2 <= 1).float()
    return out


@pytest.mark.parametrize("kind", ["ultrasound", "ultrasound+elastic"])
def test_masks_stay_binary_and_follow_the_image(kind):
    torch.manual_seed(0)
    y = _blobs()
    # The image is the mask itself, so wherever the geometry takes one it must take the other.
    aug = BatchAugment(**GEOMETRY_ONLY, p_elastic=1.0 if "elastic" in kind else 0.0)
    x2, y2 = aug(y.clone(), y.clone())
    assert set(y2.unique().tolist()) <= {0.0, 1.0}
    assert ((x2 > 0.5).float() == y2).float().mean() > 0.99
    xs, ys = augmentation(kind)(torch.rand(8, 1, 64, 64), y.clone())
    assert 0 <= xs.min() and xs.max() <= 1 and set(ys.unique().tolist()) <= {0.0, 1.0}


def test_elastic_warp_changes_the_outline_beyond_a_flip():
    torch.manual_seed(0)
    y = _blobs()
    no_affine = dict(GEOMETRY_ONLY, p_affine=0.0)
    _, rigid = BatchAugment(**no_affine)(y.clone(), y.clone())
    _, warped = BatchAugment(**no_affine, p_elastic=1.0)(y.clone(), y.clone())
    # Without affine or elastic, each mask is itself or its mirror image.
    assert all(torch.equal(r, m) or torch.equal(r, m.flip(-1)) for r, m in zip(rigid, y))
    moved = [min((w != m).float().mean(), (w != m.flip(-1)).float().mean()) for w, m in zip(warped, y)]
    assert all(0 < d < 0.1 for d in moved)  # warped, not torn apart


def test_unknown_augmentation_names_the_choices():
    assert augmentation("none") is None
    with pytest.raises(ValueError, match="ultrasound\\+elastic"):
        augmentation("elastic-only")
    assert list(AUGMENTATIONS) == ["none", "ultrasound", "ultrasound+elastic", "nnunet"]
