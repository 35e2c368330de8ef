"""iMF as Lyy-iiis/imeanflow ships it, against a float64 transcription of its ``imf.py``.

The transcription (``reference_imf_loss``) follows ``iMeanFlow.forward`` (imf.py:343-401) with
``guidance_fn`` (295-325), ``v_fn`` / ``v_cond_fn`` (212-261) and ``cond_drop`` (263-293) line by
line, in the reference's time (noise at 1, ``t >= r``), given its random draws. Its ``net`` is
the model under test seen through that convention (``paper_net``): ``t_paper = 1 - s``,
``h = t - s``, ``u_paper = -u``, ``[ω, t_min, t_max]`` as ``cond = [ω, 1 - t_max, 1 - t_min]``.
``jax.jvp(u_fn, ..., has_aux=True)`` becomes a plain forward for ``(u, v)`` and
``torch.func.jvp`` for ``du/dt`` (the JVP's primal is the forward). Tolerance: 1e-12
relative in float64, on the loss and on every parameter's gradient.
"""

import math

import pytest
import torch
from torch import Tensor, nn

from helpers_cfg import training_labels
from losses.imf_loss import IMFLoss
from models.flow_matching.mlp import MLP
from models.unified_input import make_unified_flow_matching_input, split_unified_input
from tests.conftest import labelled_batch, relative

NUM_CLASSES = 4
TOL = 1e-12


class TwoHeadField(nn.Module):
    """A small field with the model contract (``num_conds``, ``aux_head``, ``head``): a tanh
    trunk on ``[x, s, t, cond]`` plus a class embedding, then a u branch and a v branch."""

    def __init__(self, dim: int = 3, hidden: int = 16, num_classes: int = NUM_CLASSES, num_conds: int = 3) -> None:
        super().__init__()
        self.num_classes, self.num_conds, self.aux_head = num_classes, num_conds, True
        self.inp = nn.Linear(dim + 2 + num_conds, hidden)
        self.embed = nn.Embedding(num_classes + 1, hidden)
        self.u_mid, self.v_mid = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.u_out, self.v_out = nn.Linear(hidden, dim), nn.Linear(hidden, dim)

    def forward(self, z: Tensor, y: Tensor | None = None, aug: Tensor | None = None, cond: Tensor | None = None,
                head: str = "u") -> Tensor | tuple[Tensor, Tensor]:
        x, s, t = split_unified_input(z)
        y = torch.full_like(s, self.num_classes, dtype=torch.long) if y is None else y
        h = torch.tanh(self.inp(torch.cat([x, s[:, None], t[:, None], cond], dim=1)) + self.embed(y))
        h = h * (1 + 0.5 * torch.sin(3 * s) * t)[:, None]
        u, v = self.u_out(torch.tanh(self.u_mid(h))), self.v_out(torch.tanh(self.v_mid(h)))
        return {"u": u, "v": v, "both": (u, v)}[head]


def paper_net(model: nn.Module):
    """``net(x, t, h, ω, t_min, t_max, y) -> (u, v)`` of ``imf.py::u_fn`` (noise at 1)."""

    def net(x: Tensor, t: Tensor, h: Tensor, omega: Tensor, t_min: Tensor, t_max: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        s = 1 - t
        u, v = model(make_unified_flow_matching_input(x, s, s + h), y, cond=torch.stack([omega, 1 - t_max, 1 - t_min], 1),
                     head="both")
        return -u, -v

    return net


def reference_imf_loss(net, images: Tensor, e: Tensor, t: Tensor, r: Tensor, fm_mask: Tensor, t_min: Tensor, t_max: Tensor,
                       omega: Tensor, drop_u: Tensor, labels: Tensor, num_classes: int, class_dropout_prob: float,
                       norm_p: float, norm_eps: float) -> Tensor:
    """imf.py::iMeanFlow.forward given its draws: ``t, r, fm_mask`` (sample_tr), ``e``,
    ``t_min, t_max`` (sample_cfg_interval, fm rows already [0, 1]), ``omega``
    (sample_cfg_scale) and ``drop_u`` (cond_drop's uniform)."""
    x = images
    bz = x.shape[0]

    def bc(a: Tensor) -> Tensor:  # (bz,) -> (bz, 1, ...)
        return a.reshape(bz, *([1] * (x.dim() - 1)))

    def v_cond_fn(x, t, omega, y):
        h, t_min, t_max = torch.zeros_like(t), torch.zeros_like(t), torch.ones_like(t)
        return net(x, t, h, omega, t_min, t_max, y)[1]

    def v_fn(x, t, omega, y):
        x = torch.cat([x, x], dim=0)
        y_null = torch.full((bz,), num_classes, dtype=torch.long)
        y = torch.cat([y, y_null], dim=0)
        t = torch.cat([t, t], dim=0)
        w = torch.cat([omega, torch.ones_like(omega)], dim=0)
        v_c, v_u = v_cond_fn(x, t, w, y).chunk(2, dim=0)
        return v_c, v_u

    def guidance_fn(v_t, z_t, t, r, y, fm_mask, w, t_min, t_max):
        v_c, v_u = v_fn(z_t, t, w, y)
        v_g_fm = v_t + bc(1 - 1 / w) * (v_c - v_u)
        w = torch.where((t >= t_min) & (t <= t_max), w, torch.ones_like(w))
        v_c = v_cond_fn(z_t, t, w, y)
        v_g = v_t + bc(1 - 1 / w) * (v_c - v_u)
        v_g = torch.where(bc(fm_mask), v_g_fm, v_g)
        return v_g, v_c

    def cond_drop(v_t, v_g, labels):
        rand_mask = drop_u < class_dropout_prob
        num_drop = rand_mask.sum()
        drop_mask = torch.arange(bz) < num_drop
        labels = torch.where(drop_mask, num_classes, labels)
        v_g = torch.where(bc(drop_mask), v_t, v_g)
        return labels, v_g

    z_t = (1 - bc(t)) * x + bc(t) * e
    v_t = e - x
    v_g, v_c = guidance_fn(v_t, z_t, t, r, labels, fm_mask, omega, t_min, t_max)
    labels, v_g = cond_drop(v_t, v_g, labels)

    def u_fn(z_t, t, r):
        return net(z_t, t, t - r, omega, t_min, t_max, labels)

    u, v = u_fn(z_t, t, r)
    _, (du_dt, _) = torch.func.jvp(u_fn, (z_t, t, r), (v_c, torch.ones_like(t), torch.zeros_like(t)))
    V = u + bc(t - r) * du_dt.detach()
    v_g = v_g.detach()

    def adp_wt_fn(loss):
        return loss / ((loss + norm_eps) ** norm_p).detach()

    loss_u = adp_wt_fn(((V - v_g) ** 2).flatten(1).sum(dim=1))
    loss_v = adp_wt_fn(((v - v_g) ** 2).flatten(1).sum(dim=1))
    return (loss_u + loss_v).mean()




def build_model(kind: str) -> nn.Module:
    torch.manual_seed(11)
    if kind == "local":
        return TwoHeadField().double()
    model = MLP(data_dim=3, hidden=24, depth=3, time_embed_dim=4, num_classes=NUM_CLASSES, num_conds=3, aux_head=True)
    with torch.no_grad():  # the conditions' and heads' weights off any zero initialisation
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.double()


@pytest.mark.parametrize("jvp_mode", ["fused", "separate"])
@pytest.mark.parametrize("kind", ["local", "mlp"])
def test_full_forward_matches_imf_py(kind: str, jvp_mode: str) -> None:
    """loss_u + loss_v with per-row ω and interval, v_c and v_u from the auxiliary head and
    iMF's class drop: the loss and every gradient equal the transcription's."""
    n, drop_prob = 32, 0.3
    model = build_model(kind)
    batch = labelled_batch(n, 3, NUM_CLASSES)
    loss_fn = IMFLoss(num_classes=NUM_CLASSES, class_drop_prob=drop_prob, class_drop="imeanflow", num_conds=3, aux_head=True,
                      jvp_mode=jvp_mode)
    torch.manual_seed(4)
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    torch.manual_seed(4)  # the loss's draws, in its order: pairs, t_min, t_max, ω, the class drop
    s, t = loss_fn.pair_sampler.sample(n, torch.device("cpu"))
    fm = s == t
    t_min = torch.rand(n) * (0.5 - 0.0) + 0.0  # jax.random.uniform(minval=0, maxval=0.5)
    t_max = torch.rand(n) * (1.0 - 0.5) + 0.5
    t_min, t_max = torch.where(fm, 0.0, t_min), torch.where(fm, 1.0, t_max)
    u = torch.rand(n)
    omega = torch.exp(u * torch.log1p(torch.tensor(7.0)))  # sample_cfg_scale, cfg_beta = 1, s_max = 7, float32
    drop_u = torch.rand(n)
    t_p, r_p = 1 - s.double(), 1 - t.double()
    # the draws reach every branch: half the rows s = t, first (imf.py::sample_tr); rows
    # on both sides of their interval (w = 1); a dropped count below the s = t rows
    assert torch.equal(fm, torch.arange(n) < n // 2)
    before, after = ~fm & (t_p < t_min.double()), ~fm & (t_p > t_max.double())
    assert int(before.sum()) > 0 and int(after.sum()) > 0 and int((before | after).sum()) < n // 2
    assert 0 < int((drop_u < drop_prob).sum()) < n // 2
    model.zero_grad()
    expected = reference_imf_loss(paper_net(model), batch.raw_target, batch.raw_source, t_p, r_p, fm, t_min.double(),
                                  t_max.double(), omega.double(), drop_u, batch.label, NUM_CLASSES, drop_prob, 1.0, 0.01)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    assert relative(loss.detach(), expected.detach()) <= TOL
    for (name, _), g, g_ref in zip(model.named_parameters(), grads, expected_grads, strict=True):
        assert g_ref.norm() > 0, name  # every parameter takes part
        assert relative(g, g_ref) <= TOL, (name, relative(g, g_ref))


def test_the_comparison_can_fail() -> None:
    """Not vacuous: independent drops move the loss off the transcription, and the u part of
    the loss (``mse``) reads the auxiliary head, through v_c and v_u alone."""
    n = 32
    model, batch = build_model("local"), labelled_batch(n, 3, NUM_CLASSES)
    common = {"num_classes": NUM_CLASSES, "class_drop_prob": 0.3, "num_conds": 3, "aux_head": True}

    def run(loss_fn: IMFLoss) -> tuple[Tensor, Tensor]:
        torch.manual_seed(4)
        loss = loss_fn(model, batch).detach()
        return loss, loss_fn.metrics["mse"]

    faithful, mse = run(IMFLoss(**common, class_drop="imeanflow"))
    assert relative(run(IMFLoss(**common, class_drop="independent"))[0], faithful) > 1e-6
    with torch.no_grad():
        model.v_out.bias.add_(0.5)
    assert relative(run(IMFLoss(**common, class_drop="imeanflow"))[1], mse) > 1e-6


def test_class_drop_count_is_binomial_on_the_first_rows() -> None:
    """iMF's class drop (imf.py::cond_drop): the dropped rows are always the first rows, and
    their count follows Binomial(n, p). Over N batches each count's frequency lies within
    5 binomial standard errors of its probability (and within 0.005 absolute for a
    count of probability near 0), and the mean count within 5 standard errors of n p."""
    n, p, trials = 16, 0.2, 20_000
    torch.manual_seed(0)
    label = torch.zeros(n, dtype=torch.long)
    counts = torch.zeros(n + 1)
    for _ in range(trials):
        dropped = training_labels(label, NUM_CLASSES, p, first_rows=True) == NUM_CLASSES
        k = int(dropped.sum())
        assert torch.equal(dropped, torch.arange(n) < k)  # a prefix
        counts[k] += 1
    freq = counts / trials
    for k in range(n + 1):
        pmf = math.comb(n, k) * p**k * (1 - p) ** (n - k)
        assert abs(float(freq[k]) - pmf) <= 5 * math.sqrt(pmf * (1 - pmf) / trials) + 0.005 * (pmf < 1e-3), (k, freq[k], pmf)
    mean = float((torch.arange(n + 1) * freq).sum())
    assert abs(mean - n * p) <= 5 * math.sqrt(n * p * (1 - p) / trials)
    # independent drops are not a prefix: the placement check can fail
    torch.manual_seed(0)
    scattered = [training_labels(label, NUM_CLASSES, p) == NUM_CLASSES for _ in range(200)]
    assert any(not torch.equal(d, torch.arange(n) < int(d.sum())) for d in scattered)


def test_dropped_rows_are_the_first_rows_of_a_training_step() -> None:
    """Through the loss: the labels the JVP sees are ∅ on a prefix of the batch, which under
    the imeanflow law lies in its s = t rows for a count below half the batch."""
    n = 32
    seen: list[Tensor] = []

    class Recording(TwoHeadField):
        def forward(self, z, y=None, aug=None, cond=None, head="u"):
            if head == "both":
                seen.append(y.clone())
            return super().forward(z, y, aug, cond, head)

    torch.manual_seed(11)
    model = Recording().double()
    loss_fn = IMFLoss(num_classes=NUM_CLASSES, class_drop_prob=0.3, class_drop="imeanflow", num_conds=3, aux_head=True)
    for seed in range(20):
        torch.manual_seed(seed)
        loss_fn(model, labelled_batch(n, 3, NUM_CLASSES, seed))
    for labels in seen:
        dropped = labels == NUM_CLASSES
        assert torch.equal(dropped, torch.arange(n) < int(dropped.sum()))
    assert sum(int((y == NUM_CLASSES).sum()) for y in seen) > 0
