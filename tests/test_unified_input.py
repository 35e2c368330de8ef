"""The shared data interface of docs/design.md: unified input, BaseItem, adapter, the epoch sampler."""

import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders.base_dataloaders import BaseItem, DictDatasetAdapter, EpochSampler, TensorTargetDataset, collate_base_items
from models.unified_input import make_unified_flow_matching_input, split_unified_input


def test_dense_input_appends_s_and_t():
    x, s, t = torch.randn(5, 3), torch.rand(5), torch.rand(5)
    z = make_unified_flow_matching_input(x, s, t)
    assert z.shape == (5, 5)
    assert torch.equal(z[:, :3], x) and torch.equal(z[:, 3], s) and torch.equal(z[:, 4], t)
    x2, s2, t2 = split_unified_input(z)
    assert torch.equal(x2, x) and torch.equal(s2, s) and torch.equal(t2, t)


def test_image_input_appends_two_constant_channels():
    x, s, t = torch.randn(4, 3, 6, 5), torch.rand(4), torch.rand(4)
    z = make_unified_flow_matching_input(x, s, t)
    assert z.shape == (4, 5, 6, 5)
    assert torch.equal(z[:, :3], x)
    assert torch.equal(z[:, 3], s[:, None, None].expand(4, 6, 5))
    assert torch.equal(z[:, 4], t[:, None, None].expand(4, 6, 5))
    x2, s2, t2 = split_unified_input(z)
    assert torch.equal(x2, x) and torch.equal(s2, s) and torch.equal(t2, t)


def test_scalar_times_broadcast_and_dtype_follows_the_state():
    x = torch.randn(3, 2, dtype=torch.float64)
    z = make_unified_flow_matching_input(x, 0.25, torch.tensor(0.75))
    assert z.dtype == torch.float64
    assert torch.equal(z[:, 2], torch.full((3,), 0.25, dtype=torch.float64))
    assert torch.equal(z[:, 3], torch.full((3,), 0.75, dtype=torch.float64))


def test_other_ranks_are_refused():
    with pytest.raises(ValueError, match=r"\(B, D\) or \(B, C, H, W\)"):
        make_unified_flow_matching_input(torch.randn(2, 3, 4), torch.rand(2), torch.rand(2))


@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)])
def test_adapter_items_through_a_real_dataloader(shape):
    torch.manual_seed(0)
    n = 40
    data = torch.randn(n, *shape) * 3 + 1
    labels = torch.arange(n) % 4
    loader = DataLoader(
        DictDatasetAdapter(TensorTargetDataset(data, labels, num_classes=4)),
        batch_size=16,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_base_items,
    )
    batches = list(loader)
    assert len(batches) == 2
    for raw in batches:
        # the loader gives data and noise only; a loss that reads the path at one time asks for it
        assert raw.t is None and raw.unified_input is None and raw.target is None
        item = raw.at_time(torch.rand(len(raw)))
        assert isinstance(item, BaseItem) and len(item) == 16
        tb = item.t.reshape(-1, *([1] * len(shape)))
        # x_t = (1 - t) x_0 + t x_1 and the target is v = x_1 - x_0 (docs/design.md)
        assert torch.allclose(item.input, (1 - tb) * item.raw_source + tb * item.raw_target, atol=1e-6)
        assert torch.allclose(item.target, item.raw_target - item.raw_source)
        assert torch.equal(item.unified_input, make_unified_flow_matching_input(item.input, item.t, item.t))
        assert item.t.shape == (16,) and bool(((item.t >= 0) & (item.t <= 1)).all())
        assert item.raw_source.shape == item.raw_target.shape == (16, *shape)
        # each data row comes with its own label
        rows = [int(torch.nonzero((data == x1).reshape(n, -1).all(dim=1))[0]) for x1 in item.raw_target]
        assert torch.equal(item.label, labels[rows])


def test_unlabelled_data_gives_no_labels_and_single_items_collate():
    adapter = DictDatasetAdapter(TensorTargetDataset(torch.randn(10, 2)))
    assert adapter.__getitems__([0, 1, 2]).label is None
    merged = collate_base_items([adapter[0], adapter[3]])
    assert len(merged) == 2 and merged.raw_target.shape == (2, 2) and merged.unified_input is None


def test_base_item_moves_between_devices_with_labels_kept():
    item = DictDatasetAdapter(TensorTargetDataset(torch.randn(6, 2), torch.arange(6))).__getitems__([1, 2]).at_time(torch.rand(2))
    moved = item.to("cpu")
    assert torch.equal(moved.label, torch.tensor([1, 2])) and torch.equal(moved.target, item.target)


def test_epoch_sampler_is_a_seeded_permutation_that_resumes_at_a_batch():
    n, batch = 103, 10
    whole = EpochSampler(n, batch, seed=3, epoch=2).indices
    assert len(whole) == 100 and len(set(whole)) == 100  # full batches only, no repeats
    assert EpochSampler(n, batch, seed=3, epoch=2).indices == whole  # fixed by (seed, epoch)
    assert EpochSampler(n, batch, seed=3, epoch=3).indices != whole
    assert EpochSampler(n, batch, seed=3, epoch=2, start_batch=4).indices == whole[40:]  # resume mid-epoch


def test_epoch_sampler_shards_one_permutation_over_ranks():
    n, batch, world = 50, 4, 3
    shards = [EpochSampler(n, batch, seed=0, epoch=0, rank=r, world=world).indices for r in range(world)]
    assert all(len(s) == 4 * batch for s in shards)  # 4 full global batches of 12
    union = [i for s in shards for i in s]
    assert len(set(union)) == len(union) == 48  # disjoint: no sample seen twice in an epoch
    assert EpochSampler(n, batch, seed=0, epoch=0, rank=1, world=world, start_batch=2).indices == shards[1][8:]
