"""Click-guided interactive segmentation (issue #18): click maps for the network's two extra
input channels, click simulators for training and evaluation, and the evaluation protocol.

Self-contained (numpy, scipy, torch, monai, matplotlib only), so the network, the training
loop, the evaluation CLI and the MONAI Label app can each use it. Coordinates are (row, col).
"""

from .guidance import (
    DEFAULT_SIGMA,
    NEGATIVE,
    NO_CLICK,
    POSITIVE,
    click_maps,
    click_maps_batch,
    clicks_to_tensors,
    rowcol_from_xy,
    rowcol_inside,
    scale_clicks,
)
from .protocol import (
    ClickEvaluation,
    clicks_to_reach,
    dice,
    evaluate_clicks,
    plot_dice_vs_clicks,
    summarize,
)
from .simulation import (
    DEFAULT_MAX_DEPTH,
    ProtocolClick,
    SimulatedClicks,
    protocol_click,
    sample_corrective_clicks,
    sample_initial_clicks,
    simulate_training_clicks,
)

__all__ = [
    "ClickEvaluation",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_SIGMA",
    "NEGATIVE",
    "NO_CLICK",
    "POSITIVE",
    "ProtocolClick",
    "SimulatedClicks",
    "click_maps",
    "click_maps_batch",
    "clicks_to_reach",
    "clicks_to_tensors",
    "dice",
    "evaluate_clicks",
    "plot_dice_vs_clicks",
    "protocol_click",
    "rowcol_from_xy",
    "rowcol_inside",
    "sample_corrective_clicks",
    "sample_initial_clicks",
    "scale_clicks",
    "simulate_training_clicks",
    "summarize",
]
