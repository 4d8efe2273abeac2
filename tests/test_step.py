"""The training step: eager, or captured as a CUDA graph (the graph tests need a GPU)."""

import copy

import pytest
import torch
from synth import make_folder_dataset
from torch import nn

from rvf.config import ConfigError, TrainConfig
from rvf.step import CUDAGraphTrainStep, SAMTrainStep, TrainStep, build_train_step, cuda_graph_problems, set_capturable
from rvf.train import build_optimizer, build_scheduler, train, wants_cuda_graph

CUDA = torch.cuda.is_available()


def _net() -> nn.Module:
    # BatchNorm (buffers updated in place by the graph) and an auxiliary-free head; no dropout,
    # whose random masks a replayed graph draws differently from eager code. The conv has no
    # bias, as before any BatchNorm: BN cancels it, so its gradient is round-off (~5e-8) that
    # Adam scales up to lr-sized steps of arbitrary sign, and no two Adam implementations (the
    # eager foreach step and the capturable one) agree on it (seen on an H200: 8e-3 apart).
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 2))


def _batches(n: int, device, size: int = 16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, size, size, generator=g).to(device), torch.randint(0, 2, (8,), generator=g).to(device))
            for _ in range(n)]


def test_cuda_graph_problems_name_each_reason():
    model = _net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    problems = cuda_graph_problems(torch.device("cpu"), sgd, num_processes=2, mixed_precision="fp16",
                                   compile=True, gradient_accumulation_steps=4, variable_batches=True)
    text = "; ".join(problems)
    for needle in ("CUDA device", "one process", "fp16", "compile", "accumulation", "skip_bad", "SGD"):
        assert needle in text, (needle, text)
    assert len(problems) == 7
    # Capturable optimizers other than the two whose replay is tested are named too.
    rms = torch.optim.RMSprop(model.parameters(), lr=0.1, capturable=True)
    assert cuda_graph_problems(torch.device("cuda"), rms) == [
        "the optimizer is RMSprop; a captured step needs adam or adamw"]
    # Before the optimizer exists, its config name is checked for its kind only.
    assert cuda_graph_problems(torch.device("cuda"), "AdamW") == []
    assert cuda_graph_problems(torch.device("cuda"), "sgd") == [
        "the optimizer is sgd; a captured step needs adam or adamw"]


def test_cuda_graph_null_asks_for_a_graph_only_where_one_can_be_captured():
    """The default (null) builds for a graph on one CUDA process with bf16/fp32 Adam(W) and no
    torch.compile; anything else keeps the eager optimizer. `true` always asks, so that the
    capture's problems are named as an error rather than skipped."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only compared, never allocated on

    def wants(device=cuda, processes=1, precision="bf16", **kw):
        return wants_cuda_graph(TrainConfig(model="lenet", **kw), device, processes, precision)

    assert TrainConfig(model="lenet").cuda_graph is None
    assert wants() and wants(precision="no") and wants(optimizer="Adam")
    assert not wants(device=cpu) and not wants(processes=2) and not wants(cuda_graph=False)
    assert not wants(precision="fp16") and not wants(compile=True) and not wants(optimizer="sgd")
    assert not wants(skip_bad=True, cache=False) and wants(skip_bad=True)
    assert wants(cuda_graph=True, optimizer="sgd") and not wants(cuda_graph=True, device=cpu)


def test_build_optimizer_makes_adam_capturable_only_when_asked():
    cfg = TrainConfig(model="lenet", optimizer="adamw", fused_optimizer=False)
    model = _net()
    assert all(g["capturable"] for g in build_optimizer(cfg, model, capturable=True).param_groups)
    assert not any(g["capturable"] for g in build_optimizer(cfg, model).param_groups)
    # An optimizer without the option is built as usual, and then named as the obstacle.
    sgd = build_optimizer(TrainConfig(model="lenet", optimizer="sgd", fused_optimizer=False), model, capturable=True)
    assert "needs adam or adamw" in " ".join(cuda_graph_problems(torch.device("cuda"), sgd))
    eager = build_optimizer(cfg, model)
    assert cuda_graph_problems(torch.device("cuda"), eager) == [
        "the optimizer (AdamW) was built without capturable=True"]


def test_a_resumed_optimizer_takes_this_runs_capturable_flag():
    """load_state_dict keeps the saved run's flags: an eager run resumed with a graph would
    refuse the capture, unless `set_capturable` re-applies this run's."""
    model = _net()
    cfg = TrainConfig(model="lenet", optimizer="adam", fused_optimizer=False)
    saved = build_optimizer(cfg, model)  # an eager run
    x, y = _batches(1, "cpu")[0]
    nn.functional.cross_entropy(model(x), y).backward()
    saved.step()
    resumed = build_optimizer(cfg, model, capturable=True)
    resumed.load_state_dict(saved.state_dict())
    assert not any(g["capturable"] for g in resumed.param_groups)  # what torch does
    set_capturable(resumed, True)
    assert all(g["capturable"] for g in resumed.param_groups)
    steps = [resumed.state[p]["step"] for p in model.parameters()]
    assert all(s.dtype == torch.float32 and s.device == p.device and s.item() == 1
               for s, p in zip(steps, model.parameters()))
    set_capturable(resumed, False)
    assert not any(g["capturable"] for g in resumed.param_groups)


def test_graph_step_needs_a_warmup_step():
    # Without an eager step first, Adam's state would be created (zeroed) inside the graph,
    # and every replay would zero it again.
    model = _net()
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        CUDAGraphTrainStep(model, nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters()), warmup=0)


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
    assert not (tmp_path / "cache").exists()  # refused before any image was decoded
    # None means "wherever it can be": on a CPU the run trains eagerly and says so.
    metrics = train(cfg.replace(cuda_graph=None), overwrite=True)
    assert metrics["cuda_graph"] is False and metrics["valid"]["n"] == 16


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("optimizer,fused,bf16", [("adam", True, False), ("adamw", True, False),
                                                  ("adamw", False, False), ("adamw", True, True)])
def test_graph_replays_the_eager_steps_exactly(optimizer, fused, bf16):
    """Same initial weights, batches and schedule: the graphed step follows the eager one.

    fused=False takes Adam's foreach capturable path; bf16 adds autocast (its weight-cast cache
    off, as training sets it) and channels_last batches, as training runs on a GPU.
    """
    device = torch.device("cuda")
    cfg = TrainConfig(model="lenet", optimizer=optimizer, lr=1e-2, weight_decay=0.01, scheduler="cosine",
                      warmup_epochs=1, epochs=3, grad_clip=1.0, fused_optimizer=fused)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if bf16 else None
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    runs = {}
    for graphed in (False, True):
        model = copy.deepcopy(_net()).to(device, memory_format=fmt)
        opt = build_optimizer(cfg, model, capturable=graphed)
        sched = build_scheduler(cfg, opt, steps_per_epoch=4)
        step = (CUDAGraphTrainStep if graphed else TrainStep)(model, nn.CrossEntropyLoss(), opt,
                                                               grad_clip=cfg.grad_clip, autocast=autocast)
        losses = []
        for x, y in _batches(12, device):
            loss, logits = step(x.contiguous(memory_format=fmt), y)
            losses.append(loss.clone())
            sched.step()  # the graphed step must pick the new lr up by itself
        torch.cuda.synchronize()
        runs[graphed] = (torch.stack(losses).float().cpu(), [p.detach().cpu() for p in model.state_dict().values()])
        if graphed:
            assert step.graph is not None and step.eager_steps == step.warmup and step.failed is None
            # A batch of another size would be broadcast into the captured one: refused instead.
            with pytest.raises(ValueError, match="replays the batch it was captured with"):
                step(x[:1].contiguous(memory_format=fmt), y[:1])
    (l0, w0), (l1, w1) = runs[False], runs[True]
    tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(l1, l0, **tol)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b.float(), a.float(), **tol)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_train_with_cuda_graph_matches_eager_training(tmp_path):
    """The whole loop (Accelerate's wrappers, the device-resident split, the schedule, the EMA-free
    best-epoch pick) gives the same run with the step graphed as without, in fp32."""
    data = make_folder_dataset(tmp_path / "data", n=24, size=32)
    base = TrainConfig(model="lenet", data_dir=str(data), image_size=32, epochs=6, batch_size=8, lr=1e-3,
                       holdout=0.25, tracker="none", cache_dir=str(tmp_path / "cache"), mixed_precision="no")
    runs = {graphed: train(base.replace(output_dir=str(tmp_path / f"run-{graphed}"), cuda_graph=graphed))
            for graphed in (False, True)}
    assert runs[True]["cuda_graph"] is True and runs[False]["cuda_graph"] is False
    for key in ("train_loss", "holdout_loss"):
        eager = torch.tensor([h[key] for h in runs[False]["history"]])
        graphed = torch.tensor([h[key] for h in runs[True]["history"]])
        torch.testing.assert_close(graphed, eager, rtol=5e-3, atol=1e-4, msg=lambda m: f"{key}: {m}")
    assert runs[True]["history"][-1]["train_loss"] < runs[True]["history"][0]["train_loss"]


# --- SAM ---------------------------------------------------------------------------------


def test_sam_step_descends_with_the_gradient_at_the_perturbed_weights():
    """One SAM step with plain SGD, against the paper's update written out by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    rho, lr = 0.05, 0.1

    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    g = torch.autograd.grad(nn.functional.cross_entropy(ref(x), y), params)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(gi * rho / norm)
    g_sharp = torch.autograd.grad(nn.functional.cross_entropy(ref(x), y), params)
    expected = [p0 - lr * gs for p0, gs in zip(model.parameters(), g_sharp)]

    step = build_train_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=lr), sam_rho=rho)
    assert isinstance(step, SAMTrainStep)
    loss, logits = step(x, y)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e.detach())
    # What the loop reports is the loss at the weights being trained, not at the perturbed ones.
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, y))
    assert all(p.grad is None for p in model.parameters())
    # ...and the update is not a plain step's: the gradients at the two points differ.
    assert not all(torch.allclose(a, b) for a, b in zip(g, g_sharp))


def test_sam_step_records_batchnorm_statistics_once():
    model, twin = _net(), _net()
    x, y = _batches(1, "cpu")[0]
    step = SAMTrainStep(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    step(x, y)
    twin.train()(x)  # one forward at the same starting weights: what one step should record
    bn, twin_bn = model[1], twin[1]
    torch.testing.assert_close(bn.running_mean, twin_bn.running_mean)
    torch.testing.assert_close(bn.running_var, twin_bn.running_var)
    assert bn.num_batches_tracked.item() == 1 and bn.momentum == twin_bn.momentum


class _RecordingOptimizer:
    """Steps nothing; records the weights and gradients it was asked to step with."""

    def __init__(self, params):
        self.params = list(params)
        self.seen = None

    def step(self):
        self.seen = [p.detach().clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_sam_step_perturbs_nothing_when_the_gradient_overflows():
    """Under fp16 an overflowing loss scale gives inf gradients; the scaler then skips the step.
    The perturbation must not write NaN into the weights meanwhile."""
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _RecordingOptimizer(model.parameters())
    step = SAMTrainStep(model, nn.CrossEntropyLoss(), opt, rho=0.05,
                        backward=lambda loss: (loss * float("inf")).backward())
    x, y = _batches(1, "cpu")[0]
    step(x, y)
    for p, b in zip(opt.seen, before):
        torch.testing.assert_close(p, b)


def test_sam_is_an_eager_step_with_a_radius():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert type(build_train_step(model, nn.CrossEntropyLoss(), opt)) is TrainStep
    with pytest.raises(ValueError, match="not captured as a CUDA graph"):
        build_train_step(model, nn.CrossEntropyLoss(), opt, sam_rho=0.05, cuda_graph=True)
    with pytest.raises(ValueError, match="rho > 0"):
        SAMTrainStep(model, nn.CrossEntropyLoss(), opt, rho=0.0)
    adam = torch.optim.Adam(model.parameters(), capturable=True)
    assert "SAM" in " ".join(cuda_graph_problems(torch.device("cuda"), adam, sam=True))
    cfg = TrainConfig(model="lenet", sam_rho=0.05)
    assert not wants_cuda_graph(cfg, torch.device("cuda"), 1, "bf16")


def test_train_with_sam(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=8, size=32)
    cfg = TrainConfig(model="lenet", data_dir=str(data), output_dir=str(tmp_path / "run"), image_size=32, epochs=2,
                      batch_size=4, holdout=0.25, tracker="none", cache_dir=str(tmp_path / "cache"), sam_rho=0.05)
    with pytest.raises(ConfigError, match="sam_rho"):
        train(cfg.replace(sam_rho=-0.1))
    metrics = train(cfg)
    assert metrics["cuda_graph"] is False and metrics["valid"]["n"] == 16
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in metrics["history"])
    # Asked for outright, a graph is refused with SAM named among the reasons.
    with pytest.raises(ConfigError, match=r"cuda_graph: true.*SAM step"):
        train(cfg.replace(cuda_graph=True), overwrite=True)
