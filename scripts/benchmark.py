"""Training-step benchmark: MeanFlow over flow matching, per model; and sampling.

    python scripts/benchmark.py [--quick] [--device cpu|cuda|mps] [--models mlp,cnn,...]
                                [--compile] [--precision fp32,bf16] [--repeats N]
                                [--threads N] [--time-limit S] [--profile] [--out F.md]
    python scripts/benchmark.py --device cuda --preset cuda      # the GPU table, unattended

Tables (Markdown):

1. Training step: ``Trainer.train_step`` itself (loss forward, backward, finite check,
   clip, Adam, EMA, the step's record; no loader) on a fixed synthetic batch, for flow
   matching (``mse``) and MeanFlow with each ``jvp_mode``: median ms, samples/s, peak
   memory. On CUDA the memory is ``max_memory_allocated`` over the timed blocks; on the
   CPU each (model, loss) runs three eager steps in a fresh process (glibc told to unmap
   freed tensors at once) and reports the peak RSS (``VmHWM``) above the RSS after
   building model, optimizer and batch.
2. MeanFlow over flow matching: the losses share one model and optimizer and run in
   rounds of one step each, the order rotated every round, so load from other
   processes lands on all alike. Each round gives one ratio; the table shows their
   median and interquartile range, and the ratio of the fastest steps (on a loaded
   machine load only ever adds time, so best / best is the steadier estimate). The
   floor is about 4/3: the tangent pass costs about one forward beside flow
   matching's forward + backward.
3. ``--profile``: the top operators of each step (self time), and one layer at a time
   the forward against its JVP, built-in ``torch.nn`` layer vs ``models/layers.py``.
4. Sampling (MLP, SmallCNN): wall time per fixed-grid solver and step count, and the
   MeanFlow 1- and 2-step sampler.
5. ``--imf-models``: the iMF step with the auxiliary head (``loss=imf``, ``model.aux_head``,
   the predicted tangent: one more no-grad pass for v_c, and the v head through the JVP and
   the backward) over MeanFlow's fused step on the same trunk without the head, in rounds
   as in 2. Each model gets the head as a second output layer; a DiT also as iMF's split
   (the last two thirds of its depth doubled: B/2's 4 shared, 8 u and 8 v blocks).

``--time-limit`` stops starting new (model, precision, compiled) cases once spent, and
still prints everything measured. On a shared CPU ``--threads 1`` is steadier.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError

from dataloaders.base_dataloaders import BaseItem, make_base_item
from evaluation.sample import sample_flow, sample_meanflow
from evaluation.tracking import RunRecord
from losses.base_loss import LossModule
from losses.imf_loss import IMFLoss
from losses.meanflow_loss import MeanFlowLoss
from losses.mse_loss import FlowMatchingMSELoss
from models.attention import attention, jvp_safe_attention
from models.layers import Conv2d, GroupNorm, LayerNorm, Linear, SiLU
from runs.build import build_model
from runs.ema import EMASet
from runs.layout import RunLayout
from train import PRECISIONS, Trainer, lr_lambda


@dataclass(frozen=True)
class ModelSpec:
    """A model from its yaml in configs/model/ (with ``overrides``) on synthetic ``data_shape``."""

    config: str
    data_shape: tuple[int, ...]
    batch_cpu: int
    batch_gpu: int
    label: str
    overrides: dict = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", (2,), 512, 4096, "MLP 4x256, 2-D"),
    "cnn": ModelSpec("cnn", (3, 32, 32), 16, 128, "SmallCNN, 3x32x32"),
    "unet_small": ModelSpec("unet", (3, 16, 16), 8, 64, "UNet ch32 [1,2] attn@8, 3x16x16",
                            {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8]}),
    "unet_cifar": ModelSpec("unet", (3, 32, 32), 2, 128, "UNet CIFAR-10 (unet.yaml), 3x32x32"),
    "dit_s2": ModelSpec("dit_s", (4, 32, 32), 2, 128, "DiT-S/2, 4x32x32 latents"),
    "dit_b2": ModelSpec("dit_b", (4, 32, 32), 1, 128, "DiT-B/2, 4x32x32 latents"),
}
DEFAULT_MODELS, QUICK_MODELS = "mlp,cnn,unet_small,dit_s2", "mlp,cnn"
PRESETS = {"cuda": {"models": "unet_cifar,dit_b2", "compile_models": "unet_cifar,dit_b2", "precision": "fp32,bf16",
                    "time_limit": 420.0, "no_sampling": True}}  # fits a 10-minute device call
LOSSES = ("mse", "meanflow-fused", "meanflow-separate")
SOLVERS = ("euler", "midpoint", "heun", "rk4")  # fixed-grid solvers
SAMPLE_MODELS = {"mlp": 2000, "cnn": 64}  # model -> samples drawn
GRAD_CLIP = 1.0  # configs/train.yaml's default


def model_config(name: str, overrides: dict | None = None) -> dict:
    spec = MODELS[name]
    node = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "model" / f"{spec.config}.yaml"), spec.overrides, overrides or {})
    root = OmegaConf.create({"dataloaders": {"data_shape": list(spec.data_shape), "num_classes": 0}, "model": node})
    return OmegaConf.to_container(root.model, resolve=True)


def synthetic_batch(name: str, batch: int, device: torch.device) -> BaseItem:
    gen = torch.Generator().manual_seed(0)
    x1, x0 = (torch.randn(batch, *MODELS[name].data_shape, generator=gen) for _ in range(2))
    return make_base_item(x1, x0, torch.rand(batch, generator=gen)).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class StepBench(Trainer):
    """``Trainer.train_step`` itself on a fixed synthetic batch: one model, optimizer and EMA
    shared by the losses, each loss with its own (compiled) step module.

    ``Trainer.__init__`` is not called (it claims a run folder and reads a data set); this
    builds what ``train_step`` reads, as ``train.py`` builds it, with Adam and a constant
    learning rate. A step that comes to read more fails here on the missing attribute.
    """

    def __init__(self, name: str, device: torch.device, losses: list[str], compiled: bool, precision: str,
                 model_overrides: dict | None = None) -> None:
        torch.manual_seed(0)
        self.device, self.world, self.step, self.epoch, self.batch_in_epoch = device, 1, 0, 0, 0
        self.model = build_model(model_config(name, model_overrides)).to(device).train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.batch_size = MODELS[name].batch_gpu if device.type == "cuda" else MODELS[name].batch_cpu
        self.batch = synthetic_batch(name, self.batch_size, device)
        self.cfg = OmegaConf.create({"grad_clip": GRAD_CLIP, "batch_size": self.batch_size})
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(0, "constant", 1, 0.0))
        self.autocast_dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.ema = EMASet(self.model, 0.999)
        self.record, self.ranks_checked = RunRecord(), True
        self.layout = RunLayout(Path(os.devnull), name, "benchmark")  # a non-finite step reports no checkpoint
        self.modules: dict[str, tuple[nn.Module, nn.Module]] = {}
        for loss in losses:
            if loss == "imf":  # iMF as the reference trains it: predicted tangent, v_c and loss_v from the auxiliary head
                fn = IMFLoss(aux_head=True, jvp_mode="fused")
            else:
                fn = FlowMatchingMSELoss() if loss == "mse" else MeanFlowLoss(jvp_mode=loss.removeprefix("meanflow-"))
            module = LossModule(self.model, fn.to(device))
            # dynamic=False, as the trainer compiles: the batch never changes shape
            self.modules[loss] = (fn, torch.compile(module, dynamic=False) if compiled else module)

    def run_step(self, loss_name: str) -> None:
        self.loss_fn, self.step_module = self.modules[loss_name]
        self.train_step(self.batch)

    def timed(self, loss_name: str, n: int) -> list[float]:
        times = []
        for _ in range(n):
            synchronize(self.device)
            start = time.perf_counter()
            self.run_step(loss_name)
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        return times


@dataclass
class StepResult:
    model: str
    loss: str
    compiled: bool
    precision: str
    batch: int
    params: int
    times: list[float]  # one step per round, rounds aligned across the losses of a case
    first_s: float  # the first call: includes compilation when compiled
    peak_mb: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def bench_steps(name: str, device: torch.device, compiled: bool, precision: str, repeats: int, block_s: float) -> list[StepResult]:
    """Rounds of one step per loss, the order rotated each round, so that the steps
    compared within a round ran under about the same load."""
    bench = StepBench(name, device, list(LOSSES), compiled, precision)
    first = {loss: bench.timed(loss, 1)[0] for loss in LOSSES}
    slowest = max(max(bench.timed(loss, 2)) for loss in LOSSES)  # warm-up
    rounds = max(repeats, min(50 * repeats, round(repeats * block_s / slowest)))
    times: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    peaks = dict.fromkeys(LOSSES, 0.0)
    for r in range(rounds):
        for loss in LOSSES[r % len(LOSSES):] + LOSSES[: r % len(LOSSES)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[loss] += bench.timed(loss, 1)
            if device.type == "cuda":
                peaks[loss] = max(peaks[loss], torch.cuda.max_memory_allocated(device) / 2**20)
    return [StepResult(name, loss, compiled, precision, bench.batch_size, bench.n_params, times[loss], first[loss],
                       peaks[loss] if device.type == "cuda" else None) for loss in LOSSES]


def imf_variants(name: str) -> list[tuple[str, dict]]:
    """The iMF models timed against ``name``'s trunk: the head as a second output layer, and
    for a DiT iMF's split, the last two thirds of the depth doubled (B/2: 4 + 8 u + 8 v)."""
    variants = [("second output layer", {"aux_head": True})]
    config = model_config(name)
    if config["_target_"].endswith(".DiT"):
        own = 2 * config["depth"] // 3
        variants.append((f"{config['depth'] - own} shared + {own} u + {own} v blocks", {"aux_head": True, "aux_depth": own}))
    return variants


@dataclass
class PairResult:
    model: str
    variant: str
    precision: str
    params: tuple[int, int]  # MeanFlow's model, iMF's
    times: tuple[list[float], list[float]]  # one step each per round: MeanFlow, iMF


def bench_imf(name: str, variant: tuple[str, dict], device: torch.device, precision: str, repeats: int,
              block_s: float) -> PairResult:
    """MeanFlow's fused step on ``name`` and the iMF step on the same trunk with ``variant``'s
    auxiliary head, each with its own model and optimizer, one step each per round in
    alternating order (as ``bench_steps``)."""
    benches = [StepBench(name, device, ["meanflow-fused"], False, precision),
               StepBench(name, device, ["imf"], False, precision, variant[1])]
    losses = ["meanflow-fused", "imf"]
    for bench, loss in zip(benches, losses, strict=True):
        bench.timed(loss, 1)  # first call
    slowest = max(max(bench.timed(loss, 2)) for bench, loss in zip(benches, losses, strict=True))  # warm-up
    rounds = max(repeats, min(50 * repeats, round(repeats * block_s / slowest)))
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            times[i] += benches[i].timed(losses[i], 1)
    return PairResult(name, variant[0], precision, (benches[0].n_params, benches[1].n_params), (times[0], times[1]))


def imf_table(results: list[PairResult]) -> str:
    rows = []
    for r in results:
        mf, imf = r.times
        q1, q2, q3 = quartiles([b / a for a, b in zip(mf, imf, strict=True)])
        rows.append([MODELS[r.model].label, r.variant, r.precision, f"{r.params[0] / 1e6:.3f}M", f"{r.params[1] / 1e6:.3f}M",
                     f"{statistics.median(mf) * 1e3:.2f}", f"{statistics.median(imf) * 1e3:.2f}", str(len(mf)),
                     f"{q2:.2f}x ({q1:.2f}-{q3:.2f})", f"{min(imf) / min(mf):.2f}x"])
    return table(["model", "auxiliary head", "precision", "MeanFlow params", "iMF params", "MeanFlow ms/step",
                  "iMF ms/step", "rounds", "iMF / MeanFlow (IQR)", "iMF best / MeanFlow best"], rows)


def peak_rss_bytes() -> int:
    """Peak RSS of this process: ``VmHWM`` (``ru_maxrss`` survives exec: a child would see its parent's)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def memory_probe(name: str, loss: str) -> dict:
    """In a fresh process (``--memory-probe``): RSS growth over three eager CPU steps."""
    bench = StepBench(name, torch.device("cpu"), [loss], compiled=False, precision="fp32")
    before = psutil.Process().memory_info().rss
    for _ in range(3):
        bench.run_step(loss)
    return {"delta_mb": (peak_rss_bytes() - before) / 2**20}


def cpu_peak_memory(name: str, loss: str) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, loss, "--threads", str(torch.get_num_threads())]
    # A fixed glibc mmap threshold returns every freed tensor to the OS at once, so the peak
    # RSS tracks the peak of live tensors; with the default (adaptive) threshold, freed
    # blocks stay in the heap and allocation order decides the peak (the fused step's
    # growth then reads far above flow matching's for the same live tensors: drop the
    # variable below and compare).
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["delta_mb"]


def profile_step(name: str, device: torch.device, loss: str, top: int = 12) -> list[list[str]]:
    from torch.profiler import ProfilerActivity, profile

    bench = StepBench(name, device, [loss], compiled=False, precision="fp32")
    bench.timed(loss, 2)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
        bench.timed(loss, 3)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [[e.key, f"{getattr(e, key) / 3e3:.2f}", str(e.count // 3)] for e in events]


def sdpa_math(q: Tensor) -> Tensor:
    with jvp_safe_attention():  # the built-in SDPA has a forward-mode rule on its MATH backend only
        return nn.functional.scaled_dot_product_attention(q, q, q)


def layer_costs(device: torch.device) -> list[list[str]]:
    """Forward vs ``torch.func.jvp`` (weights closed over, no grad) of single layers."""
    x, a = torch.randn(16, 64, 32, 32, device=device), torch.randn(512, 256, 384, device=device)
    q = torch.randn(8, 6, 256, 64, device=device)
    pairs = [("Conv2d 64->64 3x3", nn.Conv2d(64, 64, 3, padding=1), Conv2d(64, 64, 3, padding=1), x),
             ("Linear 384->384", nn.Linear(384, 384), Linear(384, 384), a),
             ("GroupNorm(32, 64)", nn.GroupNorm(32, 64), GroupNorm(32, 64), x),
             ("LayerNorm(384)", nn.LayerNorm(384), LayerNorm(384), a),
             ("SiLU", nn.SiLU(), SiLU(), x),
             ("attention 6 heads x 256 tokens", sdpa_math, lambda t: attention(t, t, t), q)]
    rows = []
    with torch.no_grad():
        for label, builtin, ours, inp in pairs:
            tangent = torch.randn_like(inp)
            cells = [label]
            for layer in (builtin, ours):
                layer = layer.to(device) if isinstance(layer, nn.Module) else layer
                fwd = median_time(lambda f=layer, i=inp: f(i), device)
                jvp = median_time(lambda f=layer, i=inp, t=tangent: torch.func.jvp(f, (i,), (t,)), device)
                cells += [f"{fwd * 1e3:.2f}", f"{jvp / fwd:.2f}x"]
            rows.append(cells)
    return rows


def median_time(fn: Callable[[], object], device: torch.device, n: int = 10) -> float:
    fn()
    times = []
    for _ in range(n):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_sampling(name: str, device: torch.device, n: int, step_counts: list[int], repeats: int) -> list[list[str]]:
    torch.manual_seed(0)
    model = build_model(model_config(name)).to(device).eval()
    x0 = torch.randn(n, *MODELS[name].data_shape, generator=torch.Generator().manual_seed(0)).to(device)
    jobs = {(s, k): (lambda s=s, k=k: sample_flow(model, x0, solver=s, num_steps=k).nfe) for s in SOLVERS for k in step_counts}
    jobs |= {("meanflow", k): (lambda k=k: sample_meanflow(model, x0, num_steps=k).nfe) for k in (1, 2)}
    for job in jobs.values():
        job()  # warm-up
    times: dict[tuple[str, int], list[float]] = {key: [] for key in jobs}
    nfe = {}
    for _ in range(repeats):  # interleaved, like the step benchmark
        for key, job in jobs.items():
            synchronize(device)
            start = time.perf_counter()
            nfe[key] = job()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    rows = []
    for (s, k), ts in times.items():
        med = statistics.median(ts)
        rows.append([MODELS[name].label, str(n), s, str(k), str(nfe[(s, k)]), f"{med * 1e3:.2f}", f"{med * 1e3 / nfe[(s, k)]:.3f}"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {psutil.cpu_count()} logical CPUs"


def step_table(results: list[StepResult], device: torch.device) -> str:
    mem = "peak MiB (CUDA max allocated)" if device.type == "cuda" else "peak MiB (RSS growth)"
    rows = [[MODELS[r.model].label, f"{r.params / 1e6:.3f}M", str(r.batch), r.loss, "yes" if r.compiled else "no", r.precision,
             f"{r.median_s * 1e3:.2f}", f"{r.batch / r.median_s:.1f}", "-" if r.peak_mb is None else f"{r.peak_mb:.1f}"]
            for r in results]
    return table(["model", "params", "batch", "loss", "compiled", "precision", "median ms/step", "samples/s", mem], rows)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def ratio_table(results: list[StepResult]) -> str:
    by = {(r.model, r.compiled, r.precision, r.loss): r for r in results}
    rows = []
    for key in dict.fromkeys((r.model, r.compiled, r.precision) for r in results):
        fm = by[(*key, "mse")]
        row = [MODELS[key[0]].label, "yes" if key[1] else "no", key[2], f"{fm.median_s * 1e3:.2f}", str(len(fm.times))]
        for loss in LOSSES[1:]:
            mf = by[(*key, loss)]
            q1, q2, q3 = quartiles([m / f for m, f in zip(mf.times, fm.times, strict=True)])
            row += [f"{q2:.2f}x ({q1:.2f}-{q3:.2f})", f"{min(mf.times) / min(fm.times):.2f}x"]
        for loss in LOSSES[1:]:
            peak = by[(*key, loss)].peak_mb
            row.append("-" if peak is None or not fm.peak_mb else f"{peak / fm.peak_mb:.2f}x")
        row.append(f"{max(by[(*key, loss)].first_s for loss in LOSSES):.1f}" if key[1] else "-")
        rows.append(row)
    return table(["model", "compiled", "precision", "FM ms/step", "rounds", "fused / FM (IQR)", "fused best / FM best",
                  "separate / FM (IQR)", "separate best / FM best", "fused memory / FM", "separate memory / FM",
                  "first call s (compile)"], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"models {QUICK_MODELS}, short blocks, fewer samples")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--preset", choices=sorted(PRESETS), help="cuda: UNet CIFAR-10 and DiT-B/2, eager and compiled, fp32 and bf16")
    p.add_argument("--models", help=f"comma list from {list(MODELS)} (default {DEFAULT_MODELS})")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps of --compile-models")
    p.add_argument("--compile-models", default="mlp,cnn", help="models timed compiled with --compile")
    p.add_argument("--precision", default="fp32", help="comma list of fp32, bf16 (bf16: autocast around the loss)")
    p.add_argument("--repeats", type=int, help="minimum rounds (default 5, quick 3); more while a case lasts under repeats x 1.5 s (quick 0.3 s)")
    p.add_argument("--threads", type=int, help="torch intra-op threads; 1 is steadier on a shared CPU")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; no new case starts after it")
    p.add_argument("--profile", action="store_true", help="top operators per step and per-layer JVP costs")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    p.add_argument("--no-sampling", action="store_true", help="skip the sampling table")
    p.add_argument("--imf-models", default="", help="comma list: time iMF with the auxiliary head against MeanFlow on these "
                                                     "(e.g. unet_cifar,dit_s2)")
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    p.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "LOSS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in PRESETS.get(args.preset, {}).items():
        setattr(args, key, value if key != "time_limit" or args.time_limit is None else args.time_limit)
    if args.preset:
        args.compile = True
    args.models = (args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)).split(",")
    args.compile_models = args.compile_models.split(",")
    args.imf_models = [m for m in args.imf_models.split(",") if m]
    args.precision = args.precision.split(",")
    bad = [m for m in args.models + args.compile_models + args.imf_models if m not in MODELS]
    if bad:
        p.error(f"--models/--compile-models/--imf-models: unknown {bad}; expected names from {list(MODELS)}")
    if not set(args.precision) <= {"fp32", "bf16"}:
        p.error(f"--precision={','.join(args.precision)}: expected a comma list of fp32, bf16")
    if args.device not in ("cpu", "cuda", "mps") and not args.device.startswith("cuda:"):
        p.error(f"--device={args.device}: expected cpu, cuda, cuda:N or mps")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device={args.device} but CUDA is not available here: use --device cpu")
    if args.device == "mps" and not torch.backends.mps.is_available():
        p.error("--device=mps but this machine has no Apple MPS backend: use --device cpu")
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats}: expected >= 1")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe)))
        return ""
    started = time.perf_counter()
    out: list[str] = []

    def emit(*lines: str) -> None:
        print("\n".join(lines), flush=True)
        out.extend(lines)

    emit("# DenoisingZoo benchmark", "", f"`python scripts/benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
         f"torch {torch.__version__}, device {device}"
         + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
         + f", {torch.get_num_threads()} intra-op threads, {platform.processor() or platform.machine()}", "",
         f"At start: {load_line()}", "")
    cases = [(m, c, prec) for m in args.models for prec in args.precision
             for c in ([False, True] if args.compile and m in args.compile_models else [False])]
    results, notes = [], []
    for name, compiled, precision in cases:
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            notes.append(f"{MODELS[name].label}, compiled={compiled}, {precision}: skipped, --time-limit {args.time_limit:g} s spent")
            continue
        print(f"[step] {name} compiled={compiled} {precision} ...", file=sys.stderr, flush=True)
        try:
            case = bench_steps(name, device, compiled, precision, args.repeats, 0.3 if args.quick else 1.5)
            results += case
            fm = case[0].median_s
            print("        " + ", ".join(f"{r.loss} {r.median_s * 1e3:.1f} ms ({r.median_s / fm:.2f}x)" for r in case),
                  file=sys.stderr, flush=True)  # a partial record if a later case dies
        except (BackendCompilerFailed, InductorError) as err:  # a compiler bug is a result, not a reason to lose the rest
            notes.append(f"{MODELS[name].label}: torch.compile failed: {str(err).strip().splitlines()[0]}")
    if device.type == "cpu" and not args.no_memory:
        for r in results:
            if not r.compiled and r.precision == "fp32":
                r.peak_mb = cpu_peak_memory(r.model, r.loss)
    emit("## Training step", "", f"Median over interleaved rounds (one step per loss each) after warm-up; clip {GRAD_CLIP}, Adam, EMA.", "",
         step_table(results, device), "", "## MeanFlow over flow matching", "",
         "Median of the per-round ratios (interquartile range), and fastest over fastest; floor ~1.33x. "
         "Memory ratios on the CPU: eager fp32 RSS growth (fresh process per row).", "",
         ratio_table(results), "", *[f"- {n}" for n in notes], "", f"After the step benchmark: {load_line()}", "")

    if args.profile:
        emit("## Profile (eager, top ops by self time per step)", "")
        for name in args.models:
            for loss in ("mse", "meanflow-fused"):
                emit(f"### {MODELS[name].label}: {loss}", "", table(["op", "self ms / step", "calls / step"], profile_step(name, device, loss)), "")
        emit("### One layer: forward and torch.func.jvp (no grad), torch.nn vs models/layers.py", "",
             table(["layer", "torch.nn forward ms", "torch.nn jvp / forward", "ours forward ms", "ours jvp / forward"], layer_costs(device)), "")

    if args.imf_models:
        pairs, skipped = [], []
        for name in args.imf_models:
            for variant in imf_variants(name):
                for precision in args.precision:
                    if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
                        skipped.append(f"{MODELS[name].label}, {variant[0]}, {precision}: skipped, --time-limit {args.time_limit:g} s spent")
                        continue
                    print(f"[imf] {name} {variant[0]} {precision} ...", file=sys.stderr, flush=True)
                    pairs.append(bench_imf(name, variant, device, precision, args.repeats, 0.3 if args.quick else 1.5))
        emit("## iMF (auxiliary head) over MeanFlow", "",
             "The iMF step (predicted tangent from the head, loss_u + loss_v) over MeanFlow's fused step on the same "
             "trunk without the head, unconditional, eager; median of the per-round ratios (interquartile range), and "
             "fastest over fastest.", "", imf_table(pairs), "", *[f"- {n}" for n in skipped], "")

    sample_models = [m for m in args.models if m in SAMPLE_MODELS]
    if sample_models and not args.no_sampling:
        rows = []
        for name in sample_models:
            n = SAMPLE_MODELS[name] // 4 if args.quick else SAMPLE_MODELS[name]
            rows += bench_sampling(name, device, n, [1, 10] if args.quick else [1, 10, 100], min(args.repeats, 3))
        emit("## Sampling", "", "Wall time to draw N samples (untrained weights), median over interleaved repeats.", "",
             table(["model", "N", "sampler", "steps", "NFE", "median ms", "ms / NFE"], rows), "")
    emit(f"At end: {load_line()}; total {time.perf_counter() - started:.0f} s", "")
    text = "\n".join(out)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
