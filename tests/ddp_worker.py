"""A torchrun worker for tests/test_ddp.py, built from the real training pieces.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT key=value ...

1. Take the first batch of this rank's shard, run one real ``Trainer.train_step``
   (DDP-wrapped loss) and save what the test needs to recompute that step in one
   process: the initial weights, this rank's batch and RNG state, and the gradients
   after the all-reduce.
2. ``fit()``, then save this rank's final weights (rank 0 also writes last.pt).
3. The traps, each message written to OUT: (a) the loss computed through the
   wrapper's ``.module``, outside DDP's forward, so no gradient is all-reduced: the
   agreement check after the step must raise; (b) rank 1's batch poisoned with a
   NaN: every rank must stop with the non-finite error, not only rank 1.
"""

import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

import launcher
import train
from dataloaders.base_dataloaders import make_train_loader
from runs.errors import RunError
from runs.machine import process_group


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = launcher.compose(overrides)
    OmegaConf.resolve(cfg)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with process_group(cfg.device, rank, world, int(os.environ["LOCAL_RANK"])):
        trainer = train.Trainer(cfg, rank, world, int(os.environ["LOCAL_RANK"]))
        batch = next(iter(make_train_loader(cfg, trainer.train_set, 0, rank, world)))
        init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        rng = torch.get_rng_state()
        trainer.train_step(batch)
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
        items = {k: v for k, v in asdict(batch).items() if v is not None}
        torch.save({"init": init, "rng": rng, "batch": items, "grads": grads}, out / f"step1_rank{rank}.pt")
        trainer.fit()
        torch.save(trainer.model.state_dict(), out / f"final_rank{rank}.pt")

        messages = []
        # A fresh optimizer at a constant rate: the run's schedule may have decayed to 0 by now.
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
        wrapped = trainer.step_module
        trainer.step_module = wrapped.module  # the trap: DDP's forward (and its all-reduce) bypassed
        trainer.ranks_checked = False
        batch = next(iter(make_train_loader(cfg, trainer.train_set, 1, rank, world)))
        try:
            trainer.train_step(batch)
        except RunError as err:
            messages.append(str(err))
        trainer.step_module = wrapped
        if rank == 1:
            batch.raw_source[0, 0] = float("nan")
        try:
            trainer.train_step(batch)
        except RunError as err:
            messages.append(str(err))
        (out / f"traps_rank{rank}.txt").write_text("\n".join(messages) + "\n")


if __name__ == "__main__":
    main()
