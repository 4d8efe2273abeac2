"""The training step: eager, or captured as a CUDA graph (the graph tests need a GPU)."""

import copy

import pytest
import torch
from torch import nn

from rvf.config import ConfigError, TrainConfig
from rvf.step import CUDAGraphTrainStep, TrainStep, cuda_graph_problems
from rvf.train import build_optimizer, build_scheduler, train
from synth import make_folder_dataset

CUDA = torch.cuda.is_available()


def _net() -> nn.Module:
    # BatchNorm (buffers updated in place by the graph) and an auxiliary-free head; no dropout,
    # whose random masks a replayed graph draws differently from eager code.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(128, 2))


def _batches(n: int, device, size: int = 16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, size, size, generator=g).to(device), torch.randint(0, 2, (8,), generator=g).to(device))
            for _ in range(n)]


def test_cuda_graph_problems_name_each_reason():
    model = _net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    problems = cuda_graph_problems(torch.device("cpu"), sgd, num_processes=2, mixed_precision="fp16",
                                   compile=True, gradient_accumulation_steps=4)
    text = "; ".join(problems)
    for needle in ("CUDA device", "one process", "fp16", "compile", "accumulation", "SGD"):
        assert needle in text, (needle, text)
    assert len(problems) == 6


def test_build_optimizer_makes_adam_capturable_only_when_asked():
    cfg = TrainConfig(model="lenet", optimizer="adamw", fused_optimizer=False)
    model = _net()
    assert all(g["capturable"] for g in build_optimizer(cfg, model, capturable=True).param_groups)
    assert not any(g["capturable"] for g in build_optimizer(cfg, model).param_groups)
    # An optimizer without the option is built as usual, and then named as the obstacle.
    sgd = build_optimizer(TrainConfig(model="lenet", optimizer="sgd", fused_optimizer=False), model, capturable=True)
    assert "not capturable" in " ".join(cuda_graph_problems(torch.device("cuda"), sgd))


def test_eager_step_trains_and_clears_gradients():
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = TrainStep(model, nn.CrossEntropyLoss(), opt, grad_clip=1.0)
    losses = [step(x, y)[0].item() for x, y in _batches(1, "cpu") * 30]
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in model.parameters())


def test_cuda_graph_true_off_cuda_is_one_clear_config_error(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=8, size=32)
    cfg = TrainConfig(model="lenet", data_dir=str(data), output_dir=str(tmp_path / "run"), image_size=32, epochs=1,
                      batch_size=4, holdout=0.25, tracker="none", cache_dir=str(tmp_path / "cache"), cuda_graph=True)
    if CUDA:
        pytest.skip("this machine has CUDA: the graph is allowed here")
    with pytest.raises(ConfigError, match=r"cuda_graph: true.*CUDA device"):
        train(cfg)
    # None means "wherever it can be": on a CPU the run trains eagerly and says so.
    metrics = train(cfg.replace(cuda_graph=None), overwrite=True)
    assert metrics["cuda_graph"] is False and metrics["valid"]["n"] == 16


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_graph_replays_the_eager_steps_exactly(optimizer):
    """Same initial weights, batches and schedule: the graphed step follows the eager one."""
    device = torch.device("cuda")
    cfg = TrainConfig(model="lenet", optimizer=optimizer, lr=1e-2, weight_decay=0.01, scheduler="cosine",
                      warmup_epochs=1, epochs=3, grad_clip=1.0)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    runs = {}
    for graphed in (False, True):
        model = copy.deepcopy(_net()).to(device)
        opt = build_optimizer(cfg, model, capturable=graphed)
        sched = build_scheduler(cfg, opt, steps_per_epoch=4)
        step = (CUDAGraphTrainStep if graphed else TrainStep)(model, nn.CrossEntropyLoss(), opt, grad_clip=cfg.grad_clip)
        losses = []
        for x, y in _batches(12, device):
            loss, logits = step(x, y)
            losses.append(loss.clone())
            sched.step()
            step.lr_changed()
        torch.cuda.synchronize()
        runs[graphed] = (torch.stack(losses).cpu(), [p.detach().cpu() for p in model.state_dict().values()])
        if graphed:
            assert step.graph is not None and step.eager_steps == step.warmup
    (l0, w0), (l1, w1) = runs[False], runs[True]
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_train_with_cuda_graph_learns(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=24, size=32)
    cfg = TrainConfig(model="lenet", data_dir=str(data), output_dir=str(tmp_path / "run"), image_size=32, epochs=6,
                      batch_size=8, lr=1e-3, holdout=0.25, tracker="none", cache_dir=str(tmp_path / "cache"),
                      cuda_graph=True, mixed_precision="bf16")
    metrics = train(cfg)
    assert metrics["cuda_graph"] is True
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
