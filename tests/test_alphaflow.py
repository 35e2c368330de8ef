"""AlphaFlow: the α schedule, the finite-step target against an independent formula and
a closed-form flow, its limits (α = 1 is flow matching on the pairs, α -> 0 is MeanFlow's
target, α = 0 is MeanFlow's JVP loss), the step count that resume needs, and the config."""

import itertools
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem, make_base_item
from losses.alphaflow_loss import AlphaFlowLoss, scheduled_alpha
from losses.base_loss import build_loss
from losses.meanflow_loss import MeanFlowLoss
from losses.time_sampling import AlphaflowPairSampler
from models.flow_matching.mlp import MLP
from models.unified_input import make_unified_flow_matching_input, split_unified_input, straight_path
from solvers.sampling import DiagonalSampler, JumpSampler
from tests.conftest import compose_train, labelled_batch, relative

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


# --- snap-research/alphaflow src/training/loss.py, transcribed in float64 ------------------

NUM_CLASSES = 4
TOL = 1e-12


class LabelledField(nn.Module):
    """A small class-conditional field of plain layers (the reference's JVP,
    ``torch.autograd.functional.jvp``, differentiates twice)."""

    def __init__(self, dim: int = 3, hidden: int = 16, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.inp, self.mid, self.out = nn.Linear(dim + 2, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, dim)
        self.embed = nn.Embedding(num_classes + 1, hidden)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        _, s, t = split_unified_input(z)
        y = torch.full_like(s, self.num_classes, dtype=torch.long) if y is None else y
        h = torch.tanh(self.inp(z) + self.embed(y)) * (1 + 0.5 * torch.sin(3 * s) * t)[:, None]
        return self.out(torch.tanh(self.mid(h)))


class Cond:
    """The reference's ``cond`` reduced to its label: rows by mask, written in place. Its
    "zero label" (no class) is this project's null class."""

    def __init__(self, label: Tensor) -> None:
        self.label = label

    def __getitem__(self, mask: Tensor) -> "Cond":
        return Cond(self.label[mask])


def reference_net(model: nn.Module):
    """``net(x_t, sigma_next, sigma, cond, ...)`` of the reference (noise at 1): ``s = 1 - sigma``,
    ``t = 1 - sigma_next``, ``u_paper = -u``; ``cond=None`` is every row unconditional."""

    def net(x_t, sigma_next, sigma, cond=None, augment_labels=None, return_extra_output=False):
        label = None if cond is None else cond.label
        out = -model(make_unified_flow_matching_input(x_t, 1 - sigma.flatten(), 1 - sigma_next.flatten()), label)
        return (out, {}) if return_extra_output else out

    return net


def reference_alphaflow_loss(net, x_aug: Tensor, noise_unscaled: Tensor, t: Tensor, t_next: Tensor, dt: Tensor, alpha: float,
                             cond: Cond, drop_u: Tensor, label_dropout: float, omega: float, kappa: float, t_min: float,
                             t_max: float, clamp_utgt: float, eps: float) -> Tensor:
    """AlphaFlowLoss.forward with _compute_velocity_cfg, _compute_mean_velocity_c and _d, given
    the draws (sample_traj_params's t, t_next, dt, alpha; the noise; the label-drop uniform),
    ``sigma_noise = 1``, the per-row loss averaged over the batch."""
    batch_size = x_aug.shape[0]

    def view(a: Tensor) -> Tensor:  # the reference's [b, 1, 1, 1, 1]
        return a.reshape(a.shape[0], *([1] * (x_aug.dim() - 1)))

    @torch.no_grad()
    def _compute_velocity_cfg(velocity, x_t, t, cond, net, batch_size):
        t_flat = t.view(batch_size, -1)
        mask = (t_flat > t_min) & (t_flat < t_max)
        cfg_mask_idx = mask.view(batch_size).bool()
        velocity_cfg = velocity.clone()
        if label_dropout > 0.0:
            label_drop_mask_idx = drop_u < label_dropout
            drop_mask = cfg_mask_idx & label_drop_mask_idx
            cond.label[drop_mask] = NUM_CLASSES
        if 1 - omega - kappa != 0.0:
            videos_u_t_t_uncond = net(x_t, sigma_next=t, sigma=t, cond=None)
        else:
            videos_u_t_t_uncond = torch.zeros_like(x_t)
        if kappa != 0:
            videos_u_t_t_cond = net(x_t, sigma_next=t, sigma=t, cond=cond)
        else:
            videos_u_t_t_cond = torch.zeros_like(x_t)
        guided = omega * velocity + kappa * videos_u_t_t_cond + (1 - omega - kappa) * videos_u_t_t_uncond
        velocity_cfg[cfg_mask_idx] = guided[cfg_mask_idx]
        return velocity_cfg

    @torch.no_grad()
    def _compute_mean_velocity_c(x_t, t_next, t, velocity_cfg, cond, net):
        if x_t.shape[0] == 0:
            return torch.empty((0, *velocity_cfg.shape[1:]), dtype=velocity_cfg.dtype)
        t, t_next = t.flatten(), t_next.flatten()
        mask_mf = ~torch.isclose(t_next, t)
        batch_size_mf = mask_mf.sum().item()
        mean_velocity = velocity_cfg.clone()

        def wrap_net(x_t, t_next, t):
            return net(x_t, sigma_next=t_next, sigma=t, cond=cond[mask_mf])

        x_t_mf, t_mf, t_next_mf, velocity_cfg_mf = x_t[mask_mf], t[mask_mf], t_next[mask_mf], velocity_cfg[mask_mf]
        if batch_size_mf == 0:
            return mean_velocity
        _, videos_dudt_mf = torch.autograd.functional.jvp(
            wrap_net, (x_t_mf, t_next_mf, t_mf), (velocity_cfg_mf, torch.zeros_like(t_next_mf), torch.ones_like(t_mf)))
        mean_velocity[mask_mf] = velocity_cfg_mf - view(t_mf - t_next_mf) * videos_dudt_mf
        return mean_velocity

    @torch.no_grad()
    def _compute_mean_velocity_d(x_t, velocity_cfg, t_next, t, dt, cond, net):
        if x_t.shape[0] == 0:
            return torch.empty((0, *velocity_cfg.shape[1:]), dtype=velocity_cfg.dtype)
        x_t_minus_dt = x_t - view(dt) * velocity_cfg
        if torch.isclose(1 - dt / (t - t_next), torch.zeros_like(t)).all():
            mean_velocity_next = torch.zeros_like(x_t_minus_dt)
        else:
            mean_velocity_next, _ = net(x_t_minus_dt, sigma_next=t_next, sigma=t - dt, cond=cond, return_extra_output=True)
        mean_velocity = (view(dt) * velocity_cfg + view(t - dt - t_next) * mean_velocity_next) / view(t - t_next)
        return torch.clip(mean_velocity, min=-clamp_utgt, max=clamp_utgt)

    x_t = (1 - view(t)) * x_aug + view(t) * noise_unscaled
    velocity = noise_unscaled - x_aug
    velocity_cfg = _compute_velocity_cfg(velocity, x_t, t, cond, net, batch_size)
    mask_c = dt == 0
    mask_d = ~mask_c
    batch_size_c, batch_size_d = mask_c.sum().item(), mask_d.sum().item()
    mean_velocity_c = _compute_mean_velocity_c(x_t[mask_c], t_next[mask_c], t[mask_c], velocity_cfg[mask_c], cond[mask_c], net)
    mean_velocity_d = _compute_mean_velocity_d(x_t[mask_d], velocity_cfg[mask_d], t_next[mask_d], t[mask_d], dt[mask_d],
                                               cond[mask_d], net)
    mean_velocity = torch.cat([mean_velocity_c, mean_velocity_d], dim=0)
    pred_mean_velocity, _ = net(x_t, sigma_next=t_next, sigma=t, cond=cond, return_extra_output=True)
    loss_unscaled = ((pred_mean_velocity - mean_velocity) ** 2).flatten(1).mean(1)
    weight_c = torch.ones(batch_size_c, dtype=x_aug.dtype)
    weight_d = torch.ones(batch_size_d, dtype=x_aug.dtype) * alpha
    weight = torch.cat([weight_c, weight_d], dim=0) / (loss_unscaled.detach() + eps)
    return (weight * loss_unscaled).mean()




GUIDED = {"num_classes": NUM_CLASSES, "class_drop_prob": 0.4, "cfg_omega": 1.5, "cfg_kappa": 0.25, "cfg_interval": [0.2, 0.7]}


@pytest.mark.parametrize("jvp_mode", ["fused", "separate"])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_interval_label_drop_matches_the_reference(alpha: float, jvp_mode: str) -> None:
    """class_drop=alphaflow, guided (ω, κ, an interval), at α = 0 (JVP), 0 < α < 1 and α = 1:
    the loss and every gradient equal the transcription's, labels dropped only inside the
    interval and in place (a dropped row's target is ω v + (1 - ω) u(∅))."""
    n, seed = 32, 2
    torch.manual_seed(3)
    model = LabelledField().double()
    batch = labelled_batch(n, 3, NUM_CLASSES)
    loss_fn = AlphaFlowLoss(**GUIDED, class_drop="alphaflow", alpha_schedule="constant", alpha_start=alpha, jvp_mode=jvp_mode)
    torch.manual_seed(seed)
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    torch.manual_seed(seed)  # the loss's draws, in the reference's order: the pairs, then the label-drop uniform
    s, t = loss_fn.pair_sampler.sample(n, torch.device("cpu"))
    drop_u = torch.rand(n)
    sigma, sigma_next = 1 - s.double(), 1 - t.double()
    fm = s == t
    dt = torch.where(fm, 0.0, alpha * (sigma - sigma_next))
    inside = (s >= 0.2) & (s <= 0.7)
    wanted = drop_u < 0.4
    # every branch is reached: s = t rows first; drops inside the interval, draws below p outside
    # it that must not drop, s = t and s != t rows on both sides of the interval
    assert torch.equal(fm, torch.arange(n) < n // 2)
    assert int((inside & wanted).sum()) > 0 and int((~inside & wanted).sum()) > 0
    for rows in (fm, ~fm):
        assert int((rows & inside).sum()) > 0 and int((rows & ~inside).sum()) > 0
    assert float((t - s)[~fm].min()) > 1e-3  # no near-equal pair that isclose would call equal
    model.zero_grad()
    expected = reference_alphaflow_loss(reference_net(model), batch.raw_target, batch.raw_source, sigma, sigma_next, dt, alpha,
                                        Cond(batch.label.clone()), drop_u, 0.4, 1.5, 0.25, 1 - 0.7, 1 - 0.2, math.inf, 1e-3)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    assert relative(loss.detach(), expected.detach()) <= TOL
    for (name, _), g, g_ref in zip(model.named_parameters(), grads, expected_grads, strict=True):
        assert g_ref.norm() > 0, name
        assert relative(g, g_ref) <= TOL, (name, relative(g, g_ref))
    # MeanFlow's drop (everywhere; dropped rows train on v) is a different loss: the check can fail
    torch.manual_seed(seed)
    independent = AlphaFlowLoss(**GUIDED, alpha_schedule="constant", alpha_start=alpha, jvp_mode=jvp_mode)(model, batch)
    assert relative(independent.detach(), expected.detach()) > 1e-6


class DualRecorder(nn.Module):
    """Records each call's batch size and whether its input carries a forward-mode tangent."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.num_classes, self.calls = model, model.num_classes, []

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls.append((z.shape[0], fwAD.unpack_dual(z).tangent is not None))
        return self.model(z, y)


@pytest.mark.parametrize("jvp_mode", ["fused", "separate"])
def test_no_jvp_for_rows_with_s_equal_t(jvp_mode: str) -> None:
    """At α = 0 the JVP sees only the rows with s != t, and the prediction, the target and
    the gradient equal MeanFlow's JVP on every row (float64, <= 1e-12 relative)."""
    n = 24
    torch.manual_seed(3)
    net = LabelledField().double()
    model = DualRecorder(net)
    loss_fn = AlphaFlowLoss(**GUIDED, alpha_schedule="constant", alpha_start=0.0, jvp_mode=jvp_mode)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.5
    t = torch.where(torch.arange(n) % 3 == 0, s, s + 0.1 + 0.4 * torch.rand(n, generator=g, dtype=torch.float64))
    label = torch.randint(NUM_CLASSES, (n,), generator=g)
    weights = torch.randn(n, 3, generator=g, dtype=torch.float64)

    def run(method) -> tuple[Tensor, Tensor, list[Tensor]]:
        model.calls = []
        u, target = method(model, x, s, t, v, label)
        return u.detach(), target, torch.autograd.grad((weights * (u - target) ** 2).sum(), list(net.parameters()))

    u_skip, target_skip, grads_skip = run(loss_fn.jvp_where_distinct)
    calls = model.calls
    u_full, target_full, grads_full = run(loss_fn.prediction_and_target)
    distinct = int((s != t).sum())
    assert 0 < distinct < n
    assert [size for size, dual in calls if dual] == [distinct]  # one JVP, on the s != t rows alone
    assert sum(size for size, dual in calls if not dual) == n - distinct + (distinct if jvp_mode == "separate" else 0)
    assert [size for size, dual in model.calls if dual] == [n]  # the full computation's JVP: every row
    assert relative(u_skip, u_full) <= TOL and relative(target_skip, target_full) <= TOL
    for g_skip, g_full in zip(grads_skip, grads_full, strict=True):
        assert relative(g_skip, g_full) <= TOL


def test_alpha_zero_with_the_skip_is_meanflow_in_float64() -> None:
    """The whole α = 0 step, guided with labels dropped, against MeanFlow's loss on the same
    draws (dimension-averaged eps against summed D eps): loss and gradients <= 1e-12."""
    torch.manual_seed(3)
    model = LabelledField().double()
    batch = labelled_batch(32, 3, NUM_CLASSES)
    alpha_loss = AlphaFlowLoss(**GUIDED, alpha_schedule="constant", alpha_start=0.0, eps=1e-3)
    meanflow_loss = MeanFlowLoss(**GUIDED, time={"name": "alphaflow"}, p=1.0, eps=3 * 1e-3)
    results = []
    for loss_fn in (alpha_loss, meanflow_loss):
        torch.manual_seed(7)
        loss = loss_fn(model, batch)
        results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert relative(loss_a, loss_b) <= TOL
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert relative(ga, gb) <= TOL
