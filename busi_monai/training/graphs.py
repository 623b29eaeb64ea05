"""The whole training step (forward, loss, backward, optimiser step) captured as one CUDA graph.

At the paper's batch of 4 an eager step on a GPU is bound by kernel launches. ``torch.compile``
(``--compile``) removes them but compiles for tens of seconds on every new machine; replaying the
eager step as a CUDA graph removes them with no compilation (issue #20: the paper recipe's 50
epochs in a minute on a new machine). See PyTorch's "CUDA Graphs, whole-network capture".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GraphedStep:
    """Call with a full batch ``(x, y)``; returns the loss (a tensor the next call overwrites).

    The batch is copied into static buffers, so every call must have the first call's shapes.
    On a GPU the first ``warmup`` calls run eagerly on a side stream (cuDNN autotuning, the
    optimiser's state), the next one is captured and every later one replays the graph. Each
    call is exactly one training step, captured or not. Elsewhere, and when ``capture`` is off,
    every call runs the same step eagerly on the same buffers.

    Args:
        step: forward, loss, ``backward()`` and ``optimizer.step()`` on ``(x, y)``, returning the
            loss; it must not zero the gradients (the graph overwrites them in place).
        optimizer: with a tensor learning rate, so that the schedule's changes reach the graph,
            and ``capturable=True`` on a GPU (:func:`~busi_monai.training.optimizers.make_optimizer`
            with ``graph_safe``).
        warmup: eager steps before the capture.
        capture: capture on a GPU (off: always eager, for comparisons).
    """

    def __init__(self, step: StepFn, optimizer: torch.optim.Optimizer, warmup: int = 3, capture: bool = True):
        if not all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups):
            raise ValueError("a graphed step needs a tensor learning rate (make_optimizer(..., graph_safe=True))")
        self.step, self.optimizer, self.warmup, self.capture = step, optimizer, warmup, capture
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.x = self.y = self.loss = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.x is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        elif x.shape != self.x.shape or y.shape != self.y.shape:
            raise ValueError(f"a graphed step takes batches of {tuple(self.x.shape)}, got {tuple(x.shape)}")
        self.x.copy_(x)
        self.y.copy_(y)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        if not (self.capture and x.is_cuda):
            self.optimizer.zero_grad(set_to_none=True)
            return self.step(self.x, self.y)
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.step(self.x, self.y)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if not all(g.get("capturable") for g in self.optimizer.param_groups):
            raise ValueError("a CUDA graph needs an optimiser built with capturable=True (make_optimizer(..., graph_safe=True) on the GPU)")
        # Capture records without running: replay once for this call's step. Gradients set to
        # None first, so that backward allocates them inside the graph's memory pool.
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self.step(self.x, self.y)
        self.graph.replay()
        return self.loss
