"""busi-monai: breast-lesion segmentation in ultrasound with the paper's Attention U-Net on MONAI."""

__version__ = "0.1.0"


def build_network(preset="paper"):
    """The Attention U-Net by name (``paper``, ``fast``, ``half``, ``paper+ds``); see :mod:`busi_monai.model.networks`."""
    from busi_monai.model.networks import build_network as _build

    return _build(preset)


__all__ = ["build_network", "__version__"]
