"""Classifier-free guidance: the guided velocity against its formula, and class-conditional
2-D training (MeanFlow with a guided target, flow matching with label drop) whose
class-c samples land on cluster c while null-label samples spread over all clusters."""

import pytest
import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import make_base_item
from dataloaders.kmeans import make_dataset
from evaluation.energy_distance import energy_distance
from evaluation.sample import sample_flow, sample_meanflow
from helpers_cfg import conditional_and_null, guided_velocity, null_labels
from losses.base_loss import BaseLoss
from losses.meanflow_loss import DEFAULT_TIME, MeanFlowLoss
from losses.mse_loss import FlowMatchingMSELoss
from models.flow_matching.mlp import MLP
from models.unified_input import make_unified_flow_matching_input

K = 4  # clusters on a ring of radius 4, one class each
N_SAMPLES = 400  # samples per class for each energy distance


class CountingModel(nn.Module):
    """Wraps a model and counts its forward calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls += 1
        return self.model(z, y)


def test_guided_velocity_is_uncond_plus_scaled_difference() -> None:
    torch.manual_seed(0)
    model = CountingModel(MLP(data_dim=2, hidden=16, depth=2, num_classes=3).double())
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    z = make_unified_flow_matching_input(x, t, t)
    label = torch.tensor([0, 1, 2, 1, 0])
    cond, uncond = model(z, label), model(z, null_labels(5, 3, "cpu"))
    for scale in (0.0, 2.5, -1.0):
        model.calls = 0
        guided = guided_velocity(model, z, label, scale, num_classes=3)
        assert model.calls == 1  # cond and null share one batched forward
        torch.testing.assert_close(guided, uncond + scale * (cond - uncond), rtol=1e-12, atol=1e-12)
    model.calls = 0
    plain = guided_velocity(model, z, label, 1.0, num_classes=3)
    assert model.calls == 1  # scale 1 is the plain conditional model: no null pass
    torch.testing.assert_close(plain, cond, rtol=0, atol=0)


def test_guided_velocity_refuses_an_unconditional_model() -> None:
    model = MLP(data_dim=2, hidden=8, depth=1)
    z = make_unified_flow_matching_input(torch.randn(2, 2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="num_classes=0"):
        guided_velocity(model, z, torch.zeros(2, dtype=torch.long), 2.0, num_classes=0)


@pytest.fixture
def one_thread():
    """Small matmuls: several OpenMP threads spin against each other and against other
    processes instead of sharing the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_conditional(loss: BaseLoss, steps: int, seed: int = 0) -> nn.Module:
    """A class-conditional MLP trained on the K-cluster ring with a plain Adam loop."""
    torch.manual_seed(seed)
    data = make_dataset("train", num_samples=4096, num_clusters=K)
    x, y = data.get_batch(list(range(len(data))))
    model = MLP(data_dim=2, hidden=64, depth=3, num_classes=K)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(len(data), (256,))
        batch = make_base_item(x[idx], torch.randn(256, 2), torch.rand(256), y[idx])
        loss_value = loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        optimizer.step()
    return model.eval()


def held_out_by_class() -> dict[int, Tensor]:
    test = make_dataset("test", num_samples=4000, num_clusters=K)
    x, y = test.get_batch(list(range(len(test))))
    return {c: x[y == c][:N_SAMPLES] for c in range(K)}


def assert_classes_separate(sample, held_out: dict[int, Tensor]) -> None:
    """``sample(label)`` draws N_SAMPLES points from fixed noise (label None: the null class).
    Each class's samples must sit far closer to that class's data than the null samples do."""
    unconditional = sample(None)
    for c, data_c in held_out.items():
        conditional = sample(torch.full((N_SAMPLES,), c))
        ed_cond, ed_uncond = energy_distance(conditional, data_c), energy_distance(unconditional, data_c)
        # the null samples cover all K clusters, so most of them miss cluster c by the ring's spacing
        assert ed_cond < 0.6 * ed_uncond, f"class {c}: conditional {ed_cond:.3f} vs null-label {ed_uncond:.3f}"


def test_meanflow_with_guided_target_separates_classes_in_one_step(one_thread) -> None:
    # ω = 1.2, κ = 0: the target's velocity is 1.2 v - 0.2 u(x_s, s, s | ∅), an effective
    # guidance scale ω / (1 - κ) = 1.2. Mild on purpose: on well-separated 2-D clusters a
    # stronger scale pushes one-step samples past their cluster, and this test is about
    # separation, not the strength of the push.
    loss = MeanFlowLoss(time=DEFAULT_TIME | {"ratio": 0.5}, num_classes=K, class_drop_prob=0.1, cfg_omega=1.2, cfg_kappa=0.0)
    model = train_conditional(loss, steps=500)
    noise = torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_classes_separate(lambda label: sample_meanflow(model, noise, num_steps=1, label=label).samples, held_out_by_class())


def test_flow_matching_with_label_drop_and_guided_sampling_separates_classes(one_thread) -> None:
    loss = FlowMatchingMSELoss(num_classes=K, class_drop_prob=0.1)
    model = train_conditional(loss, steps=500)
    noise = torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(1))

    def sample(label: Tensor | None) -> Tensor:
        # Null-label samples are the plain null-class model (scale 1, one pass per step).
        scale = 1.0 if label is None else 2.0
        return sample_flow(model, noise, num_steps=20, label=label, guidance_scale=scale, num_classes=K).samples

    with torch.no_grad():
        assert_classes_separate(sample, held_out_by_class())


def test_a_null_guidance_scale_is_the_losses_default() -> None:
    """eval.guidance_scale=null: the loss's default, no guidance for a flow-matching loss's solver."""
    from tests.conftest import compose_train

    for value, expected in (("null", 1.0), ("2.5", 2.5)):
        cfg = compose_train([f"eval.guidance_scale={value}"])
        samplers = FlowMatchingMSELoss(num_classes=K, class_drop_prob=0.1).samplers(cfg.eval, cfg.solver, K)
        assert [sm.guidance_scale for sm in samplers.values()] == [expected]


class Recorder(nn.Module):
    """Records each call's labels, conditions and head; answers with the label as a float."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor | None, str]] = []

    def forward(self, z: Tensor, y: Tensor, cond: Tensor | None = None, head: str = "u") -> Tensor:
        self.calls.append((y, cond, head))
        return y[:, None].float().expand(-1, 2) + (0.0 if cond is None else cond[:, :1])


def test_conditional_and_null_passes_each_half_its_conditions() -> None:
    """One batched forward: [label; ∅] with [cond; null_cond] and the head asked for."""
    model = Recorder()
    z = make_unified_flow_matching_input(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3))
    label = torch.tensor([0, 2, 1])
    cond, null_cond = torch.full((3, 3), 5.0), torch.ones(3, 3)
    u_cond, u_null = conditional_and_null(model, z, label, K, cond=cond, null_cond=null_cond, head="v")
    assert len(model.calls) == 1
    labels, conds, head = model.calls[0]
    assert torch.equal(labels, torch.tensor([0, 2, 1, K, K, K])) and torch.equal(conds, torch.cat([cond, null_cond]))
    assert head == "v"
    assert torch.equal(u_cond[:, 0], label.float() + 5) and torch.equal(u_null[:, 0], torch.full((3,), K + 1.0))
    conditional_and_null(model, z, label, K)  # a model's plain call: no conditions, the default head
    assert model.calls[1][1] is None and model.calls[1][2] == "u"
