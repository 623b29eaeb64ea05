"""Metrics, ``busi-monai evaluate`` and ``busi-monai report``."""
