"""MeanFlow: the JVP target against finite differences and a closed-form flow, the two
step variants, dropout masks, precision, (s, t) samplers, sampling and bad input."""

import math

import pytest
import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem, make_base_item
from evaluation.sample import sample_meanflow
from losses.meanflow_loss import DEFAULT_TIME, MeanFlowLoss
from losses.time_sampling import make_pair_sampler
from models.flow_matching.mlp import MLP
from models.unified_input import broadcast_time, make_unified_flow_matching_input, split_unified_input, straight_path


def law(**changes) -> dict:
    """The default (s, t) law of ``configs/loss/meanflow.yaml`` with some keys changed."""
    return DEFAULT_TIME | changes


class TinyConv(nn.Module):
    """A small conv mean-velocity field that reads both time channels."""

    def __init__(self, channels: int = 2, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels + 2, hidden, 3, padding=1), nn.Tanh(), nn.Conv2d(hidden, channels, 3, padding=1))
        self.num_classes = 0

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        _, s, t = split_unified_input(z)
        return self.net(z) * (1 + torch.sin(3 * s) * t)[:, None, None, None]


def finite_difference_dudt(model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, h: float = 1e-6) -> Tensor:
    """Central difference of u(x + τ v, s + τ, t) at τ = 0: the total derivative along (v, 1, 0)."""
    plus = model(make_unified_flow_matching_input(x + h * v, s + h, t))
    minus = model(make_unified_flow_matching_input(x - h * v, s - h, t))
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_jvp_total_derivative_matches_central_differences(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP(data_dim=3, hidden=32, depth=3, time_embed_dim=8).double()
        x = torch.randn(5, 3, dtype=torch.float64)
    else:
        model = TinyConv().double()
        x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    s = torch.rand(x.shape[0], dtype=torch.float64) * 0.5
    t = s + torch.rand(x.shape[0], dtype=torch.float64) * 0.5
    v = torch.randn_like(x)
    loss = MeanFlowLoss(p=0.0)
    # The loss computes in float32 for training; here we call its JVP path in float64
    # by reading the target back: target = v + (t - s) dudt.
    u, target = loss.prediction_and_target(model.float().double(), x, s, t, v, None)
    dudt_jvp = (target.double() - v) / broadcast_time(t - s, x)
    dudt_fd = finite_difference_dudt(model, x, s, t, v)
    rel = (dudt_jvp - dudt_fd).norm() / dudt_fd.norm()
    assert rel < 1e-6, f"relative error {rel:.2e}"
    assert torch.allclose(u.double(), model(make_unified_flow_matching_input(x, s, t)))


class GaussianMeanFlow(nn.Module):
    """The exact mean velocity for data x_1 ~ N(mu, sigma^2 I), noise x_0 ~ N(0, I).

    The marginal of x_t is N(m(t), k(t)^2) with m = t mu, k^2 = (1 - t)^2 + t^2 sigma^2;
    the flow map is affine, psi_{s->t}(x) = m(t) + k(t)/k(s) (x - m(s)), and
    u(x, s, t) = (psi_{s->t}(x) - x) / (t - s) (its limit v(x, s) on the diagonal).
    """

    def __init__(self, mu: float, sigma: float) -> None:
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.num_classes = 0

    def k(self, t: Tensor) -> Tensor:
        return torch.sqrt((1 - t) ** 2 + t**2 * self.sigma**2)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        k = self.k(t)[:, None]
        dk = ((-(1 - t) + t * self.sigma**2) / self.k(t))[:, None]
        return self.mu + dk / k * (x - t[:, None] * self.mu)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        x, s, t = split_unified_input(z)
        ks, kt = self.k(s)[:, None], self.k(t)[:, None]
        psi = t[:, None] * self.mu + kt / ks * (x - s[:, None] * self.mu)
        return (psi - x) / (t - s)[:, None]


def test_meanflow_identity_holds_for_a_closed_form_flow() -> None:
    torch.manual_seed(1)
    model = GaussianMeanFlow(mu=1.5, sigma=0.3)
    x = torch.randn(64, 2, dtype=torch.float64)
    s = torch.rand(64, dtype=torch.float64) * 0.45
    t = s + 0.05 + torch.rand(64, dtype=torch.float64) * 0.5
    v = model.velocity(x, s)  # the marginal velocity at the state's time
    u, target = MeanFlowLoss(p=0.0).prediction_and_target(model, x, s, t, v, None)
    # u = v + (t - s) du/ds through the training code path (float32 there).
    assert torch.allclose(u.double(), target.double(), rtol=1e-5, atol=1e-5)
    # A wrong tangent (0 on the s channel) breaks it: the check can fail.
    z = make_unified_flow_matching_input(x, s, t)
    _, wrong = torch.func.jvp(lambda zz: model(zz), (z,), (make_unified_flow_matching_input(v, torch.zeros_like(s), torch.zeros_like(t)),))
    assert not torch.allclose(u.double(), v + (t - s)[:, None] * wrong, atol=1e-3)


def make_batch(n: int = 32, dim: int = 2, seed: int = 0, labels: bool = False) -> BaseItem:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, dim, generator=g) * 2
    x0 = torch.randn(n, dim, generator=g)
    t = torch.rand(n, generator=g)
    label = torch.randint(4, (n,), generator=g) if labels else None
    return make_base_item(x1, x0, t, label)


def grads_for(mode: str, dropout: float, seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    torch.manual_seed(123)
    model = MLP(data_dim=2, hidden=32, depth=3, dropout=dropout)
    loss_fn = MeanFlowLoss(time=law(ratio=0.75), jvp_mode=mode, p=0.75)
    torch.manual_seed(seed)
    loss = loss_fn(model, make_batch())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_and_separate_steps_agree(dropout: float) -> None:
    loss_a, grads_a = grads_for("fused", dropout)
    loss_b, grads_b = grads_for("separate", dropout)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)


def test_dropout_mask_is_shared_between_primal_and_tangent() -> None:
    """With dropout on, the separate variant's forward equals the JVP's primal: the
    target is built from the same sub-network the prediction comes from."""
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=64, depth=2, dropout=0.5).train()
    x = torch.randn(16, 2)
    s, t = torch.rand(16) * 0.5, torch.rand(16) * 0.5 + 0.5
    z = make_unified_flow_matching_input(x, s, t)
    tangent = make_unified_flow_matching_input(torch.randn(16, 2), torch.ones(16), torch.zeros(16))
    state = torch.get_rng_state()
    primal, _ = torch.func.jvp(lambda zz: model(zz), (z,), (tangent,))
    torch.set_rng_state(state)
    again = model(z)
    torch.testing.assert_close(primal, again, rtol=1e-6, atol=1e-6)  # another dropout mask differs by O(1)
    # and a different draw gives a different mask (the check is not vacuous)
    assert not torch.equal(model(z), again)
    # the separate variant's rewind: its forward reproduces the JVP's primal
    loss_fn = MeanFlowLoss(jvp_mode="separate")
    torch.manual_seed(5)
    u_sep, target_sep = loss_fn.prediction_and_target(model, x, s, t, torch.ones_like(x), None)
    torch.manual_seed(5)
    u_fused, target_fused = MeanFlowLoss(jvp_mode="fused").prediction_and_target(model, x, s, t, torch.ones_like(x), None)
    assert torch.allclose(u_sep, u_fused) and torch.allclose(target_sep, target_fused, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["fused", "separate"])
def test_half_precision_autocast_leaves_the_jvp_in_fp32(mode: str, dtype: torch.dtype) -> None:
    """fp16 inside the JVP overflows (docs/design.md trap): the loss turns autocast off there."""
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=32, depth=2)
    seen: list[torch.dtype] = []
    model.out.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    batch = make_batch()
    with torch.autocast("cpu", dtype=dtype):
        loss = MeanFlowLoss(jvp_mode=mode)(model, batch)
        plain = model(batch.unified_input)  # outside the loss, autocast still applies
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert seen[:-1] and all(d == torch.float32 for d in seen[:-1]), seen
    assert plain.dtype == dtype


def test_fp32_loss_matches_without_autocast() -> None:
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=32, depth=2)
    batch = make_batch()
    torch.manual_seed(9)
    plain = MeanFlowLoss()(model, batch)
    torch.manual_seed(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = MeanFlowLoss()(model, batch)
    torch.testing.assert_close(plain, autocast, rtol=1e-6, atol=1e-7)  # a bf16 leak is ~1e-2


def test_ratio_zero_is_flow_matching_on_the_diagonal() -> None:
    """With no s != t pairs (and p = 0) the target is v and the loss is the flow-matching
    loss ||u(x_s, s, s) - v||² summed over dimensions, computed here independently."""
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=16, depth=2)
    batch = make_batch()
    torch.manual_seed(3)
    loss = MeanFlowLoss(time=law(ratio=0.0), p=0.0)(model, batch)
    torch.manual_seed(3)
    s, t = make_pair_sampler(**law(ratio=0.0)).sample(32, torch.device("cpu"))
    assert torch.equal(s, t)
    x0, x1 = batch.raw_source, batch.raw_target
    x_s = straight_path(x0, x1, s)
    with torch.no_grad():
        u = model(make_unified_flow_matching_input(x_s, s, s))
    expected = (u - (x1 - x0)).pow(2).sum(dim=1).mean()
    assert torch.allclose(loss.detach(), expected, rtol=1e-5)


class ConstantField(nn.Module):
    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value
        self.num_classes = 0

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        x, _, _ = split_unified_input(z)
        return self.value.expand_as(x) + 0 * x


def test_one_step_sampling_of_a_constant_field_lands_exactly() -> None:
    c = torch.tensor([0.5, -2.0])
    x0 = torch.randn(10, 2)
    out = sample_meanflow(ConstantField(c), x0, num_steps=1)
    assert torch.equal(out.samples, x0 + c) and out.nfe == 1


class TimeField(nn.Module):
    """u(x, s, t) = (t^2 - s^2) / (t - s) = s + t: the mean of v(tau) = 2 tau over [s, t]."""

    num_classes = 0

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        x, s, t = split_unified_input(z)
        return (s + t)[:, None].expand_as(x)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_few_step_grid_composes(steps: int) -> None:
    """For an exact mean velocity every grid reaches x_0 + ∫_0^1 2τ dτ = x_0 + 1."""
    x0 = torch.randn(6, 3, dtype=torch.float64)
    out = sample_meanflow(TimeField(), x0, num_steps=steps, return_trajectory=True)
    assert torch.allclose(out.samples, x0 + 1, atol=1e-12)
    assert len(out.trajectory) == steps + 1 and out.nfe == steps
    grid = torch.tensor([0.0, 0.1, 0.7, 1.0])
    assert torch.allclose(sample_meanflow(TimeField(), x0, times=grid).samples, x0 + 1, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"time": law(ratio=1.5)}, "ratio"),
        ({"time": law(ratio=-0.1)}, "ratio"),
        ({"p": -1.0}, "loss.p"),
        ({"eps": -1e-3}, "loss.eps"),
        ({"time": law(name="nope")}, "nope"),
        ({"cfg_omega": 2.0}, "unconditional"),
        ({"jvp_mode": "magic"}, "jvp_mode"),
        ({"cfg_interval": [0.8, 0.2]}, "cfg_interval"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        MeanFlowLoss(**kwargs)
    assert "\n" not in str(info.value)


class NoForwardAD(nn.Module):
    num_classes = 0

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        # a custom autograd.Function without jvp(): no forward-mode rule
        return _NoJvp.apply(self.lin(z))


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g * 2


def test_model_without_forward_mode_rule_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="forward-mode") as info:
        MeanFlowLoss().check_model(NoForwardAD(), make_batch())
    assert "\n" not in str(info.value)


def test_guided_target_mixes_the_three_velocities() -> None:
    """ṽ = ω v + κ u(c) + (1 - ω - κ) u(∅) for kept labels, plain v for dropped ones."""

    class LabelField(nn.Module):
        num_classes = 4

        def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
            x, _, _ = split_unified_input(z)
            return torch.ones_like(x) * y[:, None].float()

    loss_fn = MeanFlowLoss(num_classes=4, class_drop_prob=0.1, cfg_omega=2.0, cfg_kappa=0.5, cfg_interval=[0.0, 0.5])
    x = torch.zeros(4, 2)
    v = torch.full((4, 2), 3.0)
    s = torch.tensor([0.1, 0.2, 0.9, 0.3])
    label = torch.tensor([1, 2, 3, 4])  # the last is the null class (dropped)
    out = loss_fn.guided_velocity(LabelField(), x, s, v, label, label == 4)
    expected = torch.tensor([2 * 3.0 + 0.5 * 1 + (1 - 2.5) * 4, 2 * 3.0 + 0.5 * 2 + (1 - 2.5) * 4, 3.0, 3.0])
    assert torch.allclose(out[:, 0], expected)


def test_meanflow_training_improves_one_step_samples() -> None:
    """A few hundred steps on 2-D Gaussian data bring one-step samples much closer to
    the data (energy distance) than the untrained model's."""
    from evaluation.energy_distance import energy_distance

    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=64, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = MeanFlowLoss(time=law(ratio=0.75), p=1.0)
    data = torch.randn(1000, 2) * 2 + torch.tensor([3.0, -1.0])

    def one_step_distance() -> float:
        with torch.no_grad():
            samples = sample_meanflow(model, torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))).samples
        return energy_distance(samples, data)

    before = one_step_distance()
    for step in range(300):
        g = torch.Generator().manual_seed(step)
        x1 = torch.randn(256, 2, generator=g) * 2 + torch.tensor([3.0, -1.0])
        loss = loss_fn(model, make_base_item(x1, torch.randn(256, 2, generator=g), torch.rand(256, generator=g)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
    after = one_step_distance()
    assert after < 0.1 * before, (before, after)


def test_auto_is_the_fused_pass() -> None:
    """``jvp_mode: auto``, every loss config's value, trains with the fused pass."""
    assert MeanFlowLoss(jvp_mode="auto").jvp_mode == "fused"
    assert MeanFlowLoss(jvp_mode="separate").jvp_mode == "separate"
