"""autoprune: search per-layer pruning ratios for the lab's VGG with Optuna."""

from .errors import AutopruneError
from .model import build_model, load_checkpoint, save_checkpoint

__version__ = "0.1.0"


def load(path):
    """Load a checkpoint file or an export directory as a ready ``nn.Module`` (eval mode)."""
    return load_checkpoint(path)[0]


__all__ = ["AutopruneError", "build_model", "load", "load_checkpoint", "save_checkpoint"]
