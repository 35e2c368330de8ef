"""Several EMAs (the MeanFlow reference keeps three) and the raw weights: updated
together, checkpointed, evaluated under their own prefixes; ``eval_checkpoint`` picks one."""

import json

import pytest
import torch
from torch import nn

from runs.checkpoint import read_checkpoint
from runs.ema import EMA, EMASet
from tests.conftest import TINY_OVERRIDES, last_line, launch, run_layout


def test_every_ema_follows_its_own_decay():
    model = nn.Linear(3, 1, bias=False)
    emas = EMASet(model, decay=0.9, decays=[0.9, 0.5, 0.0])  # 0.9 is the main one: kept once
    assert sorted(emas.extra) == ["0", "0.5"]
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    emas.update(model, batch_size=1)
    # one step of ema <- decay * ema + (1 - decay) * w from the initial weights
    for decay, module in [(0.9, emas.module), (0.5, emas.extra["0.5"].module), (0.0, emas.extra["0"].module)]:
        torch.testing.assert_close(module.weight, start + (1 - decay) * 1.0)
    entries = emas.checkpoint_entries()
    assert set(entries["emas"]) == {"0", "0.5"}
    again = EMASet(model, decay=0.9, decays=[0.5, 0.0, 0.25])  # 0.25 added on resume: starts from the main EMA
    again.load_checkpoint(entries)
    torch.testing.assert_close(again.extra["0.5"].module.weight, emas.extra["0.5"].module.weight)
    torch.testing.assert_close(again.extra["0.25"].module.weight, emas.module.weight)


def test_halflife_main_ema_keeps_every_listed_decay():
    emas = EMASet(nn.Linear(2, 2), decay=0.999, halflife_samples=1000, decays=[0.999])
    assert list(emas.extra) == ["0.999"]  # the main one follows the half-life, not 0.999
    assert isinstance(emas.main, EMA)


@pytest.mark.slow
def test_run_logs_each_ema_and_the_raw_weights_and_eval_checkpoint_picks_one(tmp_path):
    out = tmp_path / "out"
    common = [*TINY_OVERRIDES, "epochs=2", f"output_dir={out}", "ema.decays=[0.9,0.5]", "eval.raw_weights=true"]
    result = launch(["run_name=emas", *common], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run, evaluated = run_layout(out, "emas"), run_layout(tmp_path / "eval", "emas")
    state = read_checkpoint(run.last)
    assert set(state["emas"]) == {"0.5"}  # 0.9 is the main one (ema.decay=0.9 in the tiny config)
    metrics = state["metrics"]
    for prefix in ("eval", "eval_ema0.5", "eval_raw"):
        assert metrics[f"{prefix}/energy_distance"] > 0
    assert len({metrics["eval/energy_distance"], metrics["eval_ema0.5/energy_distance"], metrics["eval_raw/energy_distance"]}) == 3

    picked = launch([f"eval_checkpoint={run.last}", "eval.weights=0.5", "device=cpu",
                     f"output_dir={tmp_path / 'eval'}"], cwd=tmp_path)
    assert picked.returncode == 0, picked.stderr[-2000:]
    (written,) = evaluated.eval_dir.glob("epoch_0002_0.5_*.json")
    assert json.loads(written.read_text())["eval/energy_distance"] == pytest.approx(metrics["eval_ema0.5/energy_distance"], rel=1e-9)
    raw = launch([f"eval_checkpoint={run.last}", "eval.weights=raw", "device=cpu",
                  f"output_dir={tmp_path / 'eval'}"], cwd=tmp_path)
    (written,) = evaluated.eval_dir.glob("epoch_0002_raw_*.json")
    assert raw.returncode == 0 and json.loads(written.read_text())["eval/energy_distance"] == pytest.approx(
        metrics["eval_raw/energy_distance"], rel=1e-9)
    missing = launch([f"eval_checkpoint={run.last}", "eval.weights=0.7", "device=cpu",
                      f"output_dir={tmp_path / 'eval'}"], cwd=tmp_path)
    assert missing.returncode == 2 and last_line(missing.stderr).startswith("error: eval.weights=0.7") and "0.5" in last_line(missing.stderr)


def test_warmup_caps_the_decay_and_forgets_the_initial_weights():
    ema = EMA(nn.Linear(1, 1), decay=0.999, warmup=True)
    assert ema.decay_for(512, 0) == pytest.approx(0.1)
    assert ema.decay_for(512, 890) == pytest.approx(0.99)
    assert ema.decay_for(512, 10**7) == pytest.approx(0.999)
    assert EMA(nn.Linear(1, 1), decay=0.999).decay_for(512, 0) == 0.999  # off by default
    # n updates towards constant weights keep prod_k decay_k of the initial weights
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.999, warmup=True)
    start = float(ema.module.weight)
    with torch.no_grad():
        model.weight.fill_(1.0)
    left = 1.0
    for n in range(100):
        ema.update(model, 512, n)
        left *= (1 + n) / (10 + n)
    assert float(ema.module.weight) == pytest.approx(1.0 + (start - 1.0) * left, rel=1e-5, abs=1e-7)
