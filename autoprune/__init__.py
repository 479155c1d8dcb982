"""autoprune: search per-layer pruning ratios with Optuna, for the lab's VGG and any CNN Torch-Pruning can trace."""

from .errors import AutopruneError
from .sources import build_model, load_checkpoint, prunable, save_checkpoint

__version__ = "0.1.0"


def load(path, source: str | None = None):
    """Load a checkpoint file or an export directory as a ready ``nn.Module`` (eval mode).

    ``source`` must name the checkpoint's ``module:package.module:factory``
    source when it has one: autoprune imports user code only when asked to.
    """
    return load_checkpoint(path, source)[0]


__all__ = ["AutopruneError", "build_model", "load", "load_checkpoint", "prunable", "save_checkpoint"]
