"""Every yaml in every config group composes into ``train.yaml`` and builds.

The list of configs is read from ``configs/<group>/*.yaml`` at collection time, so a
new file is tested without touching this module. Models are built on the meta device
(full-size DiT / UNet cost no memory or time) and run one forward pass there to check
the output shape. Data sets that read files the test does not have are listed in
``NEEDS_FILES`` with the reason; for them the test checks that the config matches the
loader's signature and that a missing path gives the loader's own error. Nothing else
is skipped: a group without a check here fails ``test_every_group_is_checked``.
"""

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from dataloaders.base_dataloaders import DictDatasetAdapter, collate_base_items
from models.unified_input import make_unified_flow_matching_input
from losses.base_loss import BaseLoss, build_loss
from runs.build import build_model
from solvers.runge_kutta import make_solver
from tests.conftest import CONFIG_DIR, compose_train

TRAIN_DEFAULTS = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "train.yaml").defaults)
DEFAULT_GROUPS = {key for entry in TRAIN_DEFAULTS if isinstance(entry, dict) for key in entry}
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
ALL_CONFIGS = [(group, path.stem) for group in GROUPS for path in sorted((CONFIG_DIR / group).glob("*.yaml"))]

# Data sets read from disk; the key that names their location, and why the test does
# not build them (tests/test_image_data.py builds each from small files in the real format).
NEEDS_FILES = {
    "points": ("dataset.path", "reads the user's own .npy / .pt file (required, no default)"),
    "cifar10": ("dataset.root", "reads the CIFAR-10 python batches from disk (download=false by default)"),
    "celeba": ("dataset.root", "reads the CelebA image folder from disk"),
    "imagenet": ("dataset.latent_dir", "reads pre-computed SD-VAE latent shards from disk"),
}
# Configs that are composed and checked against their target's signature, not built.
NOT_BUILT = {
    ("vae", "sd_ema"): "loads pretrained weights from the Hugging Face hub; "
    "tests/test_vae.py builds a tiny AutoencoderKL from a local folder instead",
}


def override(group: str, name: str) -> str:
    return f"{group}={name}" if group in DEFAULT_GROUPS else f"+{group}={name}"


def compose(overrides: list[str]) -> DictConfig:
    cfg = compose_train(overrides)
    OmegaConf.resolve(cfg)
    return cfg


def node_kwargs(node: DictConfig) -> dict:
    return {k: v for k, v in node.items() if not k.startswith("_") and k != "name"}


def check_signature(node: DictConfig, **extra) -> None:
    """The node's keys are accepted by its ``_target_`` (without calling it)."""
    target = get_object(node._target_)
    inspect.signature(target).bind(**node_kwargs(node), **extra)


def is_image_model(name: str) -> bool:
    return "data_shape.1" in (CONFIG_DIR / "model" / f"{name}.yaml").read_text()


def check_model_on_meta(cfg: DictConfig) -> None:
    """Build the model on the meta device and run it on a meta batch, unconditional and
    (when the data has classes) conditional."""
    shape = list(cfg.dataloaders.data_shape)
    variants = [0] + ([cfg.dataloaders.num_classes] if cfg.dataloaders.num_classes > 0 else [])
    for num_classes in variants:
        model_cfg = OmegaConf.merge(cfg.model, {"num_classes": num_classes})
        with torch.device("meta"):
            model = build_model(model_cfg)
            assert isinstance(model, nn.Module)
            assert all(p.is_meta for p in model.parameters()) and sum(p.numel() for p in model.parameters()) > 0
            z = make_unified_flow_matching_input(torch.empty(2, *shape), torch.empty(2), torch.empty(2))
            y = torch.zeros(2, dtype=torch.long) if num_classes else None
            cond = torch.zeros(2, model.num_conds) if model.num_conds else None
            assert model(z, y, cond=cond).shape == (2, *shape), (cfg.model.name, num_classes)


def check_data(dl: DictConfig, tmp_path: Path) -> None:
    assert len(dl.data_shape) in (1, 3) and all(int(n) >= 1 for n in dl.data_shape)
    assert int(dl.num_classes) >= 0
    if dl.name in NEEDS_FILES:
        key, _reason = NEEDS_FILES[dl.name]
        missing = tmp_path / "not_there"
        with open_dict(dl):
            OmegaConf.update(dl, key, str(missing))
        check_signature(dl.dataset, split="train")
        with pytest.raises(FileNotFoundError, match="not_there"):
            instantiate(dl.dataset, _partial_=True)(split="train")  # the loader's own error, not Hydra's wrapper
        return
    for split in ("train", "test", "reference"):
        dataset = instantiate(dl.dataset, split=split)
        assert len(dataset) > 0
        x1, label = dataset[0]
        assert list(x1.shape) == list(dl.data_shape), (dl.name, split, x1.shape)
        assert label == -1 or 0 <= label < dl.num_classes


def check_loss(cfg: DictConfig) -> None:
    """Instantiate the loss and take it once on a tiny MLP and a real batch."""
    loss_fn = build_loss(cfg.loss)
    assert isinstance(loss_fn, BaseLoss)
    assert loss_fn.samplers(cfg.eval, cfg.solver, cfg.model.num_classes)  # every loss says how its model samples
    torch.manual_seed(0)
    model = build_model({**node_kwargs(cfg.model), "_target_": cfg.model._target_, "hidden": 16, "depth": 1})
    dataset = instantiate(cfg.dataloaders.dataset, split="train")
    batch = collate_base_items(DictDatasetAdapter(dataset).__getitems__(list(range(8))))
    loss_fn.check_model(model, batch)
    loss = loss_fn(model, batch)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_every_group_is_checked():
    assert set(GROUPS) <= set(CHECKS), f"configs/{sorted(set(GROUPS) - set(CHECKS))}: add a check to tests/test_configs.py"
    assert {group for group, _ in NOT_BUILT} <= set(GROUPS)
    assert all((CONFIG_DIR / group / f"{name}.yaml").is_file() for group, name in NOT_BUILT), "stale NOT_BUILT entry"
    assert all((CONFIG_DIR / "dataloaders" / f"{name}.yaml").is_file() for name in NEEDS_FILES), "stale NEEDS_FILES entry"


def check_dataloaders(name: str, tmp_path: Path) -> None:
    cfg = compose([override("dataloaders", name)])
    assert cfg.dataloaders.name == name
    check_data(cfg.dataloaders, tmp_path)


def check_model(name: str, tmp_path: Path) -> None:
    # Image models read C and H from the data config; CIFAR-10's composes without files.
    cfg = compose([override("model", name), *(["dataloaders=cifar10"] if is_image_model(name) else [])])
    assert cfg.model.name == name
    assert cfg.model.num_classes == 0, "model configs default to unconditional; experiments turn classes on"
    check_model_on_meta(cfg)


def check_loss_config(name: str, tmp_path: Path) -> None:
    cfg = compose([override("loss", name)])
    assert cfg.loss.name == name
    check_loss(cfg)


def check_solver(name: str, tmp_path: Path) -> None:
    cfg = compose([override("solver", name)])
    assert cfg.solver.name == name and make_solver(name).name == name


def check_experiment(name: str, tmp_path: Path) -> None:
    cfg = compose([override("experiment", name)])
    check_model_on_meta(cfg)
    assert make_solver(cfg.solver.name).name == cfg.solver.name
    assert isinstance(instantiate(node_kwargs(cfg.loss) | {"_target_": cfg.loss._target_}), BaseLoss)
    check_data(cfg.dataloaders, tmp_path)


def check_vae(name: str, tmp_path: Path) -> None:
    cfg = compose([override("vae", name)])
    assert isinstance(instantiate(cfg.vae), nn.Module)


def check_modal(name: str, tmp_path: Path) -> None:
    """Settings for the Modal backend (no ``_target_``): read the way the app reads them."""
    from scripts.modal_app import modal_settings

    cfg = compose([override("modal", name)])
    settings = modal_settings(cfg)
    assert settings.gpu_count >= 1 and settings.gpu_spec.startswith(settings.gpu)


CHECKS = {
    "dataloaders": check_dataloaders,
    "model": check_model,
    "loss": check_loss_config,
    "solver": check_solver,
    "experiment": check_experiment,
    "vae": check_vae,
    "modal": check_modal,
}


@pytest.mark.parametrize("group,name", ALL_CONFIGS, ids=[f"{g}/{n}" for g, n in ALL_CONFIGS])
def test_config_composes_and_builds(group, name, tmp_path):
    assert group in CHECKS, f"configs/{group}/ has no check in tests/test_configs.py"
    if (group, name) in NOT_BUILT:
        check_signature(compose([override(group, name)])[group])
        return
    CHECKS[group](name, tmp_path)


def test_points_path_is_required():
    cfg = compose_train(["dataloaders=points"])
    with pytest.raises(MissingMandatoryValue, match="dataloaders.dataset.path"):
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_shrunk_config_fixture(cfg_train, tmp_path):
    assert cfg_train.device == "cpu" and cfg_train.model.hidden == 32 and not cfg_train.trackio.enabled
    assert Path(cfg_train.output_dir).is_relative_to(tmp_path)
    dataset = instantiate(cfg_train.dataloaders.dataset, split="train")
    assert len(dataset) == 512
