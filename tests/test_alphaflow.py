"""AlphaFlow: the α schedule, the finite-step target against an independent formula and
a closed-form flow, its limits (α = 1 is flow matching on the pairs, α -> 0 is MeanFlow's
target, α = 0 is MeanFlow's JVP loss), the step count that resume needs, and the config."""

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem, make_base_item
from losses.alphaflow_loss import AlphaFlowLoss, scheduled_alpha
from losses.base_loss import build_loss
from losses.meanflow_loss import MeanFlowLoss
from losses.time_sampling import AlphaflowPairSampler
from models.flow_matching.mlp import MLP
from models.unified_input import make_unified_flow_matching_input, split_unified_input, straight_path
from solvers.sampling import DiagonalSampler, JumpSampler
from tests.conftest import compose_train

JAX_LAW = {"name": "meanflow_jax", "ratio": 0.5, "mean": -0.4, "std": 1.0}


def reference_sigmoid(k: float, total: float, gamma: float = 25.0) -> float:
    """1 - σ(γ (k/T - 1/2)): the reference's sigmoid from 1 to 0 over [0, T], written out."""
    return 1.0 - 1.0 / (1.0 + math.exp(-gamma * (k / total - 0.5)))


def test_sigmoid_schedule_and_its_snaps() -> None:
    total, clamp = 1000, 0.005
    for k in (300, 400, 500, 600, 700):
        assert scheduled_alpha(k, "sigmoid", 1.0, 0.0, 0, total, 25.0, clamp) == pytest.approx(reference_sigmoid(k, total), rel=1e-12)
    assert scheduled_alpha(500, "sigmoid", 1.0, 0.0, 0, total, 25.0, clamp) == 0.5
    # the ends snap to exactly 1 (no extra forward) and exactly 0 (MeanFlow's JVP)
    assert scheduled_alpha(0, "sigmoid", 1.0, 0.0, 0, total, 25.0, clamp) == 1.0
    assert scheduled_alpha(250, "sigmoid", 1.0, 0.0, 0, total, 25.0, clamp) == 1.0  # 1 - σ(-6.25) > 0.995
    assert scheduled_alpha(750, "sigmoid", 1.0, 0.0, 0, total, 25.0, clamp) == 0.0  # σ(6.25) > 0.995
    assert scheduled_alpha(5000, "sigmoid", 1.0, 0.0, 0, total, 25.0, clamp) == 0.0
    # without the snap the curve only approaches the ends
    assert 0.0 < scheduled_alpha(750, "sigmoid", 1.0, 0.0, 0, total, 25.0, 0.0) < clamp
    # a late start holds α until then; linear and constant schedules
    assert scheduled_alpha(100, "sigmoid", 1.0, 0.0, 200, 1200, 25.0, clamp) == 1.0
    assert scheduled_alpha(700, "sigmoid", 1.0, 0.0, 200, 1200, 25.0, clamp) == 0.5
    assert scheduled_alpha(250, "linear", 1.0, 0.0, 0, total, 25.0, clamp) == 0.75
    assert scheduled_alpha(999_999, "constant", 0.3, 0.0, 0, total, 25.0, clamp) == 0.3


def test_pair_sampler_has_the_reference_layout() -> None:
    """The first int(n (1 - ratio)) rows are s = t from one draw, drawn first; the rest
    (max, min) of two draws, all in the paper's convention (noise at 1)."""
    sampler = AlphaflowPairSampler(ratio=0.75, mean=-0.4, std=1.0, fm_mean=0.3, fm_std=0.7)
    torch.manual_seed(5)
    s, t = sampler.sample(10, torch.device("cpu"))
    torch.manual_seed(5)
    t_fm = torch.sigmoid(torch.randn(2) * 0.7 + 0.3)
    a, b = torch.sigmoid(torch.randn(8) * 1.0 - 0.4), torch.sigmoid(torch.randn(8) * 1.0 - 0.4)
    assert torch.equal(s[:2], 1 - t_fm) and torch.equal(t[:2], 1 - t_fm)
    assert torch.equal(s[2:], 1 - torch.maximum(a, b)) and torch.equal(t[2:], 1 - torch.minimum(a, b))
    assert bool((s[2:] < t[2:]).all())


class Counting(nn.Module):
    """Counts forward passes of the wrapped model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls, self.num_classes = model, 0, model.num_classes

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls += 1
        return self.model(z, y)


def make_batch(n: int = 32, dim: int = 2, seed: int = 0) -> BaseItem:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, dim, generator=g) * 2
    return make_base_item(x1, torch.randn(n, dim, generator=g), torch.rand(n, generator=g))


def draws(loss_fn: AlphaFlowLoss, batch: BaseItem, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss's (s, t), x_s and v for ``seed``, drawn the way its forward draws them."""
    torch.manual_seed(seed)
    s, t = loss_fn.pair_sampler.sample(len(batch), torch.device("cpu"))
    x0, x1 = batch.raw_source, batch.raw_target
    return s, t, straight_path(x0, x1, s), x1 - x0


def weighted(err: Tensor, numerator: Tensor, eps: float) -> Tensor:
    return (numerator * err / (err + eps)).mean()


def test_alpha_one_is_flow_matching_on_the_pairs() -> None:
    """α = 1: every pair regresses u(x_s, s, t) on v with weight 1 and no extra forward
    (trajectory flow matching)."""
    torch.manual_seed(0)
    model = Counting(MLP(data_dim=2, hidden=16, depth=2))
    batch, loss_fn = make_batch(), AlphaFlowLoss(alpha_schedule="constant", alpha_start=1.0)
    torch.manual_seed(7)
    loss = loss_fn(model, batch)
    assert model.calls == 1
    s, t, x_s, v = draws(loss_fn, batch, 7)
    with torch.no_grad():
        err = (model.model(make_unified_flow_matching_input(x_s, s, t)) - v).pow(2).mean(dim=1)
    assert torch.allclose(loss.detach(), weighted(err, torch.ones_like(err), 1e-3), rtol=1e-6)


def test_intermediate_alpha_against_an_independent_computation() -> None:
    """0 < α < 1: pairs with s != t take α v + (1 - α) u(x_s + α(t - s) v, s + α(t - s), t)
    with weight α, pairs with s = t take v with weight 1 (one extra forward, on the
    distinct pairs only)."""
    torch.manual_seed(0)
    net = MLP(data_dim=2, hidden=16, depth=2)
    model = Counting(net)
    alpha = 0.3
    batch, loss_fn = make_batch(), AlphaFlowLoss(alpha_schedule="constant", alpha_start=alpha)
    torch.manual_seed(7)
    loss = loss_fn(model, batch)
    assert model.calls == 2
    s, t, x_s, v = draws(loss_fn, batch, 7)
    distinct = s != t
    assert int(distinct.sum()) == 16  # ratio 0.5
    with torch.no_grad():
        dt = alpha * (t - s)
        u_next = net(make_unified_flow_matching_input(x_s + dt[:, None] * v, s + dt, t))
        # the reference's form of the same target: (dt v + (t - s - dt) u_next) / (t - s)
        target = (dt[:, None] * v + (t - s - dt)[:, None] * u_next) / torch.where(distinct, t - s, 1.0)[:, None]
        target = torch.where(distinct[:, None], target, v)
        err = (net(make_unified_flow_matching_input(x_s, s, t)) - target).pow(2).mean(dim=1)
    numerator = torch.where(distinct, alpha, 1.0)
    assert torch.allclose(loss.detach(), weighted(err, numerator, 1e-3), rtol=1e-5)


def test_alpha_zero_is_meanflow_with_the_jvp() -> None:
    """α = 0 (the schedule past its snap): MeanFlow's JVP target on every pair. The
    dimension-averaged error with eps equals MeanFlow's summed one with D eps."""
    batch = make_batch()
    torch.manual_seed(123)
    model = MLP(data_dim=2, hidden=32, depth=3)
    loss_fn = AlphaFlowLoss(time=JAX_LAW, alpha_end_step=10, eps=1e-3)
    loss_fn.step.fill_(10)
    assert loss_fn.alpha() == 0.0
    torch.manual_seed(3)
    loss_a = loss_fn(model, batch)
    grads_a = torch.autograd.grad(loss_a, list(model.parameters()))
    torch.manual_seed(3)
    loss_b = MeanFlowLoss(time=JAX_LAW, p=1.0, eps=2 * 1e-3)(model, batch)
    grads_b = torch.autograd.grad(loss_b, list(model.parameters()))
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-7)


def test_small_alpha_target_tends_to_meanflows() -> None:
    """(u_tgt - u)/α + u -> v + (t - s) du/ds (MeanFlow's target, by its JVP) with an
    error that shrinks in proportion to α (float64)."""
    torch.manual_seed(0)
    model = MLP(data_dim=3, hidden=32, depth=3, time_embed_dim=8).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    s = torch.rand(8, dtype=torch.float64) * 0.5
    t = s + 0.1 + torch.rand(8, dtype=torch.float64) * 0.4
    v = torch.randn_like(x)
    u, meanflow = MeanFlowLoss(p=0.0).prediction_and_target(model, x, s, t, v, None)
    loss_fn = AlphaFlowLoss()
    errors = []
    for alpha in (1e-2, 1e-3, 1e-4):
        target = loss_fn.finite_step_target(model, x, s, t, v, None, alpha)
        normalised = (target - u.detach()) / alpha + u.detach()
        errors.append(((normalised - meanflow).norm() / meanflow.norm()).item())
    assert errors[0] < 0.05
    for coarse, fine in itertools.pairwise(errors):
        assert 7 < coarse / fine < 13, errors  # first order in α


class ExactGaussianFlow(nn.Module):
    """The exact mean velocity for data N(mu, sigma^2 I), noise N(0, I) (tests/test_meanflow.py):
    psi_{s->t}(x) = t mu + k(t)/k(s) (x - s mu), k^2 = (1 - t)^2 + t^2 sigma^2."""

    num_classes = 0

    def __init__(self, mu: float, sigma: float) -> None:
        super().__init__()
        self.mu, self.sigma = mu, sigma

    def k(self, t: Tensor) -> Tensor:
        return torch.sqrt((1 - t) ** 2 + t**2 * self.sigma**2)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        dk = (-(1 - t) + t * self.sigma**2) / self.k(t)
        return self.mu + (dk / self.k(t))[:, None] * (x - t[:, None] * self.mu)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        x, s, t = split_unified_input(z)
        psi = t[:, None] * self.mu + (self.k(t) / self.k(s))[:, None] * (x - s[:, None] * self.mu)
        return (psi - x) / (t - s)[:, None]


@pytest.mark.parametrize("alpha", [0.9, 0.5, 0.1])
def test_point_mass_data_makes_the_finite_step_exact(alpha: float) -> None:
    """Data at one point: every trajectory is a straight line at constant speed, so the
    Euler step along the marginal velocity lands on the flow and the target is the exact
    mean velocity itself, for every α."""
    model = ExactGaussianFlow(mu=1.5, sigma=0.0)
    x = torch.randn(32, 2, dtype=torch.float64)
    s = torch.rand(32, dtype=torch.float64) * 0.5
    t = s + 0.05 + torch.rand(32, dtype=torch.float64) * 0.4
    u = model(make_unified_flow_matching_input(x, s, t))
    target = AlphaFlowLoss().finite_step_target(model, x, s, t, model.velocity(x, s), None, alpha)
    assert torch.allclose(target, u, atol=1e-12)


def test_closed_form_flow_defect_is_second_order_in_alpha() -> None:
    """With curved trajectories (sigma > 0) the target misses the exact u by O((α h)²):
    the defect over α shrinks linearly, so the α -> 0 fixed point is the exact flow."""
    model = ExactGaussianFlow(mu=1.5, sigma=0.3)
    torch.manual_seed(1)
    x = torch.randn(64, 2, dtype=torch.float64)
    s = torch.rand(64, dtype=torch.float64) * 0.45
    t = s + 0.05 + torch.rand(64, dtype=torch.float64) * 0.5
    u = model(make_unified_flow_matching_input(x, s, t))
    loss_fn = AlphaFlowLoss()
    defects = [((loss_fn.finite_step_target(model, x, s, t, model.velocity(x, s), None, a) - u).norm() / a).item()
               for a in (0.1, 0.01, 0.001)]
    for coarse, fine in itertools.pairwise(defects):
        assert 7 < coarse / fine < 13, defects


def test_step_counts_training_forwards_and_resumes_exactly() -> None:
    """The step buffer advances once per training-mode forward (not in eval mode, not in
    the start-up probe), and a loss restored from ``state_dict()`` continues the schedule."""
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=16, depth=2)
    loss_fn = AlphaFlowLoss(alpha_end_step=20)
    loss_fn.check_model(model, make_batch())
    assert int(loss_fn.step) == 0
    for _ in range(11):
        loss_fn(model, make_batch())
    model.eval()
    loss_fn(model, make_batch())
    model.train()
    assert int(loss_fn.step) == 11 and 0 < loss_fn.alpha() < 0.5
    restored = AlphaFlowLoss(alpha_end_step=20)
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.alpha() == loss_fn.alpha()
    torch.manual_seed(9)
    a = loss_fn(model, make_batch())
    torch.manual_seed(9)
    b = restored(model, make_batch())
    assert torch.equal(a, b) and int(restored.step) == 12


def test_check_model_leaves_the_rng_alone() -> None:
    model = MLP(data_dim=2, hidden=16, depth=2)
    torch.manual_seed(4)
    AlphaFlowLoss().check_model(model, make_batch())
    after = torch.rand(3)
    torch.manual_seed(4)
    assert torch.equal(after, torch.rand(3))


def test_clamp_target_clips_the_finite_step_target() -> None:
    model = ExactGaussianFlow(mu=50.0, sigma=0.0)
    x = torch.zeros(4, 2, dtype=torch.float64)
    s, t = torch.full((4,), 0.1, dtype=torch.float64), torch.full((4,), 0.6, dtype=torch.float64)
    target = AlphaFlowLoss(clamp_target=4.0).finite_step_target(model, x, s, t, model.velocity(x, s), None, 0.5)
    assert torch.equal(target, torch.full_like(target, 4.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha_schedule": "cosine"}, "alpha_schedule"),
        ({"alpha_start": 1.5}, "alpha_start"),
        ({"alpha_start_step": 10, "alpha_end_step": 10}, "alpha_end_step"),
        ({"alpha_clamp": 0.6}, "alpha_clamp"),
        ({"clamp_target": 0.0}, "clamp_target"),
        ({"time": {"name": "alphaflow", "ratio": 1.5}}, "ratio"),
        ({"time": {"name": "alphaflow", "r_mean": 0.0}}, "unknown"),
        ({"time": {"name": "nope"}}, "nope"),
        ({"cfg_omega": 2.0}, "unconditional"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        AlphaFlowLoss(**kwargs)
    assert "\n" not in str(info.value)


def test_config_builds_and_runs_through_the_schedule() -> None:
    cfg = compose_train(["loss=alphaflow", "loss.alpha_end_step=6"])
    loss_fn = build_loss(cfg.loss)
    assert isinstance(loss_fn, AlphaFlowLoss) and isinstance(loss_fn.pair_sampler, AlphaflowPairSampler)
    assert loss_fn.eps == 1e-3
    samplers = loss_fn.samplers(cfg.eval, cfg.solver, cfg.model.num_classes)
    assert sorted(sm.steps for sm in samplers.values() if isinstance(sm, JumpSampler)) == sorted(cfg.eval.meanflow_steps)
    assert [sm.fid for sm in samplers.values() if isinstance(sm, DiagonalSampler)] == [False]
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=16, depth=2)
    seen = []
    for _ in range(8):  # α from 1 through the finite-step phase to the JVP
        loss = loss_fn(model, make_batch())
        loss.backward()
        seen.append(float(loss_fn.metrics["alpha"]))
        assert torch.isfinite(loss)
    assert seen[0] == 1.0 and seen[-1] == 0.0 and any(0 < a < 1 for a in seen)


def test_half_precision_autocast_leaves_the_target_in_fp32() -> None:
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=32, depth=2)
    seen: list[torch.dtype] = []
    model.out.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = AlphaFlowLoss(alpha_schedule="constant", alpha_start=0.5)(model, make_batch())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert len(seen) == 2 and all(d == torch.float32 for d in seen), seen  # the extra forward and the prediction


@pytest.mark.parametrize("alpha", [0.5, 0.0])
def test_augment_labels_reach_the_model(alpha: float) -> None:
    """EDM augment labels go to the extra forward, the JVP and the prediction, as MeanFlow's."""
    from dataloaders.augment import AugmentPipe
    from dataloaders.base_dataloaders import DictDatasetAdapter, TensorTargetDataset
    from models.unet.unet import UNet

    torch.manual_seed(0)
    model = UNet(in_channels=3, image_size=8, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                 attention_resolutions=[], dropout=0.0, augment_dim=6)
    with torch.no_grad():  # off the zero-output init, where no gradient reaches the embeddings
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    adapter = DictDatasetAdapter(TensorTargetDataset(torch.rand(64, 3, 8, 8) * 2 - 1), augment=AugmentPipe.meanflow_cifar10(p=1.0))
    batch = adapter.__getitems__(list(range(8)))
    loss_fn = AlphaFlowLoss(alpha_schedule="constant", alpha_start=alpha, jvp_mode="fused")
    loss_fn.check(model, batch)
    loss_fn(model, batch).backward()
    assert model.augment_embed.weight.grad.abs().sum() > 0
