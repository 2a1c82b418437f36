"""Model graphs per framework behind one ModelRunner interface (MindSpore, PyTorch)."""

from __future__ import annotations

from pd_serve.backends.base import ModelRunner, RunnerConfig

BACKENDS = ("mindspore", "torch")


def create_runner(cfg: RunnerConfig) -> ModelRunner:
    """Builds the runner of `cfg.backend`; the framework is imported only when chosen."""
    if cfg.backend == "mindspore":
        from pd_serve.backends.mindspore.runner import MindSporeRunner

        return MindSporeRunner(cfg)
    if cfg.backend == "torch":
        from pd_serve.backends.torch.runner import TorchRunner

        return TorchRunner(cfg)
    raise ValueError(f"backend {cfg.backend!r} is unknown (choose from {BACKENDS})")
