"""One training step, run eagerly or captured once as a CUDA graph and replayed.

At rvf10k's 64 px and the seed's batch of 64, an H100 finishes the arithmetic of a step long
before the host has launched it: Inception v1's forward, backward and Adam step are ~1,000
kernel launches, each a few microseconds of Python and dispatcher work, so the GPU idles
most of the step (measured on one H100, rvf's eager path: Inception v1 2,131 img/s, LeNet
15,626 img/s; see the README's performance section). A CUDA graph records those launches once
and replays them with one call, which is how the whole 64 px zoo stops being host-bound
(measured on one H200: LeNet 106,754 img/s graphed against 21,604 eager, Inception v1 13,599
img/s through `train()`; the seven seed configs' 20 epochs in 38 s of training).

    step = build_train_step(model, criterion, optimizer, cuda_graph=True, backward=accelerator.backward)
    loss, logits = step(x, targets)   # forward, loss, backward, (clip), optimizer step
    scheduler.step()                  # a graphed step reads the new lr on its next call

A captured step replays exactly what it recorded, which sets its rules:
- every batch has the shape, dtype and memory format of the batch it was captured with
  (training drops the last incomplete batch);
- nothing in the step may wait for the host (no `.item()`), and the optimizer must be
  `capturable` (torch's Adam and AdamW are);
- the learning rate is read from a device tensor that each call refreshes from the optimizer's
  param groups before the replay, since a Python float would be frozen into the graph;
- the optimizer's `zero_grad` is not called between replays: the captured backward writes the
  gradients (it does not accumulate into them), in memory the graph owns;
- nothing may rebind a tensor the graph captured (parameters, buffers, optimizer state):
  load checkpoints before the first step, and copy into parameters (`load_state_dict`)
  rather than replace them.
The returned loss and logits are the graph's own outputs, overwritten by the next call: read
(or clone) them before stepping again.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
from torch import nn

__all__ = ["TrainStep", "SAMTrainStep", "CUDAGraphTrainStep", "build_train_step", "cuda_graph_problems",
           "set_capturable"]


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

    def forward_loss(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and loss: (loss, logits of the main head)."""
        with self.autocast():
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            # Auxiliary classifiers (Inception v1's `aux_logits`) add their own weighted
            # losses; only the main head is counted in accuracy and used at eval.
            logits, *aux = out
            aux_loss = sum(self.criterion(a, targets) for a in aux)
            return self.criterion(logits, targets) + self.aux_weight * aux_loss, logits
        return self.criterion(out, targets), out

    def compute(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward and optimizer step; return (loss, logits), both detached."""
        loss, logits = self.forward_loss(x, targets)
        self.backward(loss)
        if self.grad_clip:
            self.clip(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.compute(x, targets)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, logits


class SAMTrainStep(TrainStep):
    """A `TrainStep` that descends with the gradient taken at the worst nearby weights (SAM).

    Sharpness-Aware Minimization (Foret et al. 2021, "Sharpness-Aware Minimization for
    Efficiently Improving Generalization"): the gradient g at the weights w moves them to
    w + rho * g / ||g||, the steepest point on a sphere of radius rho around them; the loss is
    taken there again, and its gradient, back at w, is what the optimizer steps with. That
    prefers flat minima, which is what generalises when a network fits its few thousand
    training faces completely. Each step costs two forward and backward passes.

    The second pass leaves BatchNorm's running statistics alone (momentum 0), so they track
    the weights that are kept, once a step, as in a plain step. Its dropout masks are drawn
    afresh (as in the paper's and the common implementations). The loss and logits returned
    are the first pass's, at the weights being trained. Under fp16 the gradients are scaled by
    the loss scale, which the normalisation cancels; a gradient with infs or NaNs perturbs
    nothing (the scaler then skips the step as usual).

    Args:
        rho: the neighbourhood's radius, in the weights' own units (the paper's 0.05).
    """

    def __init__(self, *args, rho: float, **kwargs):
        super().__init__(*args, **kwargs)
        if not rho > 0:
            raise ValueError(f"SAM needs a radius rho > 0, got {rho}")
        self.rho = rho

    def compute(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.forward_loss(x, targets)
        self.backward(loss)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)).float())
        # A non-finite norm (an fp16 overflow) gives scale 0: no perturbation, and no NaN written into the weights.
        scale = torch.where(torch.isfinite(norm), self.rho / (norm + 1e-12), torch.zeros_like(norm))
        eps = torch._foreach_mul(grads, scale)
        for e in eps:  # 0 * inf is NaN
            torch.nan_to_num_(e, nan=0.0, posinf=0.0, neginf=0.0)
        with torch.no_grad():
            torch._foreach_add_(params, eps)
        self.optimizer.zero_grad(set_to_none=True)
        with frozen_batchnorm_stats(self.model):
            sharp_loss, _ = self.forward_loss(x, targets)
        self.backward(sharp_loss)
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
        if self.grad_clip:
            self.clip(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return loss.detach(), logits.detach()


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """Train-mode BatchNorm that normalises with the batch's statistics but does not record them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch; None (a cumulative mean) would count the pass
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class CUDAGraphTrainStep(TrainStep):
    """A `TrainStep` captured as one CUDA graph after `warmup` eager steps, then replayed.

    The warm-up steps are real training steps on real batches (they also create the
    optimizer's state and let cuDNN and cuBLAS pick algorithms and workspaces, none of which
    may happen during capture); they run on the side stream the graph is then captured on,
    as torch.cuda.graphs' documentation asks. The batch the graph is captured on is then
    trained on by the first replay, so no batch is skipped or repeated: the weights follow the
    same sequence of updates as the eager step's.

    Args:
        warmup: eager steps before the capture (at least 1: Adam's state must exist before
            it, or the graph would record its zero-initialisation and replay it every step).
        strict: re-raise a failed capture. When false the step warns and trains eagerly from
            then on (a failed capture has run nothing, so no update is lost or doubled).
    """

    def __init__(self, *args, warmup: int = 3, strict: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 eager step before the capture, got {warmup}")
        self.warmup, self.strict = warmup, strict
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: BaseException | None = None  # the capture's error, once it has fallen back to eager
        self.eager_steps = 0
        self.stream = torch.cuda.Stream(device=self._device())
        # One fp32 device scalar per param group: the captured optimizer step reads the
        # learning rate from here, so the schedule keeps working after capture.
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=self._device())
                    for g in optimizer_param_groups(self.optimizer)]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _load_lr(self) -> None:
        for t, g in zip(self.lrs, optimizer_param_groups(self.optimizer)):
            t.fill_(float(g["lr"]))  # a kernel launch with the value as argument: no host sync

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.failed is not None:
            return super().__call__(x, targets)
        if self.graph is None:
            if self.eager_steps < self.warmup:
                self.eager_steps += 1
                return self._on_stream(super().__call__, x, targets)
            self._capture(x, targets)
            if self.graph is None:  # the capture failed and strict is off
                return super().__call__(x, targets)
        self._check_batch(x, targets)
        self._load_lr()  # whatever the scheduler set since the last call (one small kernel, no host sync)
        self.static_x.copy_(x)
        self.static_targets.copy_(targets)
        self.graph.replay()
        return self.static_loss, self.static_logits

    def _on_stream(self, fn: Callable, *args):
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream), warnings.catch_warnings():
            # torch warns when a capturable optimizer steps outside a capture: these eager
            # warm-up steps are exactly that, on purpose.
            warnings.filterwarnings("ignore", message=r"This instance was constructed with capturable=True")
            out = fn(*args)
        current.wait_stream(self.stream)
        return out

    def _check_batch(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        # `copy_` would broadcast a 1-image batch over the captured one, or cast another dtype,
        # and the graph would train on that without a word.
        got = (tuple(x.shape), x.dtype, x.stride(), tuple(targets.shape), targets.dtype)
        if got != self.signature:
            raise ValueError(f"a CUDA-graph step replays the batch it was captured with: (images shape, dtype, "
                             f"strides, targets shape, dtype) {self.signature}, got {got}; keep every batch the same "
                             "size (drop the last incomplete one) or train with cuda_graph: false")

    def _capture(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        # Inputs live at fixed addresses the graph reads; clone keeps x's memory format.
        self.static_x, self.static_targets = x.clone(), targets.clone()
        self.signature = (tuple(x.shape), x.dtype, x.stride(), tuple(targets.shape), targets.dtype)
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients it writes
        groups = optimizer_param_groups(self.optimizer)
        floats = [g["lr"] for g in groups]
        self._load_lr()
        for g, t in zip(groups, self.lrs):
            g["lr"] = t  # captured as a pointer to t, not as the number it holds now
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a DataLoader's pin-memory thread may allocate while this thread captures.
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self.static_loss, self.static_logits = self.compute(self.static_x, self.static_targets)
        except Exception as e:
            if self.strict:
                raise
            # Capturing records kernels without running them: the weights, the optimizer's
            # state and BatchNorm's statistics are as the last eager step left them.
            self.optimizer.zero_grad(set_to_none=True)
            self.failed = e
            warnings.warn(f"the training step could not be captured as a CUDA graph ({type(e).__name__}: {e}); "
                          "training on with eager steps", RuntimeWarning, stacklevel=3)
            return
        finally:
            for g, v in zip(groups, floats):  # the scheduler and checkpoints keep seeing floats
                g["lr"] = v
        self.graph = graph


def optimizer_param_groups(optimizer) -> list[dict]:
    """The param groups of a torch optimizer or of Accelerate's wrapper around one."""
    return getattr(optimizer, "optimizer", optimizer).param_groups


def cuda_graph_problems(device: torch.device, optimizer, *, num_processes: int = 1, mixed_precision: str = "no",
                        compile: bool = False, gradient_accumulation_steps: int = 1,
                        variable_batches: bool = False, sam: bool = False) -> list[str]:
    """Why a training step cannot be captured as a CUDA graph here (empty: it can).

    `optimizer` is the built optimizer, or before it exists its config name ("adamw"): a name
    is checked for the optimizer's kind only, not for the `capturable` flag it will be built with.
    """
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
    if variable_batches:
        problems.append("skip_bad without the cache shortens a batch by its unreadable images, and a graph "
                        "replays one batch size")
    if sam:
        problems.append("a SAM step (sam_rho > 0) runs two passes that rvf does not capture; train eagerly")
    # Adam and AdamW are the capturable optimizers whose tensor-lr step rvf tests replayed.
    if isinstance(optimizer, str):
        if optimizer.lower() not in ("adam", "adamw"):
            problems.append(f"the optimizer is {optimizer}; a captured step needs adam or adamw")
        return problems
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        problems.append(f"the optimizer is {type(inner).__name__}; a captured step needs adam or adamw")
    elif not all(g.get("capturable", False) for g in optimizer_param_groups(optimizer)):
        problems.append(f"the optimizer ({type(inner).__name__}) was built without capturable=True")
    return problems


def set_capturable(optimizer, capturable: bool) -> None:
    """Give a loaded optimizer the `capturable` flag this run was built with.

    `load_state_dict` keeps the saved run's param-group flags, so a run saved eagerly and
    resumed with a CUDA graph would refuse the capture (and the other way round would step
    slowly). A capturable or fused step keeps each parameter's step count on its device as
    float32, an eager unfused one on the host.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        if "capturable" not in group:
            continue
        group["capturable"] = capturable
        on_device = capturable or group.get("fused", False)
        for p in group["params"]:
            step = inner.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                inner.state[p]["step"] = (step.to(p.device, torch.float32) if on_device
                                          else step.to("cpu", torch.float32))


def build_train_step(model: nn.Module, criterion: Callable, optimizer, *, cuda_graph: bool = False,
                     sam_rho: float = 0.0, **kwargs) -> TrainStep:
    """An eager `TrainStep`, a `SAMTrainStep` when `sam_rho` > 0, or a `CUDAGraphTrainStep` when `cuda_graph`."""
    if sam_rho and cuda_graph:
        raise ValueError("a SAM step (sam_rho > 0) is not captured as a CUDA graph; build it with cuda_graph=False")
    if sam_rho:
        return SAMTrainStep(model, criterion, optimizer, rho=sam_rho, **kwargs)
    return (CUDAGraphTrainStep if cuda_graph else TrainStep)(model, criterion, optimizer, **kwargs)
