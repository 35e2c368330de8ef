"""The training loop and the eval-only mode. Nothing here is model- or loss-specific.

    run(cfg) ─┬─ eval_checkpoint set → evaluate_checkpoint: rebuild, evaluate, print, JSON
              └─ otherwise           → Trainer(cfg).fit(): per epoch
                    train_epoch (step: loss → backward → clip → optimizer → EMA)
                    → evaluate (EMA weights) → log → snapshot (last.pt / archive)

Exact resume: the data order of epoch e comes from a generator seeded by (seed, e),
evaluation draws its noise from its own generator, and the global RNG states are
saved at the epoch boundary, so N epochs straight and k + resume + (N - k) epochs
produce bit-identical weights on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from dataloaders.base_dataloaders import (
    DictDatasetAdapter,
    EncodedTargetDataset,
    collate_base_items,
    make_time_sampler,
    stack_targets,
)
from evaluation.device_metrics import DeviceMonitor
from evaluation.energy_distance import energy_distance
from evaluation.sample import sample_flow, sample_meanflow
from models.jvp import rewound_rng
from models.checkpoint import build_model, load_model_from_checkpoint, read_checkpoint, save_checkpoint, unwrap
from models.ema import EMA

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class RunError(RuntimeError):
    """A run that cannot start; the message is one line for the user (exit status 2)."""


class TrainingFailed(RunError):
    """A run that started and had to stop (a non-finite loss, ranks out of sync): exit status 1."""


# ---------------------------------------------------------------------------------
# Set-up: validation, device, seeds
# ---------------------------------------------------------------------------------


def validate_config(cfg: DictConfig) -> None:
    """Check the values a user types on the command line, once, before anything runs."""
    checks = [
        (isinstance(cfg.epochs, int) and cfg.epochs >= 1, f"epochs={cfg.epochs}: expected an integer >= 1"),
        (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: expected an integer >= 1"),
        (cfg.precision in PRECISIONS, f"precision={cfg.precision}: expected one of {list(PRECISIONS)}"),
        (cfg.num_workers >= 0, f"num_workers={cfg.num_workers}: expected >= 0"),
        (cfg.max_steps >= 0, f"max_steps={cfg.max_steps}: expected >= 0 (0: no limit)"),
        (cfg.warmup_steps >= 0, f"warmup_steps={cfg.warmup_steps}: expected >= 0"),
        (cfg.lr_schedule in ("constant", "cosine"), f"lr_schedule={cfg.lr_schedule}: expected constant or cosine"),
        (0.0 <= cfg.min_lr_ratio <= 1.0, f"min_lr_ratio={cfg.min_lr_ratio}: expected a fraction in [0, 1]"),
        (cfg.grad_clip >= 0, f"grad_clip={cfg.grad_clip}: expected >= 0 (0 disables)"),
        (cfg.eval.every_epochs >= 1, f"eval.every_epochs={cfg.eval.every_epochs}: expected >= 1"),
        (cfg.eval.num_samples >= 2, f"eval.num_samples={cfg.eval.num_samples}: expected >= 2"),
        (cfg.eval.repeats >= 1, f"eval.repeats={cfg.eval.repeats}: expected >= 1"),
        (cfg.eval.steps >= 1, f"eval.steps={cfg.eval.steps}: expected >= 1"),
        (all(k >= 1 for k in cfg.eval.meanflow_steps), f"eval.meanflow_steps={list(cfg.eval.meanflow_steps)}: expected integers >= 1"),
        (cfg.checkpoint.every_epochs >= 1, f"checkpoint.every_epochs={cfg.checkpoint.every_epochs}: expected >= 1"),
        (cfg.checkpoint.archive_every_epochs >= 0, f"checkpoint.archive_every_epochs={cfg.checkpoint.archive_every_epochs}: expected >= 0"),
        (cfg.compile_mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
         f"compile_mode={cfg.compile_mode}: expected default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs"),
        (len(cfg.dataloaders.data_shape) in (1, 3), f"dataloaders.data_shape={list(cfg.dataloaders.data_shape)}: expected [D] or [C, H, W]"),
    ]
    fid = cfg.eval.fid
    if fid.enabled:
        checks += [
            (len(cfg.dataloaders.data_shape) == 3, f"eval.fid.enabled=true but {cfg.dataloaders.name} is not image data: FID needs images"),
            (fid.reference is not None, "FID needs a reference: set eval.fid.reference=/path/to/real/images, heldout, or a clean-fid dataset name such as cifar10"),
            (fid.feature_extractor in ("inception", "pooled"), f"eval.fid.feature_extractor={fid.feature_extractor}: expected inception or pooled"),
            (fid.num_samples >= 2, f"eval.fid.num_samples={fid.num_samples}: expected >= 2"),
        ]
    for ok, message in checks:
        if not ok:
            raise RunError(message)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise RunError("device=mps but this machine has no Apple MPS backend: use device=auto or device=cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RunError(f"device={name} but CUDA is not available on this machine: use device=auto or device=cpu")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise RunError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0..")
        return torch.device(name)
    raise RunError(f"device={name}: expected auto, cpu, cuda, cuda:N or mps")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------


@dataclass
class RunPaths:
    last: Path  # outputs/ckpts/<arch>/<run>/last.pt
    archive_dir: Path  # outputs/ckpts/<arch>/archive/
    plots: Path  # outputs/runs/<run>/plots/

    def archive(self, run_name: str, epoch: int) -> Path:
        return self.archive_dir / f"{run_name}_epoch_{epoch:04d}.pt"


def run_paths(cfg: DictConfig) -> RunPaths:
    root = Path(cfg.output_dir)
    arch_dir = root / "ckpts" / cfg.model.name
    return RunPaths(arch_dir / cfg.run_name / "last.pt", arch_dir / "archive", root / "runs" / cfg.run_name / "plots")


# ---------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------


def make_dataset(cfg: DictConfig, split: str) -> Dataset:
    """The target dataset of ``split``. ImageNet in ``mode=images`` is encoded batch by
    batch with the VAE, so the model trains on latents (DiT on SD-VAE latents)."""
    # Built as a partial and then called, so a loader's own one-line error (a missing
    # file, a wrong shape) reaches the launcher instead of Hydra's InstantiationException.
    dataset = instantiate(cfg.dataloaders.dataset, _partial_=True)(split=split)
    if cfg.dataloaders.get("mode") == "images":
        device = resolve_device(cfg.device)
        vae = instantiate(cfg.dataloaders.vae).to(device)
        dataset = EncodedTargetDataset(dataset, vae.encode, device, cfg.dataloaders.num_classes)
    return dataset


def make_train_loader(cfg: DictConfig, dataset: Dataset, epoch: int, rank: int = 0, world: int = 1) -> DataLoader:
    """A loader whose shuffling is fixed by (seed, epoch): the basis of exact resume."""
    sampler_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    time_sampler = make_time_sampler(cfg.dataloaders.time_sampler, cfg.dataloaders.time_mean, cfg.dataloaders.time_std)
    adapter = DictDatasetAdapter(dataset, time_sampler)
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(adapter, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(adapter, generator=sampler_gen)
    return DataLoader(
        adapter,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_base_items,
        num_workers=cfg.num_workers,
        pin_memory=bool(cfg.dataloaders.get("pin_memory", False)),
        persistent_workers=False,
    )


def eval_reference_sets(cfg: DictConfig) -> tuple[Tensor, Tensor, int]:
    """Held-out data and an independent data draw (for the floor), ``repeats`` blocks of
    ``n`` samples each (``n`` shrinks to fit small held-out sets); returns them and ``n``."""
    test = make_dataset(cfg, "test")
    reference = make_dataset(cfg, "reference")
    repeats = cfg.eval.repeats
    n = min(cfg.eval.num_samples, len(test) // repeats, len(reference) // repeats)
    if n < 2:
        raise RunError(f"eval.repeats={repeats} leaves fewer than 2 held-out samples per block ({len(test)} in all): lower eval.repeats")
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    pick_test = torch.randperm(len(test), generator=gen)[: n * repeats].tolist()
    pick_ref = torch.randperm(len(reference), generator=gen)[: n * repeats].tolist()
    return stack_targets(test, pick_test)[0].float(), stack_targets(reference, pick_ref)[0].float(), n


def mean_energy_distance(x: Tensor, y: Tensor, block: int) -> float:
    """The energy distance averaged over consecutive blocks of ``block`` rows: an estimate
    with the bias of one block of that size and a fraction of its spread (a single draw
    of 2000 points varies by about the size of the floor itself)."""
    values = [energy_distance(x[i : i + block], y[i : i + block]) for i in range(0, x.shape[0], block)]
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------
# Evaluation (shared by training and eval_checkpoint)
# ---------------------------------------------------------------------------------


class Evaluator:
    """Samples with fixed noise generators, so the numbers at an epoch are a function of
    the weights alone and ``eval_checkpoint`` reproduces them.

    Every run reports the energy distance of its multi-step solver samples to held-out
    data beside the floor (two independent data draws of the same size); MeanFlow runs
    add their k-step samples. Image runs (latent runs through the VAE decoder) add a
    sample grid and, when enabled, FID.
    """

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.is_meanflow = cfg.loss.name == "meanflow"
        self.is_image = len(cfg.dataloaders.data_shape) == 3
        self.held_out, reference, self.block = eval_reference_sets(cfg)
        self.floor = mean_energy_distance(self.held_out, reference, self.block)
        vae_cfg = cfg.dataloaders.get("vae")
        self.vae = None
        if vae_cfg is not None:
            self.vae = instantiate(vae_cfg).to(device)
        self.fid_extractor = None
        if cfg.eval.fid.enabled:
            from evaluation.fid import make_feature_extractor

            self.fid_extractor = make_feature_extractor(cfg.eval.fid.feature_extractor)

    def noise(self, n: int, seed_offset: int) -> tuple[Tensor, Tensor | None]:
        gen = torch.Generator().manual_seed(self.cfg.seed + seed_offset)
        x0 = torch.randn(n, *self.cfg.dataloaders.data_shape, generator=gen)
        labels = None
        if self.cfg.model.num_classes > 0:
            labels = torch.randint(self.cfg.model.num_classes, (n,), generator=gen)
        return x0, labels

    def variants(self) -> dict[str, int | None]:
        """Sampler name -> MeanFlow step count (None: the multi-step solver)."""
        names: dict[str, int | None] = {f"{self.cfg.solver.name}{self.cfg.eval.steps}": None}
        if self.is_meanflow:
            names |= {f"meanflow{k}": int(k) for k in self.cfg.eval.meanflow_steps}
        return names

    @torch.no_grad()
    def generate(self, model: nn.Module, steps: int | None, x0: Tensor, labels: Tensor | None) -> Tensor:
        """Samples from noise ``x0`` (CPU), in chunks of ``eval.batch_size``; returned on the CPU."""
        ecfg, out = self.cfg.eval, []
        for i in range(0, x0.shape[0], ecfg.batch_size):
            z = x0[i : i + ecfg.batch_size].to(self.device)
            y = None if labels is None else labels[i : i + ecfg.batch_size].to(self.device)
            if steps is None:
                x = sample_flow(model, z, solver=self.cfg.solver.name, num_steps=ecfg.steps, label=y,
                                guidance_scale=ecfg.guidance_scale, num_classes=self.cfg.model.num_classes).samples
            else:
                x = sample_meanflow(model, z, num_steps=steps, label=y).samples
            out.append(x.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def to_images(self, x: Tensor) -> Tensor:
        """Model-space samples -> images in [-1, 1] (VAE-decoded for latent data)."""
        if self.vae is None:
            return x.clamp(-1, 1)
        chunks = [self.vae.decode(x[i : i + 32].to(self.device)).float().cpu() for i in range(0, x.shape[0], 32)]
        return torch.cat(chunks).clamp(-1, 1)

    @torch.no_grad()
    def fid(self, model: nn.Module, steps: int | None) -> float:
        from evaluation.fid import compute_fid, fid_against_images

        fcfg = self.cfg.eval.fid
        x0, labels = self.noise(fcfg.num_samples, 999)
        images = self.to_images(self.generate(model, steps, x0, labels))
        if fcfg.reference == "heldout":
            return fid_against_images(images, self.to_images(self.held_out), fcfg.mode, self.fid_extractor,
                                      fcfg.batch_size, self.device)
        return compute_fid(images, fcfg.reference, mode=fcfg.mode, feature_extractor=self.fid_extractor,
                           batch_size=fcfg.batch_size, device=self.device, dataset_split=fcfg.dataset_split)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> tuple[dict[str, float], dict[str, Tensor]]:
        """Returns (metrics, samples by sampler name) for the (EMA) model."""
        x0, labels = self.noise(self.held_out.shape[0], 777)
        metrics: dict[str, float] = {"eval/energy_distance_floor": self.floor}
        samples = {}
        for name, steps in self.variants().items():
            samples[name] = self.generate(model, steps, x0, labels)
            key = "eval/energy_distance" if steps is None else f"eval/energy_distance_{steps}step"
            metrics[key] = mean_energy_distance(samples[name], self.held_out, self.block)
            if self.cfg.eval.fid.enabled:
                # FID of the sampler a researcher would ship: the solver for flow matching,
                # the k-step samplers for MeanFlow.
                if steps is not None or not self.is_meanflow:
                    metrics["eval/fid" if steps is None else f"eval/fid_{steps}step"] = self.fid(model, steps)
        return metrics, samples


def save_grid(samples: dict[str, Tensor], path: Path, per_variant: int = 64) -> Path:
    """One PNG: an 8-column grid of the first ``per_variant`` images of each sampler, side by side."""
    from torchvision.utils import make_grid, save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    grids = [make_grid((x[:per_variant] + 1) / 2, nrow=8, padding=1, pad_value=1.0) for x in samples.values()]
    height = max(g.shape[1] for g in grids)
    grids = [torch.nn.functional.pad(g, (0, 4, 0, height - g.shape[1]), value=1.0) for g in grids]
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_image(torch.cat(grids, dim=2), tmp)
    tmp.replace(path)
    return path


def save_plot(cfg: DictConfig, samples: dict[str, Tensor], data: Tensor, path: Path, title: str) -> Path:
    """Scatter of samples over data for 2-D runs (first two coordinates otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4), squeeze=False)
    lim = float(data[:, :2].abs().max()) * 1.2
    for ax, (name, pts) in zip(axes[0], samples.items()):
        pts = pts.cpu()
        ax.scatter(data[:, 0], data[:, 1], s=2, c="lightgray", label="data")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:blue", label="samples")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=f"{title} · {name}")
        ax.legend(loc="upper right", markerscale=4, fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------


class LossModule(nn.Module):
    """Model and loss in one module whose ``forward(batch)`` returns the loss.

    This is what gets compiled and DDP-wrapped: the whole loss, the MeanFlow JVP
    included, runs inside the wrapper's forward, so DDP's gradient hooks see every
    parameter use (calling ``model.module`` from outside would skip the all-reduce).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch) -> Tensor:
        return self.loss_fn(self.model, batch)


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
        self.cfg = cfg
        self.rank = rank
        self.world = world
        self.is_main = rank == 0
        self.device = resolve_device(cfg.device)
        if world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)  # one GPU per process, picked by torchrun
        self.paths = run_paths(cfg)
        self.resume_state = self._check_run_folder()

        seed_everything(cfg.seed + rank)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark

        self.train_set = make_dataset(cfg, "train")
        if len(self.train_set) < cfg.batch_size * world:
            raise RunError(f"batch_size={cfg.batch_size} exceeds the training set ({len(self.train_set)} samples per epoch)")
        self.model = build_model(cfg.model).to(self.device)
        # partial, then call: the loss's own one-line ValueError, not Hydra's wrapper
        self.loss_fn = instantiate({k: v for k, v in cfg.loss.items() if k != "name"}, _partial_=True)().to(self.device)
        self.ema = EMA(self.model, cfg.ema.decay, cfg.ema.halflife_samples)
        self.optimizer = instantiate(cfg.optimizer)(self.model.parameters())
        steps_per_epoch = len(self.train_set) // (cfg.batch_size * world)
        total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.warmup_steps, cfg.lr_schedule, total_steps, cfg.min_lr_ratio)
        )
        self.autocast_dtype = PRECISIONS[cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.loss_module = LossModule(self.model, self.loss_fn)
        wrapped = self.loss_module
        if world > 1:
            # DDP wraps the whole loss (the MeanFlow JVP included), so its hooks see every
            # parameter use and all-reduce the gradients; it also broadcasts rank 0's weights.
            wrapped = DistributedDataParallel(self.loss_module, device_ids=[local_rank] if self.device.type == "cuda" else None)
            self.ema.module.load_state_dict(self.model.state_dict())  # the EMA starts from the broadcast weights
        # Batches have one shape (drop_last), so dynamic shapes only cost: with them on,
        # inductor failed to compile the MeanFlow JVP of the SmallCNN (torch 2.14).
        self.step_module = torch.compile(wrapped, mode=cfg.compile_mode, dynamic=False) if cfg.compile else wrapped
        self.ranks_checked = world == 1
        self.step = 0
        self.epoch = 0
        self.last_metrics: dict[str, float] = {}
        if self.resume_state is not None:
            self._restore(self.resume_state)
            if world > 1:
                # Every rank loaded rank 0's RNG state; re-split the streams so the ranks
                # do not draw the same noise (DDP resume is exact in the data order only).
                seed_everything((cfg.seed + rank) * 1_000_003 + self.step)
        with rewound_rng(self.device):  # the probe must not shift the RNG stream (exact resume)
            probe = next(iter(make_train_loader(cfg, self.train_set, 0))).to(self.device)
            self.loss_fn.check_model(self.model, probe)
        self.evaluator = Evaluator(cfg, self.device) if self.is_main else None
        self.tracker = None

    # --- run folder ------------------------------------------------------------------

    def _check_run_folder(self) -> dict | None:
        """Refuse to clobber an existing run; find the checkpoint to resume from."""
        cfg, last = self.cfg, self.paths.last
        if cfg.resume:
            if not last.exists():
                raise RunError(f"resume=true but run {cfg.run_name!r} has no checkpoint at {last}: drop resume=true to start it")
            return read_checkpoint(last)
        if last.exists() and not cfg.overwrite:
            raise RunError(
                f"run {cfg.run_name!r} already has {last}: pass resume=true to continue it, "
                "overwrite=true to start over (the old last.pt is archived), or choose another run_name"
            )
        return None

    def _restore(self, state: dict) -> None:
        saved_model = state["config"]["model"]
        if OmegaConf.to_container(self.cfg.model, resolve=True) != saved_model:
            raise RunError(f"resume=true but model config differs from the checkpoint's ({saved_model}): resume with the same model settings")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.last_metrics = dict(state.get("metrics", {}))
        set_rng_state(state["rng"])

    # --- the step --------------------------------------------------------------------

    def train_step(self, batch) -> Tensor:
        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.step_module(batch)
        bad_ranks = self._count_nonfinite(loss)
        if bad_ranks:
            value = f"{loss.item()}" if self.world == 1 else f"non-finite on {bad_ranks} of {self.world} ranks"
            raise TrainingFailed(f"loss became {value} at step {self.step + 1} (epoch {self.epoch + 1}); the last good checkpoint is kept at {self.paths.last}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.ema.update(self.model, self.cfg.batch_size * self.world)
        self.step += 1
        if not self.ranks_checked:
            self._check_ranks_agree()
        return loss.detach()

    def _count_nonfinite(self, loss: Tensor) -> int:
        """How many ranks hold a non-finite loss; all-reduced so that every rank stops together."""
        bad = (~torch.isfinite(loss.detach())).to(torch.float32)
        if self.world > 1:
            dist.all_reduce(bad)
        return int(bad.item())

    def _check_ranks_agree(self) -> None:
        """Once per run, after the first step: every rank must hold the same weights. If
        they differ, the gradient all-reduce was skipped (e.g. a loss that reaches the model
        through ``model.module`` outside the DDP forward) and each rank trains alone."""
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()])
        high, low = sums.clone(), sums.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        self.ranks_checked = True
        if not torch.equal(high, low):
            raise TrainingFailed(f"ranks disagree after step {self.step}: gradient synchronisation is broken "
                           "(the loss must run inside the DDP-wrapped forward; calling model.module skips the all-reduce)")

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        loader = make_train_loader(self.cfg, self.train_set, self.epoch, self.rank, self.world)
        total, count = torch.zeros((), device=self.device), 0
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", leave=False, disable=not self.is_main,
                   dynamic_ncols=True, mininterval=0.5)
        for batch in bar:
            total += self.train_step(batch)
            count += 1
            if count % 20 == 0:
                rate = count * self.cfg.batch_size * self.world / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{total.item() / count:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", samples_s=f"{rate:.0f}")
            if self.cfg.max_steps and self.step >= self.cfg.max_steps:
                break
        seconds = time.perf_counter() - start
        if self.world > 1:
            dist.all_reduce(total)  # the logged loss is the mean over every rank's batches
            total /= self.world
        self.epoch += 1
        return {
            "epoch": self.epoch,
            "train/loss": total.item() / max(count, 1),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/samples_per_sec": count * self.cfg.batch_size * self.world / seconds,
            "train/epoch_seconds": seconds,
        }

    # --- maintenance -----------------------------------------------------------------

    def evaluate(self) -> tuple[dict[str, float], Path | None]:
        metrics, samples = self.evaluator(self.ema.module)
        plot = None
        path = self.paths.plots / f"epoch_{self.epoch:04d}.png"
        if self.cfg.eval.plot and self.evaluator.is_image:
            plot = save_grid({k: self.evaluator.to_images(v[:64]) for k, v in samples.items()}, path)
        elif self.cfg.eval.plot:
            plot = save_plot(self.cfg, samples, self.evaluator.held_out, path, f"{self.cfg.run_name} epoch {self.epoch}")
        return metrics, plot

    def snapshot(self, archive: bool) -> None:
        state = {
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "rng": rng_state(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "metrics": self.last_metrics,
        }
        save_checkpoint(state, self.paths.last)
        if archive:
            save_checkpoint(state, self.paths.archive(self.cfg.run_name, self.epoch))

    def _start_tracking(self) -> None:
        if not (self.cfg.trackio.enabled and self.is_main):
            return
        import trackio

        config = OmegaConf.to_container(self.cfg, resolve=True)
        config["command"] = " ".join(["python", *sys.argv]) if sys.argv and sys.argv[0].endswith("launcher.py") else ""
        trackio.init(project=self.cfg.trackio.project, name=self.cfg.run_name, config=config,
                     resume="must" if self.cfg.resume else "never", embed=False, auto_log_gpu=False, auto_log_cpu=False)
        self.tracker = trackio

    def _archive_overwritten_run(self) -> None:
        if self.cfg.overwrite and self.paths.last.exists() and self.is_main:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.paths.archive_dir.mkdir(parents=True, exist_ok=True)
            self.paths.last.replace(self.paths.archive_dir / f"{self.cfg.run_name}_overwritten_{stamp}.pt")

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        self._archive_overwritten_run()
        self._start_tracking()
        if self.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            print(f"run {cfg.run_name}: {cfg.model.name} ({n_params / 1e6:.2f}M params), loss {cfg.loss.name}, "
                  f"{cfg.dataloaders.name}, device {self.device}, epochs {self.epoch + 1}..{cfg.epochs}", flush=True)
        monitor = DeviceMonitor(self.device) if self.is_main else None
        if monitor is not None:
            monitor.start()
        try:
            while self.epoch < cfg.epochs and not (cfg.max_steps and self.step >= cfg.max_steps):
                metrics = self.train_epoch()
                if monitor is not None:
                    metrics |= monitor.read()  # proc/*, cuda/*, mps/*, gpu/* (logged, not printed)
                last_epoch = self.epoch >= cfg.epochs or bool(cfg.max_steps and self.step >= cfg.max_steps)
                if self.is_main:
                    self._end_of_epoch(metrics, last_epoch)
                if self.world > 1:
                    dist.barrier()  # the other ranks wait while rank 0 evaluates and writes the checkpoint
        finally:
            if monitor is not None:
                monitor.stop()
            if self.tracker is not None:
                self.tracker.finish()
        return self.last_metrics

    def _end_of_epoch(self, metrics: dict[str, float], last_epoch: bool) -> None:
        cfg = self.cfg
        plot = None
        if self.epoch % cfg.eval.every_epochs == 0 or last_epoch:
            eval_metrics, plot = self.evaluate()
            metrics |= eval_metrics
            self.last_metrics = {"epoch": self.epoch, "step": self.step, **eval_metrics}
        summary = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if k.split("/")[0] in ("train", "eval"))
        print(f"epoch {self.epoch}/{cfg.epochs} step {self.step}  {summary}", flush=True)
        if self.tracker is not None:
            logged = dict(metrics)
            if plot is not None:
                logged["eval/samples"] = self.tracker.Image(str(plot), caption=f"epoch {self.epoch}")
            self.tracker.log(logged, step=self.step)
        archive = cfg.checkpoint.archive_every_epochs > 0 and self.epoch % cfg.checkpoint.archive_every_epochs == 0
        if self.epoch % cfg.checkpoint.every_epochs == 0 or last_epoch or archive:
            self.snapshot(archive)


# ---------------------------------------------------------------------------------
# Eval-only mode
# ---------------------------------------------------------------------------------


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Rebuild the model from the checkpoint's own config, evaluate, print, write JSON.
    Only ``device`` and ``output_dir`` come from the command line, so the numbers match
    the ones the run logged at that epoch."""
    device = resolve_device(cfg.device)
    model, saved_cfg, state = load_model_from_checkpoint(cfg.eval_checkpoint, device)
    with open_dict(saved_cfg):
        saved_cfg.device = cfg.device
    metrics, _ = Evaluator(saved_cfg, device)(model)
    result = {"checkpoint": str(cfg.eval_checkpoint), "run_name": saved_cfg.run_name, "epoch": int(state["epoch"]),
              "step": int(state["step"]), **metrics}
    out = Path(cfg.output_dir) / "eval" / saved_cfg.run_name / f"epoch_{int(state['epoch']):04d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key}: {value}")
    print(f"results written to {out}")
    return result


# ---------------------------------------------------------------------------------
# Several processes: torchrun + DistributedDataParallel
# ---------------------------------------------------------------------------------

# Rank 0 may evaluate (FID) for a long time while the other ranks wait at a barrier.
DIST_TIMEOUT = timedelta(minutes=60)


@dataclass
class DistEnv:
    rank: int  # global rank, 0..world-1
    world: int  # number of processes over all nodes
    local_rank: int  # rank on this node: the CUDA device index


def distributed_env() -> DistEnv:
    """The variables torchrun sets; a plain ``python`` run is rank 0 of 1."""
    env = os.environ
    return DistEnv(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(cfg: DictConfig, env: DistEnv):
    """NCCL with one GPU per process on CUDA, gloo on the CPU; torn down on any exit."""
    device = resolve_device(cfg.device)
    if device.type == "mps":
        raise RunError("device=mps cannot run under torchrun (no collective backend for MPS): run one process, or use device=cpu")
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise RunError(f"LOCAL_RANK={env.local_rank} but this node has {torch.cuda.device_count()} CUDA device(s): "
                           "set --nproc_per_node to at most the number of GPUs")
        torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl", rank=env.rank, world_size=env.world, timeout=DIST_TIMEOUT,
                                device_id=torch.device("cuda", env.local_rank))
    else:
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world, timeout=DIST_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run(cfg: DictConfig) -> dict[str, float]:
    """Entry point used by the launcher, the Modal app and torchrun workers.

    Under torchrun (``WORLD_SIZE`` > 1) every process trains on its own shard of each
    epoch with ``batch_size`` samples per step (global batch = batch_size x world);
    rank 0 alone evaluates, logs and writes checkpoints.
    """
    validate_config(cfg)
    env = distributed_env()
    if cfg.eval_checkpoint:
        if env.world > 1:
            raise RunError("eval_checkpoint runs in one process: start it with python launcher.py, not torchrun")
        return evaluate_checkpoint(cfg)
    if env.world == 1:
        return Trainer(cfg).fit()
    with process_group(cfg, env):
        return Trainer(cfg, env.rank, env.world, env.local_rank).fit()
