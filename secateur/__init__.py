"""secateur: training-time structured pruning for PyTorch. Models shrink while they learn."""

__version__ = "0.1.0"
