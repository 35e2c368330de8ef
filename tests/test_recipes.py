"""docs/recipes.md against the presets: every row's value equals the composed config,
every key a preset file sets has a row with a source, and every preset has rows.

The tables are parsed from the Markdown itself (rows ``| preset | `key` | `value` |
source | notes |``), so a changed preset or a changed page fails here until the other
follows."""

import functools
import math
import re

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from tests.conftest import CONFIG_DIR, REPO, compose_train

RECIPES = REPO / "docs" / "recipes.md"
EXPERIMENTS = CONFIG_DIR / "experiment"
HEADER = ["preset", "key", "value", "source", "notes"]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def unquote(cell: str) -> str:
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"docs/recipes.md: expected a `code` cell, got {cell!r}"
    return match.group(1)


def read_rows() -> dict[str, dict[str, tuple[str, str]]]:
    """{preset: {key: (value text, source)}} from every table with the recipe header."""
    rows: dict[str, dict[str, tuple[str, str]]] = {}
    in_table = False
    for line in RECIPES.read_text().splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        row = cells(line)
        if row == HEADER:
            in_table = True
            continue
        if not in_table or set(line) <= set("|- "):
            continue
        assert len(row) == len(HEADER), f"docs/recipes.md: a row needs {len(HEADER)} cells: {line}"
        preset, key, value, source, _notes = row
        key = unquote(key)
        assert key not in rows.setdefault(preset, {}), f"docs/recipes.md: {preset} {key} listed twice"
        rows[preset][key] = (unquote(value), source)
    return rows


ROWS = read_rows()
PRESETS = sorted(path.stem for path in EXPERIMENTS.glob("*.yaml"))


def parse(text: str):
    """A value cell read the way the configs read it (OmegaConf's YAML: 1e-3 is a float)."""
    return OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.create(f"v: {text}").v}))["v"]


def same(a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def leaf_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves a preset file sets (lists are leaves)."""
    if isinstance(node, dict):
        return [key for name, child in node.items() for key in leaf_keys(child, f"{prefix}{name}.")]
    return [prefix.rstrip(".")]


def set_by_file(name: str) -> list[str]:
    raw = OmegaConf.to_container(OmegaConf.load(EXPERIMENTS / f"{name}.yaml"), resolve=False)
    keys = [key for name_, child in raw.items() if name_ != "defaults" for key in leaf_keys(child, f"{name_}.")]
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict):  # "override /model: dit_b" sets the group's choice
            for group in entry:
                keys.append(f"{str(group).removeprefix('override ').strip('/')}.name")
    return keys


@functools.cache
def composed(name: str) -> DictConfig:
    cfg = compose_train([f"experiment={name}"])
    OmegaConf.resolve(cfg)  # interpolations read from the root, before any subtree is taken out
    return cfg


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_the_recipes_page(name):
    if name not in ROWS:
        pytest.fail(f"configs/experiment/{name}.yaml has no rows in docs/recipes.md")
    cfg = composed(name)
    for key, (text, source) in ROWS[name].items():
        assert source, f"docs/recipes.md: {name} {key} has no source"
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", f"{name}: {key} is not in the config"
        got = OmegaConf.select(cfg, key, throw_on_missing=True)
        got = OmegaConf.to_container(got, resolve=True) if isinstance(got, DictConfig | ListConfig) else got
        assert same(got, parse(text)), f"{name}: {key} is {got!r} in the config, {text} in docs/recipes.md"
    missing = [key for key in set_by_file(name) if key not in ROWS[name]]
    assert not missing, f"docs/recipes.md: {name} sets {missing} without a row"


def test_every_row_names_a_preset_that_exists():
    assert set(ROWS) <= set(PRESETS), f"docs/recipes.md lists presets with no file: {sorted(set(ROWS) - set(PRESETS))}"


def test_cifar10_presets_show_the_published_time_laws():
    """The issue's check: the paper preset has v0's laws, the v1 preset v1's, both augment."""
    v0, v1 = composed("cifar10_meanflow"), composed("cifar10_meanflow_v1")
    assert (v0.loss.time.name, v0.loss.time.mean, v0.loss.time.std, v0.loss.time.r_mean, v0.loss.time.r_std) == (
        "py_meanflow_v0",
        -2.0,
        2.0,
        -2.0,
        2.0,
    )
    assert (v1.loss.time.name, v1.loss.time.mean, v1.loss.time.std, v1.loss.time.r_mean, v1.loss.time.r_std) == (
        "py_meanflow_v1",
        -0.6,
        1.6,
        -4.0,
        1.6,
    )
    for cfg in (v0, v1):
        assert cfg.dataloaders.augment.p == 0.12 and cfg.loss.time.ratio == 0.75


ONE_STEP_LOSSES = {"meanflow", "imf", "alphaflow"}  # the losses that draw (s, t) pairs


def distinct_fraction(name: str, options: dict) -> float:
    """The expected fraction of pairs with s != t: ``ratio``, except for py-meanflow's v1,
    whose unmasked pairs are equal too where the second draw lands above the first
    (sigmoid is monotone, so that is P(N(r_mean - mean, std² + r_std²) >= 0))."""
    if name != "py_meanflow_v1":
        return options["ratio"]
    gap = (options["mean"] - options["r_mean"]) / math.hypot(options["std"], options["r_std"])
    return options["ratio"] * 0.5 * math.erfc(-gap / math.sqrt(2))


def test_pair_sampler_options_build_and_draw_their_law():
    """Each preset of the one-step family: its loss.time builds through the time-sampling
    module and draws pairs 0 <= s <= t <= 1, with s != t for the fraction its law gives."""
    from losses.time_sampling import make_pair_sampler

    n, seen = 4096, set()
    for name in PRESETS:
        cfg = composed(name)
        if cfg.loss.name not in ONE_STEP_LOSSES:
            continue
        options = OmegaConf.to_container(cfg.loss.time, resolve=True)
        law = options.pop("name")
        sampler = make_pair_sampler(law, **options)
        torch.manual_seed(0)
        s, t = sampler.sample(n, torch.device("cpu"))
        assert s.shape == t.shape == (n,) and bool(((s >= 0) & (s <= t) & (t <= 1)).all()), name
        expected = distinct_fraction(law, options)
        tolerance = 5 * math.sqrt(expected * (1 - expected) / n) + 1 / n  # 5 binomial std, or the rounding of a count
        assert abs(float((s != t).float().mean()) - expected) < tolerance, (name, expected)
        seen.add(cfg.loss.name)
    assert seen == ONE_STEP_LOSSES  # every loss of the family has a preset, and each was drawn from


def test_augment_options_build():
    from hydra.utils import instantiate

    from dataloaders.augment import AugmentPipe

    for name in PRESETS:
        cfg = composed(name)
        augment = OmegaConf.select(cfg, "dataloaders.augment")
        if augment is not None:
            pipe = instantiate(augment)
            assert isinstance(pipe, AugmentPipe) and pipe.label_dim == 6
