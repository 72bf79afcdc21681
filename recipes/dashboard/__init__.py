"""What a run shows: the :class:`Dashboard` callback (W&B, TensorBoard, CSV), per-slot convergence data, plots."""

from recipes.dashboard.callback import Dashboard
from recipes.dashboard.plots import curves_figure, heat_map_figure, plot_run
from recipes.dashboard.rounds import RoundRecord, RoundRecorder, last_round, read_rounds

__all__ = [
    "Dashboard",
    "RoundRecord",
    "RoundRecorder",
    "curves_figure",
    "heat_map_figure",
    "last_round",
    "plot_run",
    "read_rounds",
]
