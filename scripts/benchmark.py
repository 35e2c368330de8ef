"""Training-step and sampling benchmark: flow matching vs MeanFlow, per model.

    python scripts/benchmark.py [--quick] [--device cpu|cuda|mps] [--models mlp,cnn,...]
                                [--compile] [--repeats N] [--threads N] [--profile]
                                [--experimental] [--out results.md]

Prints Markdown tables:

1. Training step: the median wall time of one full optimizer step (loss forward,
   backward, gradient clipping, Adam step, EMA update — what ``Trainer.train_step``
   does, without the data loader) on a fixed synthetic batch, with samples/s and peak
   memory, for the losses ``mse`` (flow matching), ``meanflow-fused`` and
   ``meanflow-separate`` (``MeanFlowLoss.jvp_mode``).
2. MeanFlow over flow matching: the ratio of those medians. The three losses share one
   model and optimizer and are measured in interleaved blocks (the order rotates every
   repeat), so load from other processes on the machine lands on all of them alike.
   The floor is about 4/3: MeanFlow adds one forward-mode (tangent) pass, which costs
   about one forward, to the forward + backward (≈ 3 forwards) of flow matching.
3. Sampling: wall time to draw N samples with each fixed-grid solver and step count,
   and with the MeanFlow 1- and 2-step sampler, with the network evaluations (NFE).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the measured steps
(weights, gradients, Adam moments and activations). On the CPU each (model, loss) runs
in a fresh subprocess that builds the model, optimizer and batch, reads its resident
set size (RSS), runs three steps and reports the peak RSS (``VmHWM``) minus that
baseline: activations, gradients, Adam moments and allocator slack, not the weights.

``--profile`` adds the operators that dominate the MeanFlow step (torch.profiler, self
time) and the cost of ``torch.func.jvp`` through single layers; ``--experimental`` an
alternative MeanFlow step defined in this file (a forward difference instead of the
JVP, see ``ExperimentalMeanFlowLoss``), labelled as such, with its target error.

On a CPU shared with other processes, ``--threads 1`` gives steadier numbers: with two
intra-op threads on two busy cores the OpenMP barriers stall (measured: an MLP forward
median 292 ms with 2 threads vs 38 ms with 1, best cases 33 vs 30 ms).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402  (getloadavg only)
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.exc import BackendCompilerFailed  # noqa: E402
from torch._inductor.exc import InductorError  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from dataloaders.base_dataloaders import BaseItem, broadcast_time, make_base_item, make_unified_flow_matching_input  # noqa: E402
from evaluation.sample import sample_flow, sample_meanflow  # noqa: E402
from losses.base_loss import BaseLoss  # noqa: E402
from models.jvp import rewound_rng  # noqa: E402
from losses.meanflow_loss import MeanFlowLoss, sample_time_pairs  # noqa: E402
from losses.mse_loss import FlowMatchingMSELoss  # noqa: E402
from models.checkpoint import build_model  # noqa: E402
from models.ema import EMA  # noqa: E402
from solvers.runge_kutta import SOLVERS  # noqa: E402
from train import LossModule  # noqa: E402

# ---------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model from its yaml in configs/model/, on synthetic data of ``data_shape``."""

    config: str  # configs/model/<config>.yaml
    data_shape: tuple[int, ...]
    batch_cpu: int
    batch_gpu: int
    overrides: dict = field(default_factory=dict)  # yaml keys replaced for this benchmark
    label: str = ""


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", (2,), 512, 4096, label="MLP 4x256, 2-D"),
    "cnn": ModelSpec("cnn", (3, 32, 32), 16, 128, label="SmallCNN, 3x32x32"),
    "unet_small": ModelSpec(
        "unet", (3, 16, 16), 8, 64,
        {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8]},
        label="UNet ch32 [1,2] attn@8, 3x16x16",
    ),
    "unet_cifar": ModelSpec("unet", (3, 32, 32), 2, 32, label="UNet CIFAR-10 (unet.yaml), 3x32x32"),
    "dit_s2": ModelSpec("dit_s", (4, 32, 32), 2, 32, label="DiT-S/2, 4x32x32 latents"),
}
DEFAULT_MODELS = "mlp,cnn,unet_small,dit_s2"  # unet_cifar is slow on a CPU: ask for it by name
QUICK_MODELS = "mlp,cnn"
LOSSES = ("mse", "meanflow-fused", "meanflow-separate")
EXPERIMENTAL_LOSS = "meanflow-exp"
SAMPLE_MODELS = {"mlp": 2000, "cnn": 64}  # model -> number of samples drawn
GRAD_CLIP = 1.0  # configs/train.yaml's default
FLOOR = 4 / 3
FD_STEP = 1e-4  # forward-difference step of the experimental loss


def model_config(name: str) -> dict:
    """The model's yaml with its data interpolations resolved against ``data_shape``."""
    spec = MODELS[name]
    node = OmegaConf.load(ROOT / "configs" / "model" / f"{spec.config}.yaml")
    for key, value in spec.overrides.items():
        node[key] = value
    root = OmegaConf.create({"dataloaders": {"data_shape": list(spec.data_shape), "num_classes": 0}, "model": node})
    return OmegaConf.to_container(root.model, resolve=True)


class ExperimentalMeanFlowLoss(MeanFlowLoss):
    """EXPERIMENTAL, benchmark only (not the project's loss): ``du/ds`` by a forward
    difference along the tangent instead of forward-mode AD,

        du/ds ≈ (u(z + h T) - u(z)) / h,      T = (v, 1, 0) on (x, s, t),

    with ``u(z)`` taken from the forward that builds the graph (detached) and one extra
    no-grad forward at ``z + h T`` under the same dropout mask. The step costs forward
    + backward + one forward, the 4/3 floor, because it avoids what makes the JVP slow
    on the CPU (see the profile): ``torch.func.jvp`` materialises a zero tangent for
    every weight and convolves / multiplies by it, and GroupNorm's forward-AD formula
    runs as dozens of element-wise ops. The price is an O(h) truncation error plus
    O(float32 eps / h) rounding in the (stop-gradient) target; ``target_error`` measures it.
    Measured: fine for the MLP (0.2 % at h = 1e-4, its time features stop at 16 rad),
    1-6 % for the image models, whose 1000x-scaled sinusoidal time embedding makes
    du/ds steep in s: no h is both small enough and above float32 rounding.
    """

    def __init__(self, step: float = FD_STEP, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step = step

    def prediction_and_target(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, label: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        wide = torch.promote_types(x.dtype, torch.float32)
        s, t, v = s.to(wide), t.to(wide), v.to(wide)
        z = make_unified_flow_matching_input(x.to(wide), s, t)
        tangent_z = make_unified_flow_matching_input(v, torch.ones_like(s), torch.zeros_like(t))
        with torch.autocast(x.device.type, enabled=False):
            with rewound_rng(x.device), torch.no_grad():
                u_ahead = model(z + self.step * tangent_z, label)
            u = model(z, label)  # the same dropout mask: the RNG was rewound
        dudt = (u_ahead.to(wide) - u.detach().to(wide)) / self.step
        target = v + broadcast_time(t - s, v) * dudt
        return u.to(wide), target.detach()


def target_error(name: str, device: torch.device, steps: list[float]) -> list[tuple[float, float]]:
    """Relative L2 error of the forward-difference ``du/ds`` against the exact JVP, per
    step size, on the synthetic batch in float32. The models zero their output layers
    at initialisation (du/ds = 0 exactly), so zero-initialised weights get N(0, 0.02²)
    noise first, a stand-in for trained weights."""
    torch.manual_seed(0)
    model = build_model(model_config(name)).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    batch = synthetic_batch(name, 8, device)
    s, t = sample_time_pairs(8, "paper", 0.75, -0.4, 1.0, device)
    sb = broadcast_time(s, batch.raw_target)
    x = (1 - sb) * batch.raw_source + sb * batch.raw_target
    v = batch.raw_target - batch.raw_source
    _, exact = MeanFlowLoss(jvp_mode="separate").prediction_and_target(model, x, s, t, v, None)
    rows = []
    for h in steps:
        _, approx = ExperimentalMeanFlowLoss(step=h).prediction_and_target(model, x, s, t, v, None)
        # compare du/ds itself: target - v = (t - s) du/ds, so divide the interval back out where it is not 0
        keep = (t - s) > 1e-3
        d_exact = (exact - v)[keep] / broadcast_time((t - s)[keep], v[keep])
        d_approx = (approx - v)[keep] / broadcast_time((t - s)[keep], v[keep])
        rows.append((h, float((d_approx - d_exact).norm() / d_exact.norm())))
    return rows


def make_loss(name: str) -> BaseLoss:
    if name == "mse":
        return FlowMatchingMSELoss()
    if name == EXPERIMENTAL_LOSS:
        return ExperimentalMeanFlowLoss()
    return MeanFlowLoss(jvp_mode=name.removeprefix("meanflow-"))


def synthetic_batch(name: str, batch: int, device: torch.device) -> BaseItem:
    shape = MODELS[name].data_shape
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(batch, *shape, generator=gen)
    x0 = torch.randn(batch, *shape, generator=gen)
    t = torch.rand(batch, generator=gen)
    return make_base_item(x1, x0, t).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class StepBench:
    """One model, optimizer and EMA shared by every loss, so the losses differ in the
    loss alone; ``step(loss)`` is ``Trainer.train_step`` without the loader."""

    def __init__(self, name: str, device: torch.device, losses: list[str], compiled: bool) -> None:
        torch.manual_seed(0)
        self.name, self.device = name, device
        self.model = build_model(model_config(name)).to(device).train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.batch_size = MODELS[name].batch_gpu if device.type == "cuda" else MODELS[name].batch_cpu
        self.batch = synthetic_batch(name, self.batch_size, device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.ema = EMA(self.model, 0.999)
        self.modules: dict[str, nn.Module] = {}
        for loss in losses:
            module = LossModule(self.model, make_loss(loss).to(device))
            # dynamic=False: the shapes never change here, and automatic dynamic shapes (the
            # default once a frame recompiles, e.g. the model's forward under a second loss)
            # hit an Inductor error on SmallCNN + MeanFlow with torch 2.14 on the CPU
            self.modules[loss] = torch.compile(module, dynamic=False) if compiled else module

    def step(self, loss_name: str) -> None:
        loss = self.modules[loss_name](self.batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.ema.update(self.model, self.batch_size)

    def timed_step(self, loss_name: str) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self.step(loss_name)
        synchronize(self.device)
        return time.perf_counter() - start


# ---------------------------------------------------------------------------------
# Training step: timing (interleaved) and memory
# ---------------------------------------------------------------------------------


@dataclass
class StepResult:
    model: str
    loss: str
    compiled: bool
    batch: int
    params: int
    median_s: float
    steps: int
    warmup_s: float  # the first call (includes compilation when compiled)
    peak_mb: float | None = None


def bench_steps(name: str, device: torch.device, losses: list[str], compiled: bool, repeats: int, block_s: float,
                warmup: int) -> list[StepResult]:
    """Median step time per loss. Every repeat runs one block of ``n`` steps per loss,
    in an order rotated by one each repeat; ``n`` is chosen from the warm-up so that a
    block lasts about ``block_s`` seconds for the slowest loss."""
    bench = StepBench(name, device, losses, compiled)
    first: dict[str, float] = {}
    slowest = 0.0
    for loss in losses:
        first[loss] = bench.timed_step(loss)
        for _ in range(warmup - 1):
            slowest = max(slowest, bench.timed_step(loss))
        slowest = max(slowest, bench.timed_step(loss))
    n = max(1, min(50, round(block_s / slowest)))
    times: dict[str, list[float]] = {loss: [] for loss in losses}
    peaks: dict[str, float] = {loss: 0.0 for loss in losses}
    for r in range(repeats):
        for loss in losses[r % len(losses):] + losses[: r % len(losses)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[loss] += [bench.timed_step(loss) for _ in range(n)]
            if device.type == "cuda":
                peaks[loss] = max(peaks[loss], torch.cuda.max_memory_allocated(device) / 2**20)
    return [
        StepResult(name, loss, compiled, bench.batch_size, bench.n_params, statistics.median(times[loss]), len(times[loss]),
                   first[loss], peaks[loss] if device.type == "cuda" else None)
        for loss in losses
    ]


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux ``VmHWM`` of /proc/self/status: ``ru_maxrss``
    survives ``exec``, so a child started by a big parent would report the parent's RSS."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes


def memory_probe(name: str, loss: str, device: torch.device) -> dict:
    """Run in a fresh process (``--memory-probe``): RSS growth over three steps."""
    bench = StepBench(name, device, [loss], compiled=False)
    before = rss_bytes()
    for _ in range(3):
        bench.step(loss)
    return {"before_mb": before / 2**20, "peak_mb": peak_rss_bytes() / 2**20, "delta_mb": (peak_rss_bytes() - before) / 2**20}


def cpu_peak_memory(name: str, loss: str) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, loss, "--device", "cpu",
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["delta_mb"]


# ---------------------------------------------------------------------------------
# Profile of one step
# ---------------------------------------------------------------------------------


def profile_step(name: str, device: torch.device, loss: str, top: int) -> list[tuple[str, float, int]]:
    """(op, self time ms per step, calls per step) of the ``top`` ops of one step."""
    from torch.profiler import ProfilerActivity, profile

    bench = StepBench(name, device, [loss], compiled=False)
    for _ in range(2):
        bench.step(loss)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 3
    with profile(activities=activities) as prof:
        for _ in range(steps):
            bench.step(loss)
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [(e.key, getattr(e, key) / 1000 / steps, e.count // steps) for e in events]


class WeightConstantLinear(torch.autograd.Function):
    """EXPERIMENTAL, benchmark only: ``F.linear`` whose forward-mode rule treats the
    weight as a constant (``t_out = t_x Wᵀ``), the only case MeanFlow's JVP needs. The
    built-in rule also multiplies by the weight's (zero) tangent: a wasted matmul."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def jvp(ctx, tx: Tensor, tw: Tensor | None, tb: Tensor | None) -> Tensor:
        (weight,) = ctx.saved_tensors
        return nn.functional.linear(tx, weight)


class WeightConstantConv(torch.autograd.Function):
    """EXPERIMENTAL, benchmark only: a 3x3 same-padding ``conv2d`` whose forward-mode rule
    is ``conv(t_x, W)`` alone (the built-in rule adds ``conv(x, t_W)`` with a zero ``t_W``)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return nn.functional.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def jvp(ctx, tx: Tensor, tw: Tensor | None, tb: Tensor | None) -> Tensor:
        (weight,) = ctx.saved_tensors
        return nn.functional.conv2d(tx, weight, None, padding=1)


def layer_jvp_costs(device: torch.device) -> list[tuple[str, float, float, int]]:
    """(layer, forward ms, no-grad JVP ms, convolution/matmul calls inside the JVP) for the
    building blocks of the models: a JVP should cost about two forwards (primal + tangent)."""
    from torch.profiler import profile

    x = torch.randn(16, 40, 32, 32, device=device)
    a = torch.randn(512, 256, device=device)
    conv, linear = nn.Conv2d(40, 40, 3, padding=1).to(device), nn.Linear(256, 256).to(device)
    layers = [("Conv2d 40->40 3x3, 16x40x32x32", conv, x),
              ("EXPERIMENTAL WeightConstantConv, same", lambda i: WeightConstantConv.apply(i, conv.weight, conv.bias), x),
              ("Linear 256->256, 512x256", linear, a),
              ("EXPERIMENTAL WeightConstantLinear, same", lambda i: WeightConstantLinear.apply(i, linear.weight, linear.bias), a),
              ("GroupNorm(8, 40), 16x40x32x32", nn.GroupNorm(8, 40).to(device), x),
              ("SiLU, 16x40x32x32", nn.SiLU(), x)]
    heavy = ("aten::mkldnn_convolution", "aten::convolution_overrideable", "aten::cudnn_convolution", "aten::mm", "aten::addmm")
    rows = []
    for label, layer, inp in layers:
        tangent = torch.randn_like(inp)
        with torch.no_grad():
            fwd = median_time(lambda: layer(inp), device, 20)
            jvp = median_time(lambda: torch.func.jvp(layer, (inp,), (tangent,)), device, 20)
            with profile() as prof:
                torch.func.jvp(layer, (inp,), (tangent,))
        calls = sum(e.count for e in prof.key_averages() if e.key in heavy)
        rows.append((label, fwd * 1e3, jvp * 1e3, calls))
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


# ---------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------


@dataclass
class SampleResult:
    model: str
    n: int
    sampler: str
    steps: int
    nfe: int
    median_s: float


def bench_sampling(name: str, device: torch.device, n: int, step_counts: list[int], repeats: int) -> list[SampleResult]:
    """Samplers of one model, interleaved per repeat like the step benchmark."""
    torch.manual_seed(0)
    model = build_model(model_config(name)).to(device).eval()
    x0 = torch.randn(n, *MODELS[name].data_shape, generator=torch.Generator().manual_seed(0)).to(device)
    jobs: dict[tuple[str, int], Callable[[], int]] = {}
    for solver in SOLVERS:
        for k in step_counts:
            jobs[(solver, k)] = lambda solver=solver, k=k: sample_flow(model, x0, solver=solver, num_steps=k).nfe
    for k in (1, 2):
        jobs[("meanflow", k)] = lambda k=k: sample_meanflow(model, x0, num_steps=k).nfe
    for solver in SOLVERS:  # warm-up: one step of each solver
        sample_flow(model, x0, solver=solver, num_steps=1)
    nfe: dict[tuple[str, int], int] = {}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, job in jobs.items():
            synchronize(device)
            start = time.perf_counter()
            nfe[key] = job()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    return [SampleResult(name, n, s, k, nfe[(s, k)], statistics.median(times[(s, k)])) for (s, k) in jobs]


# ---------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {psutil.cpu_count()} logical CPUs"


def step_table(results: list[StepResult], device: torch.device) -> str:
    rows = []
    for r in results:
        mem = "-" if r.peak_mb is None else f"{r.peak_mb:.1f}"
        rows.append([MODELS[r.model].label, f"{r.params / 1e6:.3f}M", str(r.batch), r.loss, "yes" if r.compiled else "no",
                     f"{r.median_s * 1e3:.2f}", f"{r.batch / r.median_s:.1f}", mem, str(r.steps)])
    mem_header = "peak MiB (CUDA max allocated)" if device.type == "cuda" else "peak MiB (RSS growth)"
    return table(["model", "params", "batch", "loss", "compiled", "median ms/step", "samples/s", mem_header, "steps timed"], rows)


def ratio_table(results: list[StepResult]) -> str:
    by_key = {(r.model, r.compiled, r.loss): r for r in results}
    rows = []
    for model, compiled in dict.fromkeys((r.model, r.compiled) for r in results):
        fm = by_key[(model, compiled, "mse")]
        row = [MODELS[model].label, "yes" if compiled else "no", f"{fm.median_s * 1e3:.2f}"]
        for loss in (*LOSSES[1:], EXPERIMENTAL_LOSS):
            mf = by_key.get((model, compiled, loss))
            row.append("-" if mf is None else f"{mf.median_s / fm.median_s:.2f}x")
        fused = by_key[(model, compiled, "meanflow-fused")].median_s / fm.median_s
        row.append("yes" if fused <= 1.5 else "**no**")
        compile_s = max(by_key[(model, compiled, loss)].warmup_s for loss in LOSSES) if compiled else None
        row.append("-" if compile_s is None else f"{compile_s:.1f}")
        rows.append(row)
    return table(["model", "compiled", "FM ms/step", "fused / FM", "separate / FM", "experimental / FM",
                  "fused <= 1.5x", "first call s (compile)"], rows)


def sample_table(results: list[SampleResult]) -> str:
    rows = [[MODELS[r.model].label, str(r.n), r.sampler, str(r.steps), str(r.nfe), f"{r.median_s * 1e3:.2f}",
             f"{r.median_s * 1e3 / r.nfe:.3f}"] for r in results]
    return table(["model", "N", "sampler", "steps", "NFE", "median ms", "ms / NFE"], rows)


def profile_table(ops: list[tuple[str, float, int]]) -> str:
    return table(["op", "self ms / step", "calls / step"], [[op, f"{ms:.2f}", str(calls)] for op, ms, calls in ops])


# ---------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small run (models {QUICK_MODELS}, short blocks, N/4 samples, 1 and 10 sampling steps)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--models", default=None, help=f"comma list from {list(MODELS)} (default {DEFAULT_MODELS})")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps for --compile-models")
    parser.add_argument("--compile-models", default="mlp,cnn", help="models timed compiled with --compile")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved blocks per loss (default 5, quick 3)")
    parser.add_argument("--sample-repeats", type=int, default=None, help="sampling repeats (default min(repeats, 3))")
    parser.add_argument("--profile", action="store_true", help="profile the FM and fused MeanFlow steps of each model")
    parser.add_argument("--experimental", action="store_true", help=f"also time {EXPERIMENTAL_LOSS} (ExperimentalMeanFlowLoss)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    parser.add_argument("--no-sampling", action="store_true", help="skip the sampling table")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a shared, loaded CPU")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    names = [m for m in args.models.split(",") if m]
    bad = [m for m in names + args.compile_models.split(",") if m not in MODELS]
    if bad:
        parser.error(f"--models/--compile-models: unknown {bad}; expected names from {list(MODELS)}")
    args.models = names
    args.compile_models = [m for m in args.compile_models.split(",") if m in names]
    if args.device not in ("cpu", "cuda", "mps") and not args.device.startswith("cuda:"):
        parser.error(f"--device={args.device}: expected cpu, cuda, cuda:N or mps")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device={args.device} but CUDA is not available here: use --device cpu")
    if args.device == "mps" and not torch.backends.mps.is_available():
        parser.error("--device=mps but this machine has no Apple MPS backend: use --device cpu")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: expected >= 1")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe, device)))
        return ""
    block_s = 0.3 if args.quick else 1.5
    warmup = 2 if args.quick else 3
    step_counts = [1, 10] if args.quick else [1, 10, 100]
    losses = [*LOSSES, EXPERIMENTAL_LOSS] if args.experimental else list(LOSSES)
    started = time.perf_counter()
    out = [
        "# DenoisingZoo benchmark",
        "",
        f"`python scripts/benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} intra-op threads, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "",
        f"At start: {load_line()}",
        "",
    ]
    print("\n".join(out), flush=True)

    results: list[StepResult] = []
    compile_failures: list[str] = []
    for name in args.models:
        print(f"[step] {name} ...", file=sys.stderr, flush=True)
        results += bench_steps(name, device, losses, False, args.repeats, block_s, warmup)
        if args.compile and name in args.compile_models:
            print(f"[step] {name} compiled ...", file=sys.stderr, flush=True)
            try:
                results += bench_steps(name, device, losses, True, args.repeats, block_s, warmup)
            except (BackendCompilerFailed, InductorError) as err:
                # a compiler bug is a result to report, not a reason to lose the other rows
                compile_failures.append(f"{MODELS[name].label}: torch.compile failed: {str(err).strip().splitlines()[0]}")
    if device.type == "cpu" and not args.no_memory:
        for r in results:
            if not r.compiled:
                print(f"[memory] {r.model} {r.loss} ...", file=sys.stderr, flush=True)
                r.peak_mb = cpu_peak_memory(r.model, r.loss)
    mem_note = ("peak memory = torch.cuda.max_memory_allocated over the timed steps (weights, grads, Adam, activations)"
                if device.type == "cuda" else
                "peak memory = peak RSS (VmHWM / ru_maxrss) minus RSS after building model, optimizer and batch, "
                "in a fresh process per row, over 3 eager steps (activations, grads, Adam moments; not the weights)")
    section = [
        "## Training step",
        "",
        f"One full optimizer step (loss forward, backward, clip to {GRAD_CLIP}, Adam, EMA) on a fixed synthetic batch; "
        f"median over {args.repeats} interleaved blocks per loss after {warmup} warm-up steps; {mem_note}.",
        "",
        step_table(results, device),
        "",
        "## MeanFlow over flow matching",
        "",
        f"Ratio of median step times, same model, batch and process, measured interleaved. Goal <= 1.5x; floor ~{FLOOR:.2f}x. "
        + ("`experimental` = ExperimentalMeanFlowLoss in this script (not the project's loss). " if args.experimental else "")
        + "First call = the first step (includes compilation when compiled).",
        "",
        ratio_table(results),
        "",
        *[f"- {line}" for line in compile_failures],
        "",
        f"After the step benchmark: {load_line()}",
        "",
    ]
    print("\n".join(section), flush=True)
    out += section

    if args.profile:
        section = ["## Profile (eager, top ops by self time per step)", ""]
        for name in args.models:
            for loss in ("mse", "meanflow-fused"):
                print(f"[profile] {name} {loss} ...", file=sys.stderr, flush=True)
                section += [f"### {MODELS[name].label}: {loss}", "", profile_table(profile_step(name, device, loss, 12)), ""]
        rows = [[label, f"{fwd:.2f}", f"{jvp:.2f}", f"{jvp / fwd:.2f}x", str(calls)] for label, fwd, jvp, calls in layer_jvp_costs(device)]
        section += ["### One layer: forward vs torch.func.jvp (no grad)", "",
                    table(["layer", "forward ms", "jvp ms", "jvp / forward", "conv/matmul calls in jvp"], rows), ""]
        print("\n".join(section), flush=True)
        out += section

    if args.experimental:
        steps = [1e-2, 1e-3, 1e-4, 3e-5]
        rows = []
        for name in args.models:
            errors = dict(target_error(name, device, steps))
            rows.append([MODELS[name].label] + [f"{errors[h]:.2e}" for h in steps])
        section = ["## Experimental forward-difference du/ds: relative error against the JVP", "",
                   f"float32, weights zero at init replaced by N(0, 0.02^2); the timed experimental loss uses h = {FD_STEP:g}.", "",
                   table(["model"] + [f"h = {h:g}" for h in steps], rows), ""]
        print("\n".join(section), flush=True)
        out += section

    sample_models = [m for m in args.models if m in SAMPLE_MODELS]
    if sample_models and not args.no_sampling:
        samples: list[SampleResult] = []
        for name in sample_models:
            print(f"[sample] {name} ...", file=sys.stderr, flush=True)
            n = SAMPLE_MODELS[name] // 4 if args.quick else SAMPLE_MODELS[name]
            samples += bench_sampling(name, device, n, step_counts, args.sample_repeats or min(args.repeats, 3))
        section = [
            "## Sampling",
            "",
            "Wall time to draw N samples from noise (untrained weights: the time does not depend on them), "
            "median over interleaved repeats; fixed-grid solvers on u(x, t, t), MeanFlow on u(x, s, t).",
            "",
            sample_table(samples),
            "",
        ]
        print("\n".join(section), flush=True)
        out += section

    tail = [f"At end: {load_line()}; total {time.perf_counter() - started:.0f} s", ""]
    print("\n".join(tail), flush=True)
    out += tail
    text = "\n".join(out)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
