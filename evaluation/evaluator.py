"""Evaluation of a model, shared by training and ``eval_checkpoint``.

The evaluator asks the loss how its model samples (``BaseLoss.samplers``): a solver on
the diagonal ``u(x, t, t)``, k-step mean-flow jumps, whatever a new loss returns. For
each sampler it reports the energy distance of the samples to held-out data beside
the floor (two independent data draws of the same size, which no model can beat), and
for image runs FID where the sampler asks for it. Noise comes from fixed generators (x_0,
the labels, and the fresh noise of a re-noising sampler, restarted for each set), so
the numbers at an epoch are a function of the weights alone: ``eval_checkpoint``
reproduces what the run logged, and evaluation never shifts the training RNG stream.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import Dataset

from dataloaders.base_dataloaders import make_dataset, stack_targets
from evaluation.energy_distance import energy_distance
from evaluation.plots import save_grid, save_plot
from evaluation.sample import fixed_noise, renoise_seed
from losses.base_loss import BaseLoss, build_loss
from runs.build import build_vae
from runs.checkpoint import write_text_atomic
from runs.errors import RunError
from runs.layout import RunLayout, write_error
from runs.machine import FID_NOISE, REFERENCE_DRAW, SAMPLE_NOISE, resolve_device
from runs.stored import load_model_from_checkpoint
from solvers.sampling import Sampler


def mean_energy_distance(x: Tensor, y: Tensor, block: int) -> float:
    """The energy distance averaged over consecutive blocks of ``block`` rows: an estimate
    with the bias of one block of that size and a fraction of its spread (a single draw
    of 2000 points varies by about the size of the floor itself)."""
    values = [energy_distance(x[i : i + block], y[i : i + block]) for i in range(0, x.shape[0], block)]
    return sum(values) / len(values)


def reference_sets(cfg: DictConfig, test: Dataset, reference: Dataset) -> tuple[Tensor, Tensor, int]:
    """Held-out data and an independent data draw (for the floor), ``repeats`` blocks of
    ``n`` samples each (``n`` shrinks to fit small held-out sets); returns them and ``n``."""
    repeats = cfg.eval.repeats
    n = min(cfg.eval.num_samples, len(test) // repeats, len(reference) // repeats)
    if n < 2:
        raise RunError(f"eval.repeats={repeats} leaves fewer than 2 held-out samples per block ({len(test)} in all): lower eval.repeats")
    gen = torch.Generator().manual_seed(cfg.seed + REFERENCE_DRAW)
    pick_test = torch.randperm(len(test), generator=gen)[: n * repeats].tolist()
    pick_ref = torch.randperm(len(reference), generator=gen)[: n * repeats].tolist()
    return stack_targets(test, pick_test)[0].float(), stack_targets(reference, pick_ref)[0].float(), n


class Evaluator:
    """Samples the (EMA) model with every sampler its loss names and scores them.

    Args:
        cfg: the run's resolved config.
        loss: the run's loss (asked for its samplers).
        device: where sampling runs.
        vae: the run's VAE for latent data (decodes samples for grids and FID), else None.
    """

    def __init__(self, cfg: DictConfig, loss: BaseLoss, device: torch.device, vae: nn.Module | None = None) -> None:
        self.cfg, self.device, self.vae = cfg, device, vae
        self.samplers: dict[str, Sampler] = loss.samplers(cfg.eval, cfg.solver, cfg.model.num_classes)
        self.is_image = len(cfg.dataloaders.data_shape) == 3
        test, reference = (make_dataset(cfg.dataloaders, split, vae) for split in ("test", "reference"))
        self.held_out, reference_data, self.block = reference_sets(cfg, test, reference)
        self.floor = mean_energy_distance(self.held_out, reference_data, self.block)
        self.fid_extractor = None
        if cfg.eval.fid.enabled:
            from evaluation.fid import make_feature_extractor

            self.fid_extractor = make_feature_extractor(cfg.eval.fid.feature_extractor)

    @torch.no_grad()
    def generate(self, model: nn.Module, sampler: Sampler, x0: Tensor, labels: Tensor | None, seed: int) -> tuple[Tensor, float]:
        """Samples from noise ``x0`` (CPU, drawn with ``seed``) in chunks of ``eval.batch_size``,
        on the CPU, and the mean network evaluations per sample. A sampler that draws noise of
        its own (consistency sampling) restarts it first, so the set is the same every time."""
        sampler.reseed(renoise_seed(seed))
        size, out, nfe = self.cfg.eval.batch_size, [], []
        for i in range(0, x0.shape[0], size):
            y = None if labels is None else labels[i : i + size].to(self.device)
            out.append(sampler(model, x0[i : i + size].to(self.device), y).float().cpu())
            nfe.append(sampler.nfe * out[-1].shape[0])
        return torch.cat(out), sum(nfe) / x0.shape[0]

    @torch.no_grad()
    def to_images(self, x: Tensor) -> Tensor:
        """Model-space samples -> images in [-1, 1] (VAE-decoded for latent data)."""
        if self.vae is None:
            return x.clamp(-1, 1)
        chunks = [self.vae.decode(x[i : i + 32].to(self.device)).float().cpu() for i in range(0, x.shape[0], 32)]
        return torch.cat(chunks).clamp(-1, 1)

    def picture(self, samples: dict[str, Tensor], path: Path, title: str) -> Path:
        """A grid of each sampler's first 64 images (decoded), or a scatter over the data."""
        if self.is_image:
            return save_grid({k: self.to_images(v[:64]) for k, v in samples.items()}, path)
        return save_plot(samples, self.held_out, path, title)

    @torch.no_grad()
    def fid(self, model: nn.Module, sampler: Sampler) -> float:
        from evaluation.fid import compute_fid, fid_against_images

        fcfg = self.cfg.eval.fid
        x0, labels = fixed_noise(self.cfg, fcfg.num_samples, self.cfg.seed + FID_NOISE)
        images = self.to_images(self.generate(model, sampler, x0, labels, self.cfg.seed + FID_NOISE)[0])
        if fcfg.reference == "heldout":
            return fid_against_images(images, self.to_images(self.held_out), fcfg.mode, self.fid_extractor,
                                      fcfg.batch_size, self.device)
        return compute_fid(images, fcfg.reference, mode=fcfg.mode, feature_extractor=self.fid_extractor,
                           batch_size=fcfg.batch_size, device=self.device, dataset_split=fcfg.dataset_split)

    @torch.no_grad()
    def __call__(self, model: nn.Module, prefix: str = "eval") -> tuple[dict[str, float], dict[str, Tensor]]:
        """Returns (metrics, samples by sampler name) for ``model``; metric names are
        ``{prefix}/energy_distance[_{sampler.metric}]``, ``{prefix}/fid[_...]`` and
        ``{prefix}/nfe[_...]``, beside ``{prefix}/energy_distance_floor``."""
        was_training = model.training
        model.eval()  # the raw weights are evaluated too: no dropout at sampling
        x0, labels = fixed_noise(self.cfg, self.held_out.shape[0], self.cfg.seed + SAMPLE_NOISE)
        metrics: dict[str, float] = {f"{prefix}/energy_distance_floor": self.floor}
        samples = {}
        for name, sampler in self.samplers.items():
            suffix = f"_{sampler.metric}" if sampler.metric else ""
            samples[name], nfe = self.generate(model, sampler, x0, labels, self.cfg.seed + SAMPLE_NOISE)
            metrics[f"{prefix}/energy_distance{suffix}"] = mean_energy_distance(samples[name], self.held_out, self.block)
            metrics[f"{prefix}/nfe{suffix}"] = nfe
            if self.cfg.eval.fid.enabled and sampler.fid:
                metrics[f"{prefix}/fid{suffix}"] = self.fid(model, sampler)
        model.train(was_training)
        return metrics, samples


def content_digest(path: Path) -> str:
    """The first 12 hex digits of the sha256 of a file (of a folder's files, in name order)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def eval_settings(cfg: DictConfig) -> dict:
    """What an evaluation's numbers depend on besides the weights: the evaluation and
    solver settings and the seed (names ``eval_checkpoint``'s result file)."""
    return {"eval": OmegaConf.to_container(cfg.eval, resolve=True), "solver": OmegaConf.to_container(cfg.solver, resolve=True),
            "seed": int(cfg.seed)}


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.eval_checkpoint`` with ``cfg``: the stored run's config with this
    command line's evaluation settings and this machine's file locations
    (``evaluation/stored_config.py`` builds it). With no setting typed, the numbers match
    the ones the run logged at that epoch. Prints the result and writes it as JSON to
    ``<output_dir>/eval/<run>/epoch_XXXX_<weights>_<file digest>_<settings digest>.json``,
    after checking that folder can be written and before sampling. The file holds the
    settings (``eval_settings``) and what each sampler made of them (``Sampler.settings``)."""
    device = resolve_device(cfg.device)
    weights = str(cfg.eval.weights)  # ema (the main EMA) | raw | one of the run's ema.decays
    settings = eval_settings(cfg)
    settings_digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    model, _, state = load_model_from_checkpoint(cfg.eval_checkpoint, device, use_ema=weights != "raw")
    if Path(cfg.eval_checkpoint).expanduser().is_dir() and weights != state["weights"]:  # an export: one set of weights
        raise RunError(f"eval.weights={weights}: {cfg.eval_checkpoint} is an export of the {state['weights']} weights only: "
                       f"drop eval.weights, or export the {weights} weights (scripts/export.py --weights)")
    if weights not in ("ema", "raw"):
        kept = state.get("emas", {})
        key = f"{float(weights):g}" if weights.replace(".", "", 1).isdigit() else weights
        if key not in kept:
            raise RunError(f"eval.weights={weights}: {cfg.eval_checkpoint} keeps ema, raw{''.join(', ' + k for k in kept)}")
        model.load_state_dict(kept[key])
    vae = build_vae(cfg.dataloaders, device)
    evaluator = Evaluator(cfg, build_loss(cfg.loss), device, vae)  # reads the data: refusals come before any folder
    out_dir = RunLayout.of(cfg).eval_dir
    if (err := write_error(out_dir)) is not None:  # before sampling, which may take hours
        raise RunError(f"output_dir={cfg.output_dir}: cannot write {out_dir} ({err}): choose a writable output_dir")
    metrics, _ = evaluator(model)
    # What each sampler was built with besides: the guidance a null eval.guidance_scale left to the loss, the grids.
    used = {name: sampler.settings() for name, sampler in evaluator.samplers.items()}
    result = {"checkpoint": str(cfg.eval_checkpoint), "run_name": cfg.run_name, "epoch": int(state["epoch"]),
              "step": int(state["step"]), "weights": weights, **metrics, "settings": settings, "samplers": used}
    # Named by the file's content too: two different files of one run and epoch (a copy
    # with flipped bytes, a re-export) never overwrite each other's results; and by the
    # settings, so evaluations of one file with other settings sit side by side.
    digest = content_digest(Path(cfg.eval_checkpoint))
    out = out_dir / f"epoch_{int(state['epoch']):04d}_{weights}_{digest}_{settings_digest}.json"
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        if key not in ("settings", "samplers"):
            print(f"{key}: {value}")
    print(f"settings: eval.steps={cfg.eval.steps} solver={cfg.solver.name} seed={cfg.seed} "
          f"eval.guidance_scale={cfg.eval.guidance_scale} eval.guidance_interval={cfg.eval.get('guidance_interval')} "
          "(all in the file, with each sampler's own settings)")
    print(f"results written to {out}")
    return result
