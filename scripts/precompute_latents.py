"""Encode an ImageNet-style class-folder data set into SD-VAE latent shards.

    python scripts/precompute_latents.py --data-root /data/imagenet/train --out /data/in256_latents \
        --vae stabilityai/sd-vae-ft-ema --image-size 256 --batch-size 32 --shard-size 10000

Images are ADM-center-cropped to ``--image-size``, scaled to [-1, 1] and encoded in
file order (no flips; the loader flips latents when asked). Each shard is written
to a temporary file and renamed, and ``meta.json`` is written last, so an
interrupted run never leaves a folder that looks complete. The output folder must be
empty or absent unless ``--overwrite`` is given. The format is described in
``dataloaders/imagenet.py``.
"""

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

import torch
from tqdm import tqdm

from dataloaders.imagenet import (
    SHARD_FORMAT,
    ClassFolderDataset,
    encode_in_batches,
    shard_name,
    write_meta,
    write_shard,
)
from models.vae.vae import SDVAE
from runs.errors import RunError, report
from runs.machine import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="folder of class folders: DATA_ROOT/<wnid>/*.JPEG")
    parser.add_argument("--out", required=True, help="output folder for shard_XXXXX.pt and meta.json")
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKL: hub name or local folder")
    parser.add_argument("--subfolder", default=None, help="subfolder of --vae holding the VAE ('vae' in a pipeline)")
    parser.add_argument("--scaling-factor", type=float, default=0.18215, help="latent scale (SD-VAE: 0.18215)")
    parser.add_argument("--sample", action="store_true", help="store a draw from the posterior instead of its mean")
    parser.add_argument("--image-size", type=int, default=256, help="square image side; latents are side/8")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard file")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader processes decoding JPEGs")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    return parser.parse_args(argv)


def prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"--out {out} is not empty: pass --overwrite to replace its contents")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.image_size % 8 != 0 or args.batch_size < 1 or args.shard_size < 1:
        raise SystemExit(
            f"need --image-size divisible by 8 and positive --batch-size/--shard-size, got "
            f"{args.image_size}, {args.batch_size}, {args.shard_size}"
        )
    data_root = Path(args.data_root).expanduser()
    out = Path(args.out).expanduser()
    dataset = ClassFolderDataset(data_root, args.image_size, flip=False)  # validates the layout first
    device = resolve_device(args.device)
    prepare_output(out, args.overwrite)
    vae = SDVAE(args.vae, subfolder=args.subfolder, scaling_factor=args.scaling_factor, sample_posterior=args.sample)
    vae = vae.to(device).eval()

    shards: list[dict] = []
    pending_latents: list[torch.Tensor] = []
    pending_labels: list[torch.Tensor] = []
    pending = 0
    latent_shape: list[int] = []

    def flush(count: int) -> None:
        nonlocal pending_latents, pending_labels, pending
        latents, labels = torch.cat(pending_latents), torch.cat(pending_labels)
        name = shard_name(len(shards))
        write_shard(out / name, latents[:count], labels[:count], args.scaling_factor, args.image_size)
        shards.append({"file": name, "count": count})
        pending_latents, pending_labels, pending = [latents[count:]], [labels[count:]], latents.shape[0] - count

    batches = encode_in_batches(dataset, vae, args.batch_size, device, args.num_workers)
    for latents, labels in tqdm(batches, total=-(-len(dataset) // args.batch_size), desc="encode"):
        latent_shape = list(latents.shape[1:])
        pending_latents.append(latents)
        pending_labels.append(labels)
        pending += latents.shape[0]
        while pending >= args.shard_size:
            flush(args.shard_size)
    if pending:
        flush(pending)

    write_meta(
        out,
        {
            "format": SHARD_FORMAT,
            "num_samples": len(dataset),
            "latent_shape": latent_shape,
            "dtype": "float16",
            "scaling_factor": args.scaling_factor,
            "image_size": args.image_size,
            "vae": args.vae,
            "vae_subfolder": args.subfolder,
            "sampled": args.sample,
            "num_classes": len(dataset.classes),
            "classes": dataset.classes,
            "shards": shards,
        },
    )
    print(f"wrote {len(dataset)} latents {latent_shape} in {len(shards)} shards to {out}")


if __name__ == "__main__":
    try:
        main()
    except RunError as err:  # a device this machine lacks: one line
        raise SystemExit(report(err)) from None
