"""secateur: training-time structured pruning for PyTorch. Models shrink while they learn."""

__version__ = "0.1.0"


def load_pruned(path):
    """The model exported by `secateur export` into folder `path`, weights loaded, eval mode
    (see secateur.trainer.export.load_pruned)."""
    from secateur.trainer.export import load_pruned as _load

    return _load(path)
