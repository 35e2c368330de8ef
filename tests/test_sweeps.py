"""Sweeps through the launcher (``python launcher.py -m ...``): Hydra's multirun with its basic
launcher, with joblib's, re-evaluation as a sweep, the SLURM launcher's composed config, and a
job preempted under submitit's local executor that is requeued and resumes bit-exactly.

Each training job is a run of its own named after the keys the sweep varies, composed and
trained as the same overrides typed without ``-m``. The preempted job pauses after a step it
reports (a ``sitecustomize`` on the job's PYTHONPATH wraps ``Trainer.train_step`` in the
process submitit starts), so the test signals it at that step, not at a timer's moment.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import launcher
from runs.checkpoint import read_checkpoint
from scripts import compare
from tests.conftest import HANG_GUARD_S, LAUNCHER, TINY_OVERRIDES, launch, launcher_env, run_layout

pytestmark = pytest.mark.slow

TINY = [*TINY_OVERRIDES, "epochs=1"]
RUNS = {"cmp_loss-meanflow_seed-0": ("meanflow", 0), "cmp_loss-meanflow_seed-1": ("meanflow", 1),
        "cmp_loss-mse_seed-0": ("mse", 0), "cmp_loss-mse_seed-1": ("mse", 1)}


def sweep_dir(output_dir: Path) -> Path:
    (found,) = (output_dir / "sweeps").iterdir()  # one sweep per output folder in these tests
    return found


def outcomes(output_dir: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in sweep_dir(output_dir).rglob(launcher.OUTCOME)), key=lambda o: o["job"])


@pytest.fixture(scope="module")
def basic(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """2 losses x 2 seeds with Hydra's basic launcher: one job after the other, in one process."""
    root = tmp_path_factory.mktemp("basic")
    out = root / "outputs"
    result = launch(["-m", "run_name=cmp", "loss=mse,meanflow", "seed=0,1", *TINY, f"output_dir={out}"], cwd=root)
    return out, result


def test_a_sweep_runs_every_combination_as_a_run_named_after_its_settings(basic):
    out, result = basic
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep: 4 of 4 jobs finished" in result.stdout
    for run, (loss, seed) in RUNS.items():
        config = read_checkpoint(run_layout(out, run).last)["config"]
        assert (config["run_name"], config["loss"]["name"], config["seed"]) == (run, loss, seed)
        # what the job trained is what the same overrides give typed without -m
        typed = launcher.composed([f"run_name={run}", f"loss={loss}", f"seed={seed}", *TINY, f"output_dir={out}"])
        assert config == OmegaConf.to_container(typed)
    assert [o["exit_status"] for o in outcomes(out)] == [0, 0, 0, 0]
    assert sorted(o["run_name"] for o in outcomes(out)) == sorted(RUNS)


def test_compare_reads_the_sweep(basic, capsys):
    out, _ = basic
    assert compare.main(["cmp*", "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "# 4 runs in 2 groups" in table
    assert "| loss=meanflow | 2 |" in table and "| loss=mse | 2 |" in table


@pytest.fixture
def sweep_env(monkeypatch):
    """``launcher.main(["-m", ...])`` in this process sets these for the processes a sweep starts."""
    for key in ("SUBMITIT_PREEMPT_SIGNAL", "HYDRA_FULL_ERROR", "PYTHONPATH"):
        monkeypatch.delenv(key, raising=False)


def test_the_same_sweep_again_refuses_to_clobber_its_runs(basic, tmp_path, sweep_env, capsys):
    out, _ = basic
    code = launcher.main(["-m", "run_name=cmp", "loss=mse,meanflow", "seed=0,1", *TINY, f"output_dir={out}",
                          f"hydra.sweep.dir={tmp_path / 'again'}"])
    assert code == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: job ")]
    assert len(failed) == 4  # one line per failed job, at the end
    assert all("already has" in line and "overwrite=true" in line for line in failed)


def test_eval_checkpoint_as_a_sweep(basic, tmp_path, sweep_env, capsys):
    out, _ = basic
    paths = ",".join(str(run_layout(out, run).last) for run in ("cmp_loss-mse_seed-0", "cmp_loss-meanflow_seed-1"))
    code = launcher.main(["-m", f"eval_checkpoint={paths}", "eval.steps=1,2", "eval.num_samples=100", "eval.repeats=1",
                          "device=cpu", f"output_dir={tmp_path / 'eval'}"])
    assert code == 0
    assert "sweep: 4 of 4 jobs finished" in capsys.readouterr().out
    for run in ("cmp_loss-mse_seed-0", "cmp_loss-meanflow_seed-1"):
        written = [json.loads(p.read_text()) for p in run_layout(tmp_path / "eval", run).eval_dir.glob("*.json")]
        assert sorted(r["settings"]["eval"]["steps"] for r in written) == [1, 2]


def test_joblib_runs_jobs_side_by_side_and_a_failed_job_is_one_line(tmp_path):
    out = tmp_path / "outputs"
    result = launch(["-m", "run_name=par", *TINY, "batch_size=64,1024", f"output_dir={out}",
                     "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], cwd=tmp_path)
    assert result.returncode == 1
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("error: job ")]
    assert failed == ["error: job 1 (par_batch_size-1024) exit 2: batch_size=1024 exceeds the training set (512 samples per epoch)"]
    assert read_checkpoint(run_layout(out, "par_batch_size-64").last)["epoch"] == 1
    assert not run_layout(out, "par_batch_size-1024").run_dir.exists()


def test_the_slurm_launchers_composed_config(sweep_env, capsys):
    code = launcher.main(["-m", "run_name=cmp", "experiment=demo_meanflow,demo_imf", "seed=0,1,2",
                          "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"])
    assert code == 0
    hydra_cfg = yaml.safe_load(capsys.readouterr().out)["hydra"]
    slurm = hydra_cfg["launcher"]
    assert slurm["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (slurm["partition"], slurm["timeout_min"], slurm["signal_delay_s"], slurm["max_num_timeout"]) == ("gpu", 60, 120, 0)
    assert slurm["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert hydra_cfg["sweep"]["dir"].startswith("${output_dir}/sweeps/")
    assert hydra_cfg["job"]["chdir"] is False and hydra_cfg["mode"] == "MULTIRUN"
    assert hydra_cfg["job"]["override_dirname"] == "experiment-demo_meanflow_seed-0"  # the first job's
    assert os.environ["SUBMITIT_PREEMPT_SIGNAL"] == "USR1"  # submitit signals what train.py checkpoints on


def test_a_job_records_the_command_that_reruns_it_alone(sweep_env, monkeypatch, tmp_path):
    """What trackio's ``command`` holds for each job: the job's own overrides typed without
    ``-m`` (quoted for a shell), not the sweep's line."""
    from evaluation.tracking import command_line

    recorded = []
    monkeypatch.setattr(launcher, "run", lambda overrides, backend: recorded.append(command_line()) or 0)
    monkeypatch.setattr(sys, "argv", ["launcher.py", "-m"])
    monkeypatch.chdir(tmp_path)
    assert launcher.main(["-m", "run_name=cmp", "seed=0,1", "eval.guidance_interval=[0.1,0.9]"]) == 0
    assert recorded == [f"python launcher.py seed={seed} 'eval.guidance_interval=[0.1,0.9]' run_name=cmp_seed-{seed}"
                        for seed in (0, 1)]
    assert sys.argv == ["launcher.py", "-m"]  # the sweep's own, once it is over


@pytest.mark.parametrize(("argv", "needle"), [
    (["-m", "seed=0,1"], "error: run_name is required"),
    (["-m", "run_name=x", "experiment=nope,demo_imf"], "error: In 'train': Could not find 'experiment/nope'"),
    (["-m", "run_name=x", "seed=0,,1"], "error: Error parsing override 'seed=0,,1'"),
])
def test_a_sweep_that_cannot_start_is_one_line(sweep_env, capsys, monkeypatch, tmp_path, argv, needle):
    monkeypatch.chdir(tmp_path)  # Hydra writes the sweep's multirun.yaml before it composes the jobs
    assert launcher.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(needle) and "\n" not in err


# The process submitit starts for a job imports this (PYTHONPATH), and pauses the run after
# optimizer step DZ_TEST_PAUSE_AT: it writes its pid to HANDSHAKE/paused and waits for HANDSHAKE/release.
GATE = """
import importlib.abc, importlib.util, os, sys, time
from pathlib import Path

class GatedTrain(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "train":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            step, pause_at, handshake = module.Trainer.train_step, int(os.environ["DZ_TEST_PAUSE_AT"]), Path(os.environ["DZ_TEST_HANDSHAKE"])

            def gated_step(trainer, batch):
                step(trainer, batch)
                if trainer.step == pause_at:
                    (handshake / "paused").write_text(str(os.getpid()))
                    while not (handshake / "release").exists():
                        time.sleep(0.05)

            module.Trainer.train_step = gated_step

        spec.loader.exec_module = exec_module
        return spec

if "DZ_TEST_PAUSE_AT" in os.environ:
    sys.meta_path.insert(0, GatedTrain())
"""
PAUSE_AT = 5  # of the 8 steps of a TINY epoch


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + HANG_GUARD_S  # a guard against a hang, not a measurement
    while not path.exists():
        assert proc.poll() is None, f"the sweep ended before its job reached step {PAUSE_AT}"
        assert time.monotonic() < deadline, f"no job reached step {PAUSE_AT}"
        time.sleep(0.05)


def test_a_preempted_submitit_job_is_requeued_and_resumes_bit_exactly(basic, tmp_path):
    gate, handshake, out = tmp_path / "gate", tmp_path / "handshake", tmp_path / "outputs"
    gate.mkdir()
    handshake.mkdir()
    (gate / "sitecustomize.py").write_text(GATE)
    env = launcher_env(tmp_path / ".trackio-unused") | {
        "PYTHONPATH": str(gate), "DZ_TEST_PAUSE_AT": str(PAUSE_AT), "DZ_TEST_HANDSHAKE": str(handshake)}
    with (tmp_path / "sweep.out").open("w") as stdout, (tmp_path / "sweep.err").open("w") as stderr:
        sweep = subprocess.Popen([sys.executable, str(LAUNCHER), "-m", "run_name=pre", "loss=mse", "seed=0", *TINY,
                                  f"output_dir={out}", "hydra/launcher=submitit_local"], cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
        try:
            wait_for(handshake / "paused", sweep)
            os.kill(int((handshake / "paused").read_text()), signal.SIGUSR1)  # what SLURM sends before it takes the node
            (handshake / "release").touch()
            assert sweep.wait(timeout=HANG_GUARD_S) == 0, (tmp_path / "sweep.err").read_text()[-3000:]
        finally:
            sweep.kill()

    job = sweep_dir(out) / "0"
    assert (job / launcher.PREEMPTED).read_text().startswith(f"stopped by SIGUSR1 at step {PAUSE_AT}; checkpoint written")
    assert [o["exit_status"] for o in outcomes(out)] == [0]  # written by the requeued job
    logs = "".join(p.read_text() for p in sweep_dir(out).rglob("*_log.*"))
    assert "Requeued job" in logs and logs.count("run pre: mlp") == 2  # submitit requeued it; it started twice

    # the same settings trained without a stop: the basic sweep's job loss=mse seed=0
    resumed, uninterrupted = read_checkpoint(run_layout(out, "pre").last), read_checkpoint(run_layout(basic[0], "cmp_loss-mse_seed-0").last)
    assert resumed["step"] == uninterrupted["step"] == 8
    for key in ("model", "ema"):
        for name, value in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name} differs from the uninterrupted run"
    assert resumed["metrics"] == uninterrupted["metrics"]
