"""Multi-process training: ``torchrun --nproc_per_node 2`` with gloo on the CPU.

The worker (tests/ddp_worker.py) drives the real Trainer; these tests recompute its
first step in one process, compare the ranks' weights, spring the two DDP traps
(the loss outside DDP's forward; a NaN on one rank only), and resume the
2-process checkpoint in a single process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import launcher
import train
from dataloaders.base_dataloaders import BaseItem, collate_base_items
from losses.base_loss import build_loss
from runs.build import build_model
from runs.checkpoint import read_checkpoint
from tests.conftest import run_layout

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "trackio.enabled=false", "epochs=2", "model.hidden=32", "dataloaders.dataset.num_samples=512", "batch_size=64",
    "eval.num_samples=64", "eval.steps=4", "eval.plot=false", "grad_clip=0", "warmup_steps=0",
]

pytestmark = pytest.mark.slow


def torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    # One thread per process: two ranks share this machine's two cores.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def failure(result: subprocess.CompletedProcess) -> str:
    """The first traceback (the rank that failed first), then the tail."""
    first = result.stderr.find("Traceback")
    native = [line for line in result.stderr.splitlines() if "terminate called" in line or "what():" in line]
    return "\n".join(native) + "\n" + result.stderr[max(first, 0):][:3000] + "\n...\n" + result.stderr[-1500:]


def compose(overrides: list[str]):
    cfg = launcher.compose(overrides)
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture(scope="module", params=["mse", "meanflow"])
def worker_run(request, tmp_path_factory) -> tuple[Path, list[str]]:
    loss = request.param
    out = tmp_path_factory.mktemp(f"ddp_{loss}")
    overrides = [f"run_name=ddp_{loss}", f"output_dir={out / 'outputs'}", f"loss={loss}", *TINY]
    result = torchrun(["tests/ddp_worker.py", str(out), *overrides])
    assert result.returncode == 0, failure(result)
    return out, overrides


def test_first_step_gradients_equal_one_process_on_the_combined_batch(worker_run):
    """DDP's averaged gradient = the gradient of the mean loss over both ranks' batches,
    each drawn with its rank's random state (MeanFlow draws its own (s, t) in the loss)."""
    out, overrides = worker_run
    cfg = compose(overrides)
    ranks = [torch.load(out / f"step1_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ranks[0]["init"]:
        assert torch.equal(ranks[0]["init"][name], ranks[1]["init"][name]), f"{name}: DDP did not broadcast rank 0's weights"
    assert not torch.equal(ranks[0]["batch"]["raw_target"], ranks[1]["batch"]["raw_target"]), "the ranks saw the same data"

    model = build_model(cfg.model)
    model.load_state_dict(ranks[0]["init"])
    loss_fn = build_loss(cfg.loss)
    losses = []
    for rank in ranks:
        torch.set_rng_state(rank["rng"])
        losses.append(train.LossModule(model, loss_fn)(BaseItem(**rank["batch"])))
    torch.stack(losses).mean().backward()
    for name, p in model.named_parameters():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), f"{name}: ranks hold different gradients"
        torch.testing.assert_close(ranks[0]["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=f"{name}: DDP gradient != one-process gradient")

    if cfg.loss.name == "mse":  # each rank's times drawn from its RNG state, then literally one batch of 2 x 64
        model.zero_grad(set_to_none=True)
        items = []
        for rank in ranks:
            torch.set_rng_state(rank["rng"])
            raw = BaseItem(**rank["batch"])
            items.append(raw.at_time(loss_fn.time_sampler.sample(len(raw), torch.device("cpu"))))
        both = collate_base_items(items)
        train.LossModule(model, loss_fn)(both).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(ranks[0]["grads"][name], p.grad, rtol=1e-5, atol=1e-6)


def test_ranks_hold_bit_identical_weights_after_training(worker_run):
    out, _ = worker_run
    final = [torch.load(out / f"final_rank{r}.pt", weights_only=True) for r in (0, 1)]
    initial = torch.load(out / "step1_rank0.pt", weights_only=True)["init"]
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), f"{name} differs between the ranks"
    assert any(not torch.equal(final[0][k], initial[k]) for k in initial), "the weights never changed"


def test_skipping_the_ddp_forward_is_caught_and_a_nan_on_one_rank_stops_all(worker_run):
    out, _ = worker_run
    for rank in (0, 1):
        desync, nan = (out / f"traps_rank{rank}.txt").read_text().splitlines()
        assert desync.startswith("ranks disagree after step"), desync
        assert "gradient synchronisation is broken" in desync
        assert nan.startswith("loss became non-finite on 1 of 2 ranks at step"), nan


def test_launcher_under_torchrun_then_resume_in_one_process(tmp_path):
    outputs = tmp_path / "outputs"
    args = ["run_name=pair", f"output_dir={outputs}", *TINY]
    result = torchrun(["launcher.py", *args])
    assert result.returncode == 0, failure(result)
    assert result.stdout.count("run pair:") == 1, "only rank 0 prints"
    assert result.stdout.count("epoch 2/2 step 8") == 1, result.stdout  # 512 / (64 x 2 ranks) = 4 steps an epoch
    last = run_layout(outputs, "pair").last
    state = read_checkpoint(last)
    assert (state["epoch"], state["step"]) == (2, 8)
    assert state["config"]["batch_size"] == 64

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | {"OMP_NUM_THREADS": "1"}
    resumed = subprocess.run([sys.executable, "launcher.py", *[a.replace("epochs=2", "epochs=3") for a in args], "resume=true"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = read_checkpoint(last)
    assert (state["epoch"], state["step"]) == (3, 16)  # one process: 512 / 64 = 8 steps in epoch 3
    for name, value in state["model"].items():
        assert torch.isfinite(value).all(), name
