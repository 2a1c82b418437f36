"""Layer-wise hand-off in the engine: the runner's per-layer hook during a prefill step calls
the stage callback of every request whose prompt completes in that step.

A callback that raises is logged and dropped for the rest of the step: the owner (the prefill
role) learns of it from its own state and fails that hand-off, while the step, and the other
requests of the batch, go on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from pd_serve.backends.base import ModelRunner
from pd_serve.engine.block_manager import BlockManager
from pd_serve.engine.request import Request

log = logging.getLogger(__name__)


def check_layer_stage(runner: ModelRunner) -> None:
    """ValueError unless `runner` calls a per-layer hook during prefill."""
    if not runner.supports_layer_hook:
        raise ValueError(f"layer-wise hand-off needs a runner with a per-layer hook; "
                         f"{type(runner).__name__} has none (use the torch backend or turn "
                         f"pd.handoff_layerwise off)")


@contextmanager
def layer_hooks(runner: ModelRunner, blocks: BlockManager, done: list[Request]) -> Iterator[None]:
    """While the block runs, `runner.layer_hook` stages each layer for the requests of `done`
    (those whose prefill completes this step) that asked for it."""
    stages = [(r, r.block_table[:blocks.blocks_for(r.num_prompt_tokens)], r.num_prompt_tokens)
              for r in done if r.on_layer is not None]
    if not stages:
        yield
        return
    live = list(stages)

    def hook(layer: int) -> None:
        for item in list(live):
            req, table, num_tokens = item
            assert req.on_layer is not None
            try:
                req.on_layer(layer, table, num_tokens)
            except Exception:
                log.exception("layer-wise staging of %s failed at layer %d; it is dropped",
                              req.request_id, layer)
                live.remove(item)

    runner.layer_hook = hook
    try:
        yield
    finally:
        runner.layer_hook = None
