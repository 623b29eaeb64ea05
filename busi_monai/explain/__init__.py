"""Grad-CAM and attention maps, and the per-image explanation figure (``busi-monai explain``)."""
