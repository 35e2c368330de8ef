"""Where a run runs: its device, its RNG streams and its process group."""

import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from runs.errors import RunError, TrainingFailed

DIST_TIMEOUT = timedelta(minutes=60)  # rank 0 may evaluate (FID) for long while the others wait

# The run's seeded streams besides the global RNG (docs/design.md, "Exact resume"). Each is a
# generator of its own, so drawing from one never shifts another; the stride keeps the data
# orders of (seed, epoch) and (seed + 1, epoch') apart.
SEED_STRIDE = 1_000_003  # a prime above any epoch or step count: seed * SEED_STRIDE + epoch is unique
REFERENCE_DRAW = 12345  # which held-out and reference samples evaluation compares against
SAMPLE_NOISE = 777  # the noise evaluation samples from (the same at every evaluation)
FID_NOISE = 999  # the noise of the FID sample set
RENOISE = 5_555  # a re-noising sampler's fresh noise, for samples whose x_0 came from seed s: s + RENOISE


def data_order_seed(seed: int, epoch: int) -> int:
    """Epoch ``epoch``'s data order: fixed by (seed, epoch), so a resumed run continues it."""
    return seed * SEED_STRIDE + epoch


def rank_reseed(seed: int, rank: int, step: int) -> int:
    """A resumed DDP rank's fresh stream (every rank loaded rank 0's RNG state)."""
    return (seed + rank) * SEED_STRIDE + step


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RunError("device=mps but this machine has no Apple MPS backend: use device=auto or device=cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RunError(f"device={name} but CUDA is not available on this machine: use device=auto or device=cpu")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise RunError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0..")
    elif name not in ("cpu", "mps"):
        raise RunError(f"device={name}: expected auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def setup_machine(cfg, rank: int = 0, world: int = 1, local_rank: int = 0) -> torch.device:
    """The device of this process (under torchrun, CUDA's GPU ``local_rank``), its global RNG
    seeded with ``seed + rank``, and CUDA's TF32 and cuDNN autotuning as the config says."""
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
    seed_everything(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


@contextmanager
def rewound_rng(device: torch.device) -> Iterator[None]:
    """Run the block, then put the RNG back where it was, so whatever runs next draws
    the same numbers (one dropout mask for two passes; probes that must not shift
    the stream that exact resume depends on)."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    mps_state = torch.mps.get_rng_state() if device.type == "mps" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        if mps_state is not None:
            torch.mps.set_rng_state(mps_state)


@contextmanager
def process_group(device_name: str, rank: int, world: int, local_rank: int):
    """NCCL with one GPU per process on CUDA, gloo on the CPU; torn down on any exit."""
    device = resolve_device(device_name)
    if device.type == "mps":
        raise RunError("device=mps cannot run under torchrun (no collective backend for MPS): run one process, or use device=cpu")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RunError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA device(s): "
                           "set --nproc_per_node to at most the number of GPUs")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=DIST_TIMEOUT, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=DIST_TIMEOUT)
    try:
        yield
        # Every rank is done before the connections close: a rank that tears down first
        # can make a peer still inside gloo abort (SIGABRT) instead of exiting.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_ranks_agree(model, step: int) -> None:
    """Every rank must hold the same weights after a step. If they differ, the gradient
    all-reduce was skipped (e.g. a loss that reaches the model through ``model.module``
    outside the DDP forward) and each rank trains alone."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    high, low = sums.clone(), sums.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise TrainingFailed(f"ranks disagree after step {step}: gradient synchronisation is broken "
                             "(the loss must run inside the DDP-wrapped forward; calling model.module skips the all-reduce)")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile's ``OptimizedModule`` and DDP."""
    while isinstance(model, (torch._dynamo.eval_frame.OptimizedModule, nn.parallel.DistributedDataParallel)):
        model = model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model.module
    return model
