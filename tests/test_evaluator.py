"""The evaluator and ``eval_checkpoint``: test-time guidance reaches the model as its
conditions, never its auxiliary head, and the result file records what was used; a
consistency sampler's fresh noise is the same at every evaluation."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

import launcher
from evaluation import evaluator as evaluator_module
from evaluation.evaluator import Evaluator
from losses.base_loss import build_loss
from models.unified_input import split_unified_input
from runs.build import build_model
from runs.checkpoint import save_checkpoint
from runs.layout import RunLayout
from solvers.sampling import ConsistencySampler
from tests.conftest import TINY_OVERRIDES, compose_train

# A class-conditional 2-D model that takes iMF's guidance conditions [ω, lo, hi] and has the auxiliary head.
IMF_CONDITIONED = ["dataloaders=kmeans", "dataloaders.dataset.num_samples=300", "model.num_classes=${dataloaders.num_classes}",
                   "loss=imf", "loss.class_drop_prob=0.1", "model.num_conds=3", "model.aux_head=true", "eval.num_samples=60",
                   "eval.repeats=1", "eval.steps=4", "eval.meanflow_steps=[1,2]"]


class RecordingModel(nn.Module):
    """Calls ``model`` and records the times, conditions and head of every call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, z: Tensor, y: Tensor | None = None, aug: Tensor | None = None, cond: Tensor | None = None,
                head: str = "u") -> Tensor:
        _, s, t = split_unified_input(z)
        self.calls.append({"s": s.clone(), "t": t.clone(), "cond": cond, "head": head})
        return self.model(z, y, aug, cond=cond, head=head)


def assert_guided_as(calls: list[dict], omega: float, lo: float, hi: float) -> tuple[int, int]:
    """Jumps (s < t) get ``[ω, lo, hi]``; the diagonal gets ``[w, 0, 1]``, w = ω on [lo, hi], else 1.
    No call asks for the auxiliary head. Returns the number of jump and diagonal calls."""
    jumps = [c for c in calls if bool((c["s"] < c["t"]).all())]
    diagonal = [c for c in calls if bool((c["s"] == c["t"]).all())]
    assert calls and len(jumps) + len(diagonal) == len(calls)
    assert {c["head"] for c in calls} == {"u"}
    for c in jumps:
        expected = torch.tensor([omega, lo, hi], dtype=c["cond"].dtype).expand_as(c["cond"])
        torch.testing.assert_close(c["cond"], expected, rtol=0, atol=1e-7)
    for c in diagonal:
        inside = (c["s"] >= lo) & (c["s"] <= hi)
        w = torch.where(inside, torch.full_like(c["s"], omega), torch.ones_like(c["s"]))
        torch.testing.assert_close(c["cond"], torch.stack([w, torch.zeros_like(w), torch.ones_like(w)], 1), rtol=0, atol=1e-7)
    assert not diagonal or any(bool(((c["s"] >= lo) & (c["s"] <= hi)).any()) for c in diagonal)  # the interval was met
    return len(jumps), len(diagonal)


@pytest.mark.parametrize(("settings", "expected"), [
    (["eval.guidance_scale=4", "eval.guidance_interval=[0.4,0.65]"], (4.0, 0.4, 0.65)),
    (["eval.guidance_scale=null", "loss.cfg_omega=2.5", "loss.cfg_interval=[0.2,0.5]"], (2.5, 0.2, 0.5)),  # the loss's defaults
])
def test_guidance_settings_reach_the_model_in_evaluation(settings, expected):
    cfg = compose_train([*TINY_OVERRIDES, *IMF_CONDITIONED, *settings])
    torch.manual_seed(0)
    model = RecordingModel(build_model(cfg.model))
    metrics, _ = Evaluator(cfg, build_loss(cfg.loss), torch.device("cpu"))(model)
    assert min(assert_guided_as(model.calls, *expected)) > 0
    assert {"eval/energy_distance_1step", "eval/energy_distance_2step"} <= set(metrics)


@pytest.fixture
def imf_checkpoint(tmp_path):
    cfg = compose_train([*TINY_OVERRIDES, *IMF_CONDITIONED, "eval.guidance_scale=2", f"output_dir={tmp_path / 'outputs'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    layout = RunLayout(tmp_path / "outputs", "mlp", "test")
    state = {"model": model.state_dict(), "ema": model.state_dict(), "step": 8, "epoch": 1,
             "config": OmegaConf.to_container(cfg, resolve=True), "metrics": {}}
    save_checkpoint(state, layout.last)
    return layout


def test_eval_checkpoint_guides_with_the_command_line_and_records_it(imf_checkpoint, tmp_path, monkeypatch, capsys):
    recorded: list[RecordingModel] = []
    load = evaluator_module.load_model_from_checkpoint

    def recording_load(*args, **kwargs):
        model, cfg, state = load(*args, **kwargs)
        recorded.append(RecordingModel(model))
        return recorded[-1], cfg, state

    monkeypatch.setattr(evaluator_module, "load_model_from_checkpoint", recording_load)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval_out"
    args = [f"eval_checkpoint={imf_checkpoint.last}", f"output_dir={out}", "device=cpu",
            "eval.guidance_scale=4", "eval.guidance_interval=[0.4,0.65]"]
    assert launcher.main(args) == 0, capsys.readouterr().err
    assert min(assert_guided_as(recorded[0].calls, 4.0, 0.4, 0.65)) > 0
    (written,) = RunLayout(out, "mlp", "test").eval_dir.glob("*.json")
    result = json.loads(written.read_text())
    assert result["settings"]["eval"]["guidance_scale"] == 4 and result["settings"]["eval"]["guidance_interval"] == [0.4, 0.65]
    for name in ("meanflow1", "meanflow2", "euler4"):
        assert result["samplers"][name]["omega"] == 4.0 and result["samplers"][name]["interval"] == [0.4, 0.65], name
    assert result["samplers"]["meanflow2"]["times"] == [0.0, 0.5, 1.0]
    assert "eval.guidance_scale=4 eval.guidance_interval=[0.4, 0.65]" in capsys.readouterr().out
    # The stored setting when the command line names none.
    assert launcher.main(args[:3]) == 0
    assert min(assert_guided_as(recorded[1].calls, 2.0, 0.0, 1.0)) > 0


def test_a_consistency_samplers_noise_is_the_same_at_every_evaluation(monkeypatch):
    """The evaluator restarts the sampler's own noise before each set: two evaluations of
    the same weights agree, and so do chunks of another size."""
    cfg = compose_train([*TINY_OVERRIDES, "loss=meanflow", "eval.num_samples=60", "eval.repeats=1"])
    loss = build_loss(cfg.loss)
    monkeypatch.setattr(type(loss), "samplers", lambda self, *a: {"consistency3": ConsistencySampler(3)})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    evaluator = Evaluator(cfg, loss, torch.device("cpu"))
    first, samples = evaluator(model)
    torch.randn(5)  # the global stream moves; the evaluation must not
    second, again = evaluator(model)
    cfg.eval.batch_size = 7
    chunked, in_chunks = Evaluator(cfg, loss, torch.device("cpu"))(model)
    assert first == second and torch.equal(samples["consistency3"], again["consistency3"])
    # Other chunks round the network's sums differently; other noise would move samples by O(1).
    torch.testing.assert_close(in_chunks["consistency3"], samples["consistency3"], rtol=1e-4, atol=1e-4)
    assert chunked == pytest.approx(first, rel=1e-4)
    assert first["eval/nfe_3step_consistency"] == 3.0
