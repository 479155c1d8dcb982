"""autoprune: search per-layer pruning ratios with Optuna, for the lab's VGG and any CNN Torch-Pruning can trace."""

from .errors import AutopruneError

__version__ = "0.1.0"

# The model helpers (and torch) load on first use, so the coordination layer (autoprune.runner)
# imports without torch: a worker pool's benchmark runs it in many light processes.
_MODEL_NAMES = ("build_model", "load_checkpoint", "prunable", "save_checkpoint")


def __getattr__(name):
    if name in _MODEL_NAMES:
        from . import sources

        return getattr(sources, name)
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")


def prune(model, train, val, test=None, **options):
    """Search pruning ratios for a model you hold, on your tensors; see :func:`autoprune.api.prune`."""
    from .api import prune as search_and_pick

    return search_and_pick(model, train, val, test, **options)


def load(path, source: str | None = None):
    """Load a checkpoint file or an export directory as a ready ``nn.Module`` (eval mode).

    ``source`` must name the checkpoint's ``module:package.module:factory``
    source when it has one: autoprune imports user code only when asked to.
    """
    from .sources import load_checkpoint

    return load_checkpoint(path, source)[0]


__all__ = ["AutopruneError", "build_model", "load", "load_checkpoint", "prunable", "prune", "save_checkpoint"]
