"""Improved MeanFlow: the compound prediction against float64 finite differences and a
closed-form flow, the tangent along the model's own velocity, iMF's guidance form, its
equivalence to MeanFlow with the conditional tangent, and the config."""

import math

import pytest
import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem, make_base_item
from evaluation.sample import sample_meanflow
from losses.base_loss import build_loss
from losses.imf_loss import DEFAULT_TIME, IMFLoss
from losses.meanflow_loss import MeanFlowLoss
from models.flow_matching.mlp import MLP
from models.unified_input import broadcast_time, make_unified_flow_matching_input, split_unified_input, straight_path
from solvers.sampling import DiagonalSampler, JumpSampler
from tests.conftest import compose_train


class TinyConv(nn.Module):
    """A small conv mean-velocity field that reads both time channels."""

    num_classes = 0

    def __init__(self, channels: int = 2, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels + 2, hidden, 3, padding=1), nn.Tanh(), nn.Conv2d(hidden, channels, 3, padding=1))

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        _, s, t = split_unified_input(z)
        return self.net(z) * (1 + torch.sin(3 * s) * t)[:, None, None, None]


def times(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.5
    return s, s + 0.05 + torch.rand(n, generator=g, dtype=torch.float64) * 0.4


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_compound_prediction_matches_central_differences(kind: str) -> None:
    """V = u - (t - s) du/ds along (u(x, s, s), 1, 0), the derivative by a float64
    central difference of u(x + τ v_c, s + τ, t), independently of the loss's JVP."""
    torch.manual_seed(0)
    if kind == "mlp":
        model, x = MLP(data_dim=3, hidden=32, depth=3, time_embed_dim=8).double(), torch.randn(5, 3, dtype=torch.float64)
    else:
        model, x = TinyConv().double(), torch.randn(4, 2, 5, 5, dtype=torch.float64)
    s, t = times(x.shape[0])
    loss_fn = IMFLoss(p=0.0)
    tangent, v_g = loss_fn.tangent_and_guided_velocity(model, x, s, t, torch.zeros_like(x), None, None)
    with torch.no_grad():
        v_c = model(make_unified_flow_matching_input(x, s, s))
    assert torch.equal(tangent, v_c)  # the model's own instantaneous velocity
    assert torch.equal(v_g, torch.zeros_like(x))  # unguided: the target is the given velocity
    big_v = loss_fn.compound_prediction(model, x, s, t, tangent, None)
    h = 1e-6
    with torch.no_grad():
        plus = model(make_unified_flow_matching_input(x + h * v_c, s + h, t))
        minus = model(make_unified_flow_matching_input(x - h * v_c, s - h, t))
        u = model(make_unified_flow_matching_input(x, s, t))
    expected = u - broadcast_time(t - s, x) * (plus - minus) / (2 * h)
    rel = (big_v.detach() - expected).norm() / expected.norm()
    assert rel < 1e-7, f"relative error {rel:.2e}"


def test_only_u_carries_the_gradient() -> None:
    """sg(du/ds): the gradient of V is the gradient of u alone (paper: V = u + (t - r) sg(du/dt))."""
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=16, depth=2).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    s, t = times(6)
    loss_fn = IMFLoss(p=0.0, jvp_mode="fused")
    tangent, _ = loss_fn.tangent_and_guided_velocity(model, x, s, t, x, None, None)
    grads_v = torch.autograd.grad(loss_fn.compound_prediction(model, x, s, t, tangent, None).sum(), list(model.parameters()))
    grads_u = torch.autograd.grad(model(make_unified_flow_matching_input(x, s, t)).sum(), list(model.parameters()))
    for gv, gu in zip(grads_v, grads_u, strict=True):
        assert torch.allclose(gv, gu, atol=1e-12)


class ExactGaussianFlow(nn.Module):
    """The exact mean velocity for data N(mu, sigma^2 I) and noise N(0, I), defined on the
    diagonal too: x_t ~ N(t mu, k(t)^2) with k^2 = (1 - t)^2 + t^2 sigma^2, the flow map
    psi_{s->t}(x) = t mu + k(t)/k(s) (x - s mu), u = (psi - x)/(t - s), u(x, s, s) = v(x, s)."""

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
        gap = t - s
        diagonal = gap == 0
        psi = t[:, None] * self.mu + (self.k(t) / self.k(s))[:, None] * (x - s[:, None] * self.mu)
        mean = (psi - x) / torch.where(diagonal, torch.ones_like(gap), gap)[:, None]
        return torch.where(diagonal[:, None], self.velocity(x, s), mean)


def test_compound_prediction_of_a_closed_form_flow_is_its_velocity() -> None:
    """For the exact mean flow, V along the model's own velocity is the marginal velocity
    v(x, s) (iMF's premise: V estimates v), through the training code path in float32."""
    torch.manual_seed(1)
    model = ExactGaussianFlow(mu=1.5, sigma=0.3)
    x = torch.randn(64, 2, dtype=torch.float64)
    s, t = times(64, seed=1)
    loss_fn = IMFLoss(p=0.0)
    tangent, _ = loss_fn.tangent_and_guided_velocity(model, x, s, t, x, None, None)
    assert torch.allclose(tangent, model.velocity(x, s), atol=1e-12)
    big_v = loss_fn.compound_prediction(model, x.float(), s.float(), t.float(), tangent.float(), None)
    assert torch.allclose(big_v.double(), model.velocity(x, s), rtol=1e-4, atol=1e-4)
    # MeanFlow's tangent, a one-sample velocity x_1 - x_0, does not give v: the check can fail
    noisy = model.velocity(x, s) + torch.randn_like(x)
    wrong = loss_fn.compound_prediction(model, x, s, t, noisy, None)
    assert not torch.allclose(wrong, model.velocity(x, s), atol=1e-2)


def make_batch(n: int = 32, dim: int = 2, seed: int = 0, labels: bool = False) -> BaseItem:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, dim, generator=g) * 2
    x0 = torch.randn(n, dim, generator=g)
    label = torch.randint(4, (n,), generator=g) if labels else None
    return make_base_item(x1, x0, torch.rand(n, generator=g), label)


def loss_and_grads(loss_fn: nn.Module, seed: int = 3) -> tuple[Tensor, list[Tensor]]:
    torch.manual_seed(123)
    model = MLP(data_dim=2, hidden=32, depth=3)
    torch.manual_seed(seed)
    loss = loss_fn(model, make_batch())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_conditional_tangent_is_meanflow() -> None:
    """With MeanFlow's tangent the v-loss is MeanFlow's loss (same law, weight, seed):
    ||V - v||² = ||u - sg(v + (t - s) du/ds)||², and so are the gradients."""
    law = DEFAULT_TIME | {"name": "meanflow_jax", "ratio": 0.75}
    loss_a, grads_a = loss_and_grads(IMFLoss(time=law, p=0.75, eps=1e-3, tangent="conditional"))
    loss_b, grads_b = loss_and_grads(MeanFlowLoss(time=law, p=0.75, eps=1e-3))
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-7)
    # and the predicted tangent (iMF) changes the objective: the comparison is not vacuous
    loss_c, _ = loss_and_grads(IMFLoss(time=law, p=0.75, eps=1e-3))
    assert not torch.allclose(loss_a, loss_c)


def test_guided_conditional_tangent_is_meanflow_with_kappa() -> None:
    """iMF's guidance v + (1 - 1/ω)(v_c - v_u) is MeanFlow's ω' v + κ u(c) + (1 - ω' - κ) u(∅)
    with ω' = 1, κ = 1 - 1/ω: with the conditional tangent the two losses agree."""

    def run(loss_fn: nn.Module) -> Tensor:
        torch.manual_seed(123)
        model = MLP(data_dim=2, hidden=32, depth=3, num_classes=4)
        torch.manual_seed(3)
        return loss_fn(model, make_batch(labels=True)).detach()

    common = {"time": DEFAULT_TIME, "p": 0.0, "num_classes": 4, "class_drop_prob": 0.2}
    imf = run(IMFLoss(**common, cfg_omega=4.0, tangent="conditional"))
    meanflow = run(MeanFlowLoss(**common, cfg_omega=1.0, cfg_kappa=0.75))
    assert torch.allclose(imf, meanflow, rtol=1e-6)
    assert not torch.allclose(imf, run(IMFLoss(**common, cfg_omega=4.0)))  # the predicted tangent differs


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_and_separate_agree(dropout: float) -> None:
    def run(mode: str) -> tuple[Tensor, list[Tensor]]:
        torch.manual_seed(123)
        model = MLP(data_dim=2, hidden=32, depth=3, dropout=dropout)
        torch.manual_seed(0)
        loss = IMFLoss(jvp_mode=mode)(model, make_batch())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (loss_a, grads_a), (loss_b, grads_b) = run("fused"), run("separate")
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)


def test_loss_is_the_weighted_v_loss() -> None:
    """The scalar against an independent computation from the same draws: per sample
    ||V - v||² summed over dimensions, divided by sg(that + eps)^p, averaged."""
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=16, depth=2)
    batch = make_batch()
    loss_fn = IMFLoss(p=1.0, eps=0.01)
    torch.manual_seed(4)
    loss = loss_fn(model, batch)
    torch.manual_seed(4)
    s, t = loss_fn.pair_sampler.sample(32, torch.device("cpu"))
    assert (s == t).sum() == 16  # imeanflow: the first half of the rows are s = t
    x0, x1 = batch.raw_source, batch.raw_target
    x_s = straight_path(x0, x1, s)
    with torch.no_grad():
        v_c = model(make_unified_flow_matching_input(x_s, s, s))
    _, dudt = torch.func.jvp(lambda z: model(z), (make_unified_flow_matching_input(x_s, s, t),),
                             (make_unified_flow_matching_input(v_c, torch.ones_like(s), torch.zeros_like(t)),))
    with torch.no_grad():
        big_v = model(make_unified_flow_matching_input(x_s, s, t)) - (t - s)[:, None] * dudt
    err = (big_v - (x1 - x0)).pow(2).sum(dim=1)
    assert torch.allclose(loss.detach(), (err / (err + 0.01)).mean(), rtol=1e-5)


class LabelField(nn.Module):
    """u = label (as a float) on every dimension: v_c and v_u are read off the output."""

    num_classes = 4

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        x, _, _ = split_unified_input(z)
        return torch.ones_like(x) * y[:, None].float()


def test_guided_velocity_has_imf_form() -> None:
    """v_g = v + (1 - 1/ω)(v_c - v_u) for kept labels with s in the interval or s = t,
    plain v for the others and for dropped labels; the tangent is v_c (with the label
    before dropping, as the reference computes it)."""
    loss_fn = IMFLoss(num_classes=4, class_drop_prob=0.1, cfg_omega=4.0, cfg_interval=[0.0, 0.5])
    x = torch.zeros(5, 2)
    v = torch.full((5, 2), 3.0)
    s = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.3])
    t = torch.tensor([0.6, 0.95, 0.8, 0.7, 0.3])
    label = torch.tensor([1, 2, 3, 1, 2])
    dropped = torch.tensor([False, False, False, True, False])
    tangent, v_g = loss_fn.tangent_and_guided_velocity(LabelField(), x, s, t, v, label, dropped)
    assert torch.equal(tangent[:, 0], label.float())
    null = 4.0
    scale = 1 - 1 / 4.0
    expected = torch.tensor([3 + scale * (1 - null), 3.0, 3 + scale * (3 - null), 3.0, 3 + scale * (2 - null)])
    assert torch.allclose(v_g[:, 0], expected)


def test_samples_mixes_guidance_and_labels_in_a_step() -> None:
    """A guided conditional step runs end to end and is finite (labels dropped at 10%)."""
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=16, depth=2, num_classes=4)
    loss = IMFLoss(num_classes=4, class_drop_prob=0.1, cfg_omega=2.0, cfg_interval=[0.2, 0.8])(model, make_batch(labels=True))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tangent": "sideways"}, "loss.tangent"),
        ({"num_classes": 4, "class_drop_prob": 0.1, "cfg_omega": 0.5}, "cfg_omega"),
        ({"cfg_omega": 2.0}, "unconditional"),
        ({"num_classes": 4, "class_drop_prob": 0.1, "cfg_kappa": 0.5}, "cfg_kappa"),
        ({"time": DEFAULT_TIME | {"ratio": 2.0}}, "ratio"),
        ({"eps": -1.0}, "loss.eps"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        IMFLoss(**kwargs)
    assert "\n" not in str(info.value)


def test_config_builds_the_reference_settings_and_samplers() -> None:
    cfg = compose_train(["loss=imf"])
    loss_fn = build_loss(cfg.loss)
    assert isinstance(loss_fn, IMFLoss)
    assert (loss_fn.p, loss_fn.eps, loss_fn.tangent) == (1.0, 0.01, "predicted")
    assert type(loss_fn.pair_sampler).__name__ == "IMeanflowPairSampler" and loss_fn.pair_sampler.ratio == 0.5
    samplers = loss_fn.samplers(cfg.eval, cfg.solver, cfg.model.num_classes)
    jumps = {name: sm for name, sm in samplers.items() if isinstance(sm, JumpSampler)}
    assert sorted(sm.steps for sm in jumps.values()) == sorted(cfg.eval.meanflow_steps)
    diagonal = [sm for sm in samplers.values() if isinstance(sm, DiagonalSampler)]
    assert len(diagonal) == 1 and not diagonal[0].fid  # the solver is a diagnostic, not what ships


def test_training_improves_one_step_samples() -> None:
    """A few hundred steps on 2-D Gaussian data bring one-step samples much closer."""
    from evaluation.energy_distance import energy_distance

    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=64, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = IMFLoss()
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
    assert one_step_distance() < 0.1 * before


def test_half_precision_autocast_leaves_the_targets_in_fp32() -> None:
    """The tangent forward, the JVP and the prediction run with autocast off (docs/design.md trap)."""
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=32, depth=2)
    seen: list[torch.dtype] = []
    model.out.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = IMFLoss(jvp_mode="separate")(model, make_batch())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert len(seen) == 3 and all(d == torch.float32 for d in seen), seen  # v_c, JVP, prediction


def test_augment_labels_reach_the_model() -> None:
    """EDM augment labels go to every forward (tangent, JVP, prediction), as MeanFlow's."""
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
    loss_fn = IMFLoss(jvp_mode="fused")
    loss_fn.check(model, batch)
    loss_fn(model, batch).backward()
    assert model.augment_embed.weight.grad.abs().sum() > 0


# --- guidance as conditions, the auxiliary head, their samplers ----------------------------


def ks_distance(samples: Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance of ``samples`` (1-D) from the law of ``cdf``."""
    x, _ = torch.sort(samples.double())
    n = x.shape[0]
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_condition_laws_are_the_references(beta: float) -> None:
    """ω per row: omega_max^U for beta = 1 (imf.py::sample_cfg_scale), density ∝ ω^-beta
    otherwise; t_min ~ U(0, 0.5), t_max ~ U(0.5, 1), [0, 1] on the s = t rows; each law within
    the KS distance 2/sqrt(n) (its 0.1% critical value is 1.95/sqrt(n))."""
    n = 20_000
    loss_fn = IMFLoss(num_classes=4, class_drop_prob=0.1, num_conds=3, omega_beta=beta)
    equal = torch.arange(n) < n // 4
    torch.manual_seed(0)
    omega, t_min, t_max = loss_fn.draw_conditions(equal)
    assert torch.equal(t_min[equal], torch.zeros(n // 4)) and torch.equal(t_max[equal], torch.ones(n // 4))
    bound = 2.0 / math.sqrt(n - n // 4)
    assert ks_distance(t_min[~equal], lambda x: (x / 0.5).clamp(0, 1)) < bound
    assert ks_distance(t_max[~equal], lambda x: ((x - 0.5) / 0.5).clamp(0, 1)) < bound
    power = 1 - beta
    cdf = (lambda w: torch.log(w) / math.log(8)) if beta == 1 else (lambda w: (w**power - 1) / (8**power - 1))
    assert ks_distance(omega, cdf) < 2.0 / math.sqrt(n)
    assert float(omega.min()) >= 1.0 and float(omega.max()) <= 8.0
    # the other law is rejected: the test can fail
    other = (lambda w: (w**-1.0 - 1) / (8**-1.0 - 1)) if beta == 1 else (lambda w: torch.log(w) / math.log(8))
    assert ks_distance(omega, other) > 0.05


def test_conditions_are_omega_and_the_interval_of_s() -> None:
    """cond = [ω, 1 - t_max, 1 - t_min]: the paper's interval (noise at 1) as a range of s."""
    cond = IMFLoss.conditions(torch.tensor([2.0]), torch.tensor([0.35]), torch.tensor([0.6]))
    assert torch.allclose(cond, torch.tensor([[2.0, 0.4, 0.65]]))


def test_aux_head_loss_without_conditions() -> None:
    """Fixed guidance with the auxiliary head: ||V - v||² + ||v_θ - v||², adaptively weighted
    each, V along the v head's own velocity at s = t (float64, against an independent computation)."""
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=16, depth=2, aux_head=True).double()
    batch = make_batch()
    batch = BaseItem(**{k: (v.double() if isinstance(v, Tensor) and v.is_floating_point() else v) for k, v in vars(batch).items()})
    loss_fn = IMFLoss(p=1.0, eps=0.01, aux_head=True)
    torch.manual_seed(4)
    loss = loss_fn(model, batch)
    torch.manual_seed(4)
    s, t = loss_fn.pair_sampler.sample(32, torch.device("cpu"))
    s, t = s.double(), t.double()
    x0, x1 = batch.raw_source, batch.raw_target
    x_s = straight_path(x0, x1, s)
    with torch.no_grad():
        v_c = model(make_unified_flow_matching_input(x_s, s, s), head="v")
        _, dudt = torch.func.jvp(lambda z: model(z), (make_unified_flow_matching_input(x_s, s, t),),
                                 (make_unified_flow_matching_input(v_c, torch.ones_like(s), torch.zeros_like(t)),))
        u, v_aux = model(make_unified_flow_matching_input(x_s, s, t), head="both")
    err_u = (u - (t - s)[:, None] * dudt - (x1 - x0)).pow(2).sum(dim=1)
    err_v = (v_aux - (x1 - x0)).pow(2).sum(dim=1)
    expected = (err_u / (err_u + 0.01) + err_v / (err_v + 0.01)).mean()
    assert torch.allclose(loss.detach(), expected, rtol=1e-12, atol=0)
    assert set(loss_fn.metrics) == {"mse", "mse_v"}


class CondRecorder(nn.Module):
    """Records the conditions of every call."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, z: Tensor, y: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        x, s, _ = split_unified_input(z)
        self.seen.append((s.clone(), cond.clone()))
        return torch.zeros_like(x)


def conditioned_samplers(overrides: list[str]) -> dict:
    cfg = compose_train(["loss=imf", *overrides])
    loss_fn = IMFLoss(num_classes=4, class_drop_prob=0.1, num_conds=3, aux_head=True, cfg_omega=2.0, cfg_interval=[0.1, 0.9])
    return loss_fn.samplers(cfg.eval, cfg.solver, 4)


def test_samplers_hand_the_eval_guidance_to_the_model() -> None:
    """A model with guidance conditions gets [ω, lo, hi] of eval.guidance_scale and
    eval.guidance_interval at every jump (imf.py::sample_one_step), and [w, 0, 1] on the
    diagonal (w = ω inside the interval, 1 outside); null takes cfg_omega and cfg_interval."""
    samplers = conditioned_samplers(["eval.guidance_scale=4", "eval.guidance_interval=[0.35,0.6]", "eval.steps=10",
                                     "solver=euler"])
    jumps = [sm for sm in samplers.values() if isinstance(sm, JumpSampler)]
    diagonal = [sm for sm in samplers.values() if isinstance(sm, DiagonalSampler)]
    assert len(diagonal) == 1 and not diagonal[0].fid and len(jumps) == 2
    x0, label = torch.randn(5, 2), torch.arange(5) % 4
    for jump in jumps:
        model = CondRecorder()
        jump(model, x0, label)
        assert len(model.seen) == jump.steps
        for _, cond in model.seen:
            assert torch.allclose(cond, torch.tensor([4.0, 0.35, 0.6]).expand(5, 3))
    model = CondRecorder()
    diagonal[0](model, x0, label)
    inside = 0
    for s, cond in model.seen:
        w = torch.where((s >= 0.35) & (s <= 0.6), 4.0, 1.0)
        assert torch.allclose(cond, torch.stack([w, torch.zeros(5), torch.ones(5)], 1))
        inside += int((w == 4.0).sum())
    assert 0 < inside < 5 * len(model.seen)  # both sides of the interval were sampled
    model = CondRecorder()
    jumps = [sm for sm in conditioned_samplers(["eval.guidance_scale=null"]).values() if isinstance(sm, JumpSampler)]
    jumps[0](model, x0, label)
    assert torch.allclose(model.seen[0][1], torch.tensor([2.0, 0.1, 0.9]).expand(5, 3))


def test_a_bad_eval_interval_is_one_line() -> None:
    with pytest.raises(ValueError, match="eval.guidance_interval") as info:
        conditioned_samplers(["eval.guidance_interval=[0.7,0.2]"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_conds": 2, "num_classes": 4, "class_drop_prob": 0.1}, "loss.num_conds"),
        ({"num_conds": 3}, "class-conditional"),
        ({"num_conds": 3, "num_classes": 4}, "class_drop_prob"),
        ({"omega_max": 0.5}, "loss.omega_max"),
        ({"t_min_range": [0.0, 0.6]}, "t_min_range"),
        ({"class_drop": "sometimes"}, "loss.class_drop"),
    ],
)
def test_bad_condition_settings_are_one_line_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        IMFLoss(**kwargs)
    assert "\n" not in str(info.value)


def test_config_follows_the_model_and_trains_with_conditions() -> None:
    """loss.num_conds and loss.aux_head follow the model's (0 and false where it has none);
    a conditioned MLP with the auxiliary head trains a step and samples with conditions."""
    cfg = compose_train(["loss=imf"])
    assert (cfg.loss.num_conds, cfg.loss.aux_head, cfg.loss.class_drop) == (0, False, "imeanflow")
    cfg = compose_train(["loss=imf", "model.num_classes=4", "++model.num_conds=3", "++model.aux_head=true",
                         "loss.class_drop_prob=0.1", "eval.guidance_scale=3"])
    loss_fn = build_loss(cfg.loss)
    assert (loss_fn.num_conds, loss_fn.aux_head) == (3, True)
    torch.manual_seed(0)
    model = MLP(data_dim=2, hidden=16, depth=2, num_classes=4, num_conds=3, aux_head=True)
    batch = make_batch(labels=True)
    loss_fn.check(model, batch)
    loss = loss_fn(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    for sampler in loss_fn.samplers(cfg.eval, cfg.solver, 4).values():
        assert torch.isfinite(sampler(model, torch.randn(6, 2), torch.arange(6) % 4)).all()


def test_every_kind_of_sampler_takes_the_conditions() -> None:
    """A consistency sampler and a time-list jump chain, conditioned, stay of their kind and
    give every jump [ω, lo, hi] (the settings an evaluation records include them)."""
    from losses.imf_loss import with_conditions
    from solvers.sampling import ConsistencySampler

    x0, label = torch.randn(5, 2), torch.arange(5) % 4
    for sampler in (ConsistencySampler(3), JumpSampler([0, 0.45, 1])):
        conditioned = with_conditions(sampler, 3.0, (0.2, 0.5))
        assert isinstance(conditioned, type(sampler)) and conditioned.steps == sampler.steps
        assert conditioned.settings()["omega"] == 3.0 and conditioned.settings()["interval"] == (0.2, 0.5)
        model = CondRecorder()
        conditioned(model, x0, label)
        assert len(model.seen) == sampler.steps and conditioned.nfe == sampler.steps
        for _, cond in model.seen:
            assert torch.allclose(cond, torch.tensor([3.0, 0.2, 0.5]).expand(5, 3))
