"""autoprune: search per-layer pruning ratios for the lab's VGG with Optuna."""

from .errors import AutopruneError

__version__ = "0.1.0"

# The model helpers (and torch) load on first use, so the coordination layer (autoprune.runner)
# imports without torch: a worker pool's benchmark runs it in many light processes.
_MODEL_NAMES = ("build_model", "load_checkpoint", "save_checkpoint")


def __getattr__(name):
    if name in _MODEL_NAMES:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")


def load(path):
    """Load a checkpoint file or an export directory as a ready ``nn.Module`` (eval mode)."""
    from .model import load_checkpoint

    return load_checkpoint(path)[0]


__all__ = ["AutopruneError", "build_model", "load", "load_checkpoint", "save_checkpoint"]
