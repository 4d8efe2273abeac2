"""One training step, run eagerly or captured once as a CUDA graph and replayed.

At rvf10k's 64 px and the seed's batch of 64, an H100 finishes the arithmetic of a step long
before the host has launched it: Inception v1's forward, backward and Adam step are ~1,000
kernel launches, each a few microseconds of Python and dispatcher work, so the GPU idles
most of the step (measured on one H100, rvf's eager path: Inception v1 2,131 img/s, LeNet
15,626 img/s; see the README's performance section). A CUDA graph records those launches once
and replays them with one call, which is how the whole 64 px zoo stops being host-bound.

    step = build_train_step(model, criterion, optimizer, cuda_graph=True, backward=accelerator.backward)
    loss, logits = step(x, targets)   # forward, loss, backward, (clip), optimizer step
    scheduler.step(); step.lr_changed()

A captured step replays exactly what it recorded, which sets its rules:
- every batch has the shape, dtype and memory format of the batch it was captured with
  (training drops the last incomplete batch);
- nothing in the step may wait for the host (no `.item()`), and the optimizer must be
  `capturable` (torch's Adam and AdamW are);
- the learning rate is read from a device tensor that `lr_changed()` refreshes after each
  scheduler step, since a Python float would be frozen into the graph;
- the optimizer's `zero_grad` is not called between replays: the captured backward writes the
  gradients (it does not accumulate into them), in memory the graph owns.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

__all__ = ["TrainStep", "CUDAGraphTrainStep", "build_train_step", "cuda_graph_problems"]


class TrainStep:
    """Forward, loss, backward, optional gradient clipping and optimizer step on one batch.

    Args:
        model: returns logits (B, C), or (logits, *aux_logits) in training mode (Inception v1).
        criterion: loss of (logits, targets); targets are class indices or soft labels.
        optimizer: stepped once per call; its gradients are cleared after the step.
        grad_clip: max gradient norm, or 0/None for none.
        aux_weight: weight of each auxiliary head's loss.
        backward: how to backpropagate a loss (`accelerator.backward` under Accelerate).
        clip: how to clip gradients (`accelerator.clip_grad_norm_` under Accelerate).
        autocast: context manager factory for the forward pass, where the model is not
            already wrapped in one (Accelerate wraps it; `scripts/benchmark.py` does not).
    """

    def __init__(self, model: nn.Module, criterion: Callable, optimizer: torch.optim.Optimizer, *,
                 grad_clip: float | None = None, aux_weight: float = 0.3,
                 backward: Callable | None = None, clip: Callable | None = None,
                 autocast: Callable | None = None):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.grad_clip, self.aux_weight = grad_clip, aux_weight
        self.backward = backward or (lambda loss: loss.backward())
        self.clip = clip or torch.nn.utils.clip_grad_norm_
        self.autocast = autocast or contextlib.nullcontext

    def compute(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward and optimizer step; return (loss, logits), both detached."""
        with self.autocast():
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            # Auxiliary classifiers (Inception v1's `aux_logits`) add their own weighted
            # losses; only the main head is counted in accuracy and used at eval.
            logits, *aux = out
            loss = self.criterion(logits, targets) + self.aux_weight * sum(self.criterion(a, targets) for a in aux)
        else:
            logits = out
            loss = self.criterion(logits, targets)
        self.backward(loss)
        if self.grad_clip:
            self.clip(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.compute(x, targets)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, logits

    def lr_changed(self) -> None:
        """Call after the scheduler has set new learning rates (an eager step reads them itself)."""


class CUDAGraphTrainStep(TrainStep):
    """A `TrainStep` captured as one CUDA graph after `warmup` eager steps, then replayed.

    The warm-up steps are real training steps on real batches (they also create the
    optimizer's state and let cuDNN pick its algorithms, neither of which may happen during
    capture); they run on a side stream, as torch.cuda.graphs' documentation asks. The batch
    the graph is captured on is then trained on by the first replay, so no batch is skipped
    or repeated: the weights follow the same sequence of updates as the eager step's.
    """

    def __init__(self, *args, warmup: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        # One fp32 device scalar per param group: the captured optimizer step reads the
        # learning rate from here, so the schedule keeps working after capture.
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=self._device())
                    for g in optimizer_param_groups(self.optimizer)]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def lr_changed(self) -> None:
        for t, g in zip(self.lrs, optimizer_param_groups(self.optimizer)):
            t.fill_(float(g["lr"]))  # a kernel launch with the value as argument: no host sync

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            if self.eager_steps < self.warmup:
                self.eager_steps += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = super().__call__(x, targets)
                torch.cuda.current_stream().wait_stream(side)
                return out
            self._capture(x, targets)
        self.static_x.copy_(x)
        self.static_targets.copy_(targets)
        self.graph.replay()
        return self.static_loss, self.static_logits

    def _capture(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        # Inputs live at fixed addresses the graph reads; clone keeps x's memory format.
        self.static_x, self.static_targets = x.clone(), targets.clone()
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients it writes
        groups = optimizer_param_groups(self.optimizer)
        floats = [g["lr"] for g in groups]
        self.lr_changed()
        for g, t in zip(groups, self.lrs):
            g["lr"] = t  # captured as a pointer to t, not as the number it holds now
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a DataLoader's pin-memory thread may allocate while this thread captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_loss, self.static_logits = self.compute(self.static_x, self.static_targets)
        finally:
            for g, v in zip(groups, floats):  # the scheduler and checkpoints keep seeing floats
                g["lr"] = v
        self.graph = graph


def optimizer_param_groups(optimizer) -> list[dict]:
    """The param groups of a torch optimizer or of Accelerate's wrapper around one."""
    return getattr(optimizer, "optimizer", optimizer).param_groups


def cuda_graph_problems(device: torch.device, optimizer, *, num_processes: int = 1, mixed_precision: str = "no",
                        compile: bool = False, gradient_accumulation_steps: int = 1) -> list[str]:
    """Why a training step cannot be captured as a CUDA graph here (empty: it can)."""
    problems = []
    if torch.device(device).type != "cuda":
        problems.append(f"it needs a CUDA device, and training runs on {device}")
    if num_processes > 1:
        problems.append(f"it runs in one process only, and this run has {num_processes} (DDP)")
    if mixed_precision == "fp16":
        problems.append("fp16's gradient scaler checks for infs on the host each step; use bf16")
    if compile:
        problems.append("compile: true captures graphs of its own (mode='reduce-overhead'); choose one")
    if gradient_accumulation_steps > 1:
        problems.append("gradient accumulation changes what a step does from step to step")
    groups = optimizer_param_groups(optimizer)
    if not all(g.get("capturable", False) for g in groups):
        name = type(getattr(optimizer, "optimizer", optimizer)).__name__
        problems.append(f"the optimizer ({name}) is not capturable; torch's adam and adamw are")
    return problems


def build_train_step(model: nn.Module, criterion: Callable, optimizer, *, cuda_graph: bool = False,
                     **kwargs) -> TrainStep:
    """An eager `TrainStep`, or a `CUDAGraphTrainStep` when `cuda_graph` is true."""
    return (CUDAGraphTrainStep if cuda_graph else TrainStep)(model, criterion, optimizer, **kwargs)
