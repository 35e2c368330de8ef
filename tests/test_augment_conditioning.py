"""EDM augmentation end to end: the loader augments training batches and carries the
label, the losses hand it to the model, the model's bias-free map embeds it, and
sampling (no label) is the zero label. A loss that would drop the label refuses."""

import pytest
import torch

from dataloaders.augment import AugmentPipe
from dataloaders.base_dataloaders import DictDatasetAdapter, TensorTargetDataset
from models.unified_input import make_unified_flow_matching_input
from losses.alphaflow_loss import AlphaFlowLoss
from losses.imf_loss import IMFLoss
from losses.meanflow_loss import MeanFlowLoss
from losses.mse_loss import FlowMatchingMSELoss
from models.flow_matching.mlp import MLP
from models.unet.unet import UNet

TINY_UNET = {"in_channels": 3, "image_size": 8, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [], "dropout": 0.0}


def augmented_batch(n: int = 8):
    torch.manual_seed(0)
    images = torch.rand(64, 3, 8, 8) * 2 - 1
    adapter = DictDatasetAdapter(TensorTargetDataset(images), augment=AugmentPipe.meanflow_cifar10(p=1.0))
    return adapter.__getitems__(list(range(n)))


def test_loader_carries_the_label_of_what_it_applied():
    batch = augmented_batch()
    assert batch.aug_label.shape == (8, 6) and batch.raw_target.shape == (8, 3, 8, 8)
    flips = batch.aug_label[:, 0]
    assert set(flips.tolist()) <= {0.0, 1.0}
    assert batch.at_time(torch.rand(8)).aug_label is batch.aug_label  # the straight-path item keeps it


class DropsAugmentLabels(FlowMatchingMSELoss):
    """A loss whose forward would not hand the augment label to the model."""

    passes_augment_labels = False


@pytest.mark.parametrize(
    "loss",
    [FlowMatchingMSELoss(), MeanFlowLoss(jvp_mode="fused"), IMFLoss(jvp_mode="fused"),
     AlphaFlowLoss(alpha_schedule="constant", alpha_start=0.5, jvp_mode="fused")],
    ids=["fm", "meanflow", "imf", "alphaflow"],
)
def test_losses_hand_the_label_to_the_model(loss):
    model = UNet(**TINY_UNET, augment_dim=6)
    with torch.no_grad():  # off the zero-output init, where no gradient reaches the embeddings at all
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    nn_weight = model.augment_embed.weight
    assert nn_weight.shape[1] == 6 and bool((nn_weight != 0).any())
    batch = augmented_batch()
    loss.check(model, batch)
    loss(model, batch).backward()
    assert nn_weight.grad is not None and nn_weight.grad.abs().sum() > 0  # the label reached the embedding


def test_no_label_is_the_zero_label_and_the_label_changes_the_output():
    torch.manual_seed(1)
    model = UNet(**TINY_UNET, augment_dim=6).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    z = make_unified_flow_matching_input(torch.randn(4, 3, 8, 8), torch.rand(4) * 0.5, torch.rand(4) * 0.5 + 0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(z), model(z, None, torch.zeros(4, 6)))
        assert not torch.allclose(model(z), model(z, None, torch.ones(4, 6)))


def test_models_without_an_augment_input_and_losses_that_drop_it_refuse():
    batch = augmented_batch()
    with pytest.raises(ValueError, match="augment_dim=0.*model.augment_dim=6"):
        FlowMatchingMSELoss()(UNet(**TINY_UNET), batch)
    with pytest.raises(ValueError, match="does not pass augment labels"):
        DropsAugmentLabels().check(UNet(**TINY_UNET, augment_dim=6), batch)
    with pytest.raises(ValueError, match="augment_dim=0"):
        MLP(data_dim=2)(torch.randn(3, 4), None, torch.zeros(3, 6))
