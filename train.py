"""The training loop: the step, the schedule, the checkpoint cadence and the logging.

    run(cfg) ─┬─ eval_checkpoint set → evaluation.evaluator.evaluate_checkpoint
              └─ otherwise → Trainer(cfg).fit(): train_step (loss → backward → clip →
                 optimizer → EMA), then at boundaries log, evaluate (EMA), snapshot

The loss owns its times and samplers, ``dataloaders/`` the data, ``runs/`` the run's files,
checkpoints, device and RNG, ``evaluation/`` scores and records. Exact resume: epoch e's order is
fixed by (seed, e) and continues at the next batch; RNG states are saved with each checkpoint, so
a stopped and resumed run ends bit-identical on the CPU (docs/design.md, "Exact resume").
"""

import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataloaders.base_dataloaders import make_dataset, make_train_loader
from evaluation.evaluator import Evaluator, evaluate_checkpoint
from evaluation.tracking import RunRecord
from losses.base_loss import LossModule, build_loss
from runs.build import build_model, build_vae
from runs.checkpoint import read_checkpoint, save_checkpoint
from runs.device_metrics import DeviceMonitor
from runs.ema import EMASet
from runs.errors import Preempted, RunError, TrainingFailed
from runs.layout import RunLayout, resume_changes
from runs.machine import check_ranks_agree, process_group, rank_reseed, rewound_rng, rng_state, seed_everything
from runs.machine import set_rng_state, setup_machine, unwrap

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what clusters send before they take a job's machine


class NonFinite(TrainingFailed):
    """A step whose loss or gradient was not finite; nothing of it reached the weights."""

    def __init__(self, event: str, last: Path) -> None:
        self.event = event  # what failed, at which step and batch
        super().__init__(f"{event}; " + (f"the last good checkpoint is kept at {last}" if last.exists() else "no checkpoint was written yet"))


def lr_lambda(warmup_steps: int, schedule: str, total_steps: int, min_lr_ratio: float):
    """Linear warm-up from 1/warmup to 1 (MeanFlow, DiT setups), then constant or a
    cosine decay to ``min_lr_ratio`` at ``total_steps`` (SGDR, Loshchilov & Hutter 2017)."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    def __init__(self, cfg: DictConfig, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.cfg, self.rank, self.world, self.is_main = cfg, rank, world, rank == 0
        self.device = setup_machine(cfg, rank, world, local_rank)
        self.layout = RunLayout.of(cfg)
        resume_from = self.layout.start(cfg.resume, cfg.overwrite)  # refuses to clobber another run
        resume_state = read_checkpoint(resume_from, resume=True) if resume_from is not None else None
        self.vae = build_vae(cfg.dataloaders, self.device)  # latent data: one VAE encodes (mode=images) and decodes
        self.train_set = make_dataset(cfg.dataloaders, "train", self.vae)
        if len(self.train_set) < cfg.batch_size * world:
            raise RunError(f"batch_size={cfg.batch_size} exceeds the training set ({len(self.train_set)} samples per epoch)")
        self.model = build_model(cfg.model).to(self.device)
        self.loss_fn = build_loss(cfg.loss).to(self.device)
        self.ema = EMASet(self.model, cfg.ema.decay, cfg.ema.halflife_samples, list(cfg.ema.decays), cfg.ema.warmup)
        self.optimizer = instantiate(cfg.optimizer)(self.model.parameters())
        self.steps_per_epoch = len(self.train_set) // (cfg.batch_size * world)
        total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        schedule = lr_lambda(cfg.warmup_steps, cfg.lr_schedule, total_steps, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.autocast_dtype = PRECISIONS[cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        wrapped = LossModule(self.model, self.loss_fn)
        if world > 1:
            # DDP wraps the whole loss (the MeanFlow JVP included), so its hooks see every
            # parameter use and all-reduce the gradients; it also broadcasts rank 0's weights.
            wrapped = DistributedDataParallel(wrapped, device_ids=[local_rank] if self.device.type == "cuda" else None)
            self.ema.load_broadcast(self.model)  # the EMAs start from the broadcast weights
        # Batches have one shape (drop_last), so dynamic shapes only cost: with them on,
        # inductor failed to compile the MeanFlow JVP of the SmallCNN (torch 2.14).
        self.step_module = torch.compile(wrapped, mode=cfg.compile_mode, dynamic=False) if cfg.compile else wrapped
        self.ranks_checked = world == 1
        self.step = self.epoch = self.batch_in_epoch = 0  # batch_in_epoch: the epoch's batches behind (done or skipped)
        self.last_metrics: dict[str, float] = {}
        self.record = RunRecord()  # the rows logged (sent to trackio once each) and the batches skipped
        self.stop_signal: int | None = None  # set by the SIGTERM/SIGUSR1 handler
        if resume_state is not None:
            self._restore(resume_state)
        elif cfg.init_from:
            self._init_from(cfg.init_from)
        with rewound_rng(self.device):  # the probe must not shift the RNG stream (exact resume)
            probe = next(iter(make_train_loader(cfg, self.train_set, 0))).to(self.device)
            self.loss_fn.check(self.model, probe)
        self.evaluator = Evaluator(cfg, self.loss_fn, self.device, self.vae) if self.is_main else None
        # All input checked: hold the run folder, and fail now on unwritable outputs, not at the first save.
        self.run_lock = self.layout.claim(cfg.resume, cfg.overwrite, cfg.trackio.enabled) if self.is_main else None

    # --- run folder ------------------------------------------------------------------

    def _restore(self, state: dict, rollback: bool = False) -> None:
        """Everything a checkpoint holds, with this run's optimizer settings: on resume (which
        refuses another model, loss or data and says what changed) and on a rollback (this run's own last.pt)."""
        changes = {} if rollback else resume_changes(state["config"], OmegaConf.to_container(self.cfg, resolve=True))
        if self.is_main:
            print("".join(f"resume: {key} {was} -> {now}\n" for key, (was, now) in changes.items()), end="", flush=True)
        for target, key in ((self.model, "model"), (self.optimizer, "optimizer"), (self.scheduler, "scheduler"),
                            (self.scaler, "scaler"), (self.loss_fn, "loss")):
            target.load_state_dict(state[key])
        self.ema.load_checkpoint(state)
        # The optimizer's state dict brought the checkpoint's hyperparameters back: apply
        # this run's (a new lr, betas, horizon), so the recorded config is what is used.
        options = {k: tuple(v) if isinstance(v, list) else v
                   for k, v in OmegaConf.to_container(self.cfg.optimizer, resolve=True).items() if not k.startswith("_")}
        self.scheduler.base_lrs = [options["lr"]] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group |= options | {"initial_lr": options["lr"], "lr": options["lr"] * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)}
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.last_metrics = state["batch_in_epoch"], dict(state["metrics"])
        self.record.restore(state, rows_only=rollback)  # a rollback keeps the run's skips and count, newer than last.pt's
        set_rng_state(state["rng"])
        if self.world > 1:
            # Every rank loaded rank 0's RNG state; re-split the streams so the ranks
            # do not draw the same noise (DDP resume is exact in the data order only).
            seed_everything(rank_reseed(self.cfg.seed, self.rank, self.step))

    def _init_from(self, path: str) -> None:
        """Start from another run's weights (model and EMA), e.g. a flow-matching run seeding MeanFlow."""
        state = read_checkpoint(path)
        ours, saved = OmegaConf.to_container(self.cfg.model, resolve=True), state["config"]["model"]
        if ours != saved:
            raise RunError(f"init_from={path}: the checkpoint's model {saved} differs from this run's {ours}: use the same model settings")
        self.model.load_state_dict(state["model"])
        self.ema.load_checkpoint(state)

    # --- the step --------------------------------------------------------------------

    def train_step(self, batch) -> None:
        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.step_module(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # The gradient's norm is checked with the loss (fp16's scaler skips inf gradients itself): a finite
        # loss with a non-finite gradient would poison the weights, and the next batch would take the blame.
        unscaled = self.cfg.grad_clip > 0 and not self.scaler.is_enabled()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip) if unscaled else loss.new_zeros(())
        self._check_finite(loss.detach(), norm)
        if self.cfg.grad_clip > 0 and self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.ema.update(self.model, self.cfg.batch_size * self.world, self.step)
        self.step += 1
        self.batch_in_epoch += 1
        self.record.add({"loss": loss.detach(), **unwrap(self.loss_fn).metrics})
        if not self.ranks_checked:  # once, after the first step
            check_ranks_agree(self.model, self.step)
            self.ranks_checked = True

    def _check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm)]).float()
        if self.world > 1:
            dist.all_reduce(bad)  # every rank stops (or rolls back) together
        bad_loss, bad_grad = bad.tolist()  # what rounding made of the value (nan or inf) is left out: it differs by CPU
        if bad_loss or bad_grad:
            ranks = f" on {int(bad_loss)} of {self.world} ranks" if self.world > 1 else ""
            what = f"loss became non-finite{ranks}" if bad_loss else "gradient norm became non-finite"
            raise NonFinite(f"{what} at step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch_in_epoch + 1})", self.layout.last)

    def train_metrics(self, seconds: float, steps: int) -> dict[str, float]:
        """The train metrics since the last log (mean over its steps and, under DDP, the ranks)."""
        return {"epoch": self.epoch, **self.record.train_means(self.device, self.world), "train/lr": self.scheduler.get_last_lr()[0],
                "train/samples_per_sec": steps * self.cfg.batch_size * self.world / max(seconds, 1e-9)}

    # --- maintenance -----------------------------------------------------------------

    def evaluate(self) -> tuple[dict[str, float], object]:
        metrics, samples = self.evaluator(self.ema.module)
        for prefix, module in (self.ema.extra_modules() | ({"eval_raw": self.model} if self.cfg.eval.raw_weights else {})).items():
            metrics |= self.evaluator(module, prefix)[0]  # the other EMAs and the raw weights: scores only
        plot = self.layout.plot(self.epoch) if self.cfg.eval.plot else None
        if plot is not None:
            self.evaluator.picture(samples, plot, f"{self.cfg.run_name} epoch {self.epoch}")
        return metrics, plot

    def snapshot(self, archive: bool = False) -> None:
        state = {name: obj.state_dict() for name, obj in (("model", unwrap(self.model)), ("optimizer", self.optimizer),
                 ("scheduler", self.scheduler), ("scaler", self.scaler), ("loss", self.loss_fn))} | self.ema.checkpoint_entries()
        state |= {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "rng": rng_state(),
                  "config": OmegaConf.to_container(self.cfg, resolve=True), "metrics": self.last_metrics, **self.record.state()}
        save_checkpoint(state, self.layout.last)
        if archive:
            save_checkpoint(state, self.layout.archive(self.epoch))

    def log(self, metrics: dict[str, float], plot=None) -> None:
        self.record.log({"step": self.step, **metrics}, f"epoch {self.epoch}/{self.cfg.epochs} step {self.step}", plot)

    def _on_signal(self, signum: int, frame) -> None:
        self.stop_signal = signum  # acted on at the next step boundary, where the state is whole

    def _stop_requested(self) -> bool:
        if self.world == 1:
            return self.stop_signal is not None
        flag = torch.tensor(float(self.stop_signal or 0), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank signalled: all stop at the same step
        self.stop_signal = int(flag.item()) or None
        return self.stop_signal is not None

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        if cfg.overwrite and self.is_main:
            self.layout.archive_last()  # the replaced run's last.pt is kept in archive/
        if cfg.trackio.enabled and self.is_main:
            self.record.start(cfg)  # a resumed run: the rows its checkpoint holds and trackio lacks are sent
        if cfg.on_nonfinite == "rollback" and self.is_main and not self.layout.last.exists():
            self.snapshot()  # the state to roll back to before the first checkpoint: the start
        if self.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            print(f"run {cfg.run_name}: {cfg.model.name} ({n_params / 1e6:.2f}M params), loss {cfg.loss.name}, "
                  f"{cfg.dataloaders.name}, device {self.device}, epochs {self.epoch + 1}..{cfg.epochs}", flush=True)
        monitor = DeviceMonitor(self.device) if self.is_main else None
        handlers = {s: signal.signal(s, self._on_signal) for s in PREEMPT_SIGNALS} if threading.current_thread() is threading.main_thread() else {}
        if monitor is not None:
            monitor.start()
        try:
            while self.epoch < cfg.epochs and not (cfg.max_steps and self.step >= cfg.max_steps):
                try:
                    self.train_epoch(monitor)
                except NonFinite as failure:
                    if cfg.on_nonfinite != "rollback":
                        raise
                    self.rollback(failure)
        finally:
            if self.run_lock is not None:
                self.layout.unlock(self.run_lock)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if monitor is not None:
                monitor.stop()
            self.record.finish()
        return self.last_metrics

    def train_epoch(self, monitor: DeviceMonitor | None) -> None:
        cfg = self.cfg
        self.model.train()
        loader = make_train_loader(cfg, self.train_set, self.epoch, self.rank, self.world, self.batch_in_epoch,
                                   self.record.skipped_in(self.epoch))
        positions = loader.sampler.positions
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False, disable=not self.is_main,
                   dynamic_ncols=True, mininterval=0.5, initial=self.batch_in_epoch, total=self.batch_in_epoch + len(positions))
        start, first_step = time.perf_counter(), self.step
        for batch, position in zip(bar, positions):
            self.batch_in_epoch = position  # the batch in hand (skipped ones before it counted): a failure names it
            self.train_step(batch)
            if self.is_main and self.step % 20 == 0:
                bar.set_postfix(loss=f"{self.record.totals['loss'] / self.record.totals['_count']:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if cfg.log_every_steps and self.step % cfg.log_every_steps == 0:
                metrics = self.train_metrics(time.perf_counter() - start, self.step - first_step)  # every rank: all-reduced
                if self.is_main:
                    self.log(metrics)
                start, first_step = time.perf_counter(), self.step
            if self._stop_requested():
                if self.is_main:
                    self.snapshot()
                name = signal.Signals(self.stop_signal or signal.SIGTERM).name
                raise Preempted(self.stop_signal or signal.SIGTERM, f"stopped by {name} at step {self.step}; checkpoint "
                                f"written to {self.layout.last}: continue with resume=true")
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 and self.is_main:
                self.snapshot()
            if cfg.max_steps and self.step >= cfg.max_steps:
                break
        metrics = self.train_metrics(time.perf_counter() - start, self.step - first_step)
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        metrics["epoch"] = self.epoch
        if self.is_main:
            self._end_of_epoch(metrics | (monitor.read() if monitor is not None else {}))
        if self.world > 1:
            dist.barrier()  # the other ranks wait while rank 0 evaluates and writes the checkpoint

    def rollback(self, failure: NonFinite) -> None:
        """on_nonfinite=rollback: reload last.pt (weights, EMAs, optimizer, RNG, data position) and
        go on without the batch that failed; every rank does the same (the failure was all-reduced)."""
        failed, step, record, limit = [self.epoch, self.batch_in_epoch], self.step + 1, self.record, self.cfg.max_rollbacks
        if record.rollbacks >= limit:
            raise TrainingFailed(f"{failure}; stopped after {record.rollbacks} rollbacks (max_rollbacks={limit})")
        self._restore(read_checkpoint(self.layout.last, resume=True), rollback=True)
        record.skipped, record.rollbacks = [*record.skipped, failed], record.rollbacks + 1
        if self.world > 1:
            dist.barrier()  # every rank has read last.pt before rank 0 rewrites it
        if self.is_main:  # the skip and the count are written before they are announced: a kill after the line keeps them
            record.log({"step": step, "epoch": failed[0], "train/rollbacks": record.rollbacks, "train/rollback_to_step": self.step})
            self.snapshot()
            print(f"rollback {record.rollbacks}/{limit}: {failure.event}; back to step {self.step} of {self.layout.last}, "
                  "that batch left out from now on", flush=True)

    def _end_of_epoch(self, metrics: dict[str, float]) -> None:
        cfg = self.cfg
        last_epoch = self.epoch >= cfg.epochs or bool(cfg.max_steps and self.step >= cfg.max_steps)
        plot = None
        if self.epoch % cfg.eval.every_epochs == 0 or last_epoch:
            eval_metrics, plot = self.evaluate()
            metrics |= eval_metrics
            self.last_metrics = {"epoch": self.epoch, "step": self.step, **eval_metrics}
        self.log(metrics, plot)
        archive = cfg.checkpoint.archive_every_epochs > 0 and self.epoch % cfg.checkpoint.archive_every_epochs == 0
        if self.epoch % cfg.checkpoint.every_epochs == 0 or last_epoch or archive:
            self.snapshot(archive)


def run(cfg: DictConfig) -> dict[str, float]:
    """Entry point of the launcher (and so of torchrun workers and the Modal container).

    Under torchrun (``WORLD_SIZE`` > 1) every process trains on its own shard of each
    epoch with ``batch_size`` samples per step (global batch = batch_size x world);
    rank 0 alone evaluates, logs and writes checkpoints.
    """
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if cfg.eval_checkpoint:
        if world > 1:
            raise RunError("eval_checkpoint runs in one process: start it with python launcher.py, not torchrun")
        return evaluate_checkpoint(cfg)
    if world == 1:
        return Trainer(cfg).fit()
    with process_group(cfg.device, rank, world, local_rank):
        return Trainer(cfg, rank, world, local_rank).fit()
