"""The model contract (models/base_model.py): every model the configs build subclasses
BaseModel, splits the unified input back exactly, and follows one set of label rules."""

import ast
from pathlib import Path

import pytest
import torch

from models.unified_input import make_unified_flow_matching_input
from models.base_model import BaseModel
from models.unified_input import split_unified_input
from models.dit.dit import DiT
from models.flow_matching.cnn import SmallCNN
from models.flow_matching.mlp import MLP
from models.unet.unet import UNet

REPO = Path(__file__).resolve().parents[1]


def tiny(kind: str, num_classes: int = 0) -> BaseModel:
    if kind == "mlp":
        return MLP(data_dim=3, hidden=16, depth=2, num_classes=num_classes)
    if kind == "cnn":
        return SmallCNN(3, 8, hidden_channels=8, channel_mult=(1, 2), emb_dim=16, num_classes=num_classes, num_groups=4)
    if kind == "unet":
        return UNet(3, 8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                    num_classes=num_classes, num_heads=2)
    return DiT(3, 8, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=num_classes, frequency_dim=16)


def unified(kind: str, n: int) -> torch.Tensor:
    x = torch.randn(n, 3) if kind == "mlp" else torch.randn(n, 3, 8, 8)
    return make_unified_flow_matching_input(x, torch.rand(n), torch.rand(n))


KINDS = ["mlp", "cnn", "unet", "dit"]


def test_every_model_target_in_the_configs_is_a_base_model():
    import hydra.utils
    from omegaconf import OmegaConf

    for path in sorted((REPO / "configs" / "model").glob("*.yaml")):
        cls = hydra.utils.get_class(OmegaConf.load(path)._target_)
        assert issubclass(cls, BaseModel), path.name


def test_models_do_not_import_the_data_package():
    for path in (REPO / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not any(name.split(".")[0] == "dataloaders" for name in names), path


@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 6, 6)])
def test_split_inverts_the_unified_input(shape):
    x, s, t = torch.randn(*shape), torch.rand(4), torch.rand(4)
    x2, s2, t2 = split_unified_input(make_unified_flow_matching_input(x, s, t))
    assert torch.equal(x2, x) and torch.equal(s2, s) and torch.equal(t2, t)


@pytest.mark.parametrize("kind", KINDS)
def test_unconditional_model_rejects_labels_in_one_line(kind):
    with pytest.raises(ValueError, match=r"^this model is unconditional \(num_classes=0\)[^\n]*$"):
        tiny(kind)(unified(kind, 2), torch.tensor([0, 1]))


@pytest.mark.parametrize("kind", KINDS)
def test_conditional_model_without_labels_uses_the_null_class(kind):
    torch.manual_seed(0)
    model = tiny(kind, num_classes=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # zero-initialised outputs would hide the label
    z = unified(kind, 3)
    assert model.num_classes == 4
    torch.testing.assert_close(model(z), model(z, model.null_labels(3, "cpu")))
    assert not torch.allclose(model(z, torch.tensor([0, 1, 2])), model(z))


@pytest.mark.parametrize("kind", KINDS)
def test_labels_of_the_wrong_shape_raise(kind):
    with pytest.raises(ValueError, match=r"labels of shape \(2, 1\) for a batch of 2: expected \(2,\)"):
        tiny(kind, num_classes=4)(unified(kind, 2), torch.zeros(2, 1, dtype=torch.long))


def test_null_labels_sit_at_index_num_classes():
    assert torch.equal(tiny("mlp", 7).null_labels(3, "cpu"), torch.full((3,), 7))


def test_negative_num_classes_is_refused():
    with pytest.raises(ValueError, match="num_classes=-1"):
        MLP(data_dim=2, num_classes=-1)
