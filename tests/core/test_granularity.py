import pytest
import torch

from qlab.core.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken, parse_granularity

ALL = [PerTensor(), PerChannel(0), PerChannel(1), PerToken(), PerGroup(128), PerGroup(7), PerBlock(64)]


@pytest.mark.parametrize("gran", ALL, ids=str)
def test_groups_round_trip(gran, weight):
    G, mask = gran.to_groups(weight)
    assert G.shape[0] == torch.Size(gran.scale_shape(tuple(weight.shape))).numel()
    assert torch.equal(gran.from_groups(G, weight.shape), weight)
    if mask is not None:
        assert mask.sum() == weight.numel() and (G[~mask] == 0).all()


def test_ragged_last_group_576_by_128():
    gran = PerGroup(128)
    assert gran.scale_shape((16, 576)) == (16, 5)  # 4 groups of 128 and one of 64
    G, mask = gran.to_groups(torch.ones(16, 576))
    assert mask.reshape(16, 5, 128)[0].sum(dim=1).tolist() == [128, 128, 128, 128, 64]


@pytest.mark.parametrize("text", ["tensor", "channel", "channel@1", "token", "g128", "b64"])
def test_parse_round_trip(text):
    assert str(parse_granularity(text)) == text


@pytest.mark.parametrize("bad", [0, -4])
def test_non_positive_group_size(bad):
    with pytest.raises(ValueError, match="positive"):
        PerGroup(bad)
    with pytest.raises(ValueError, match="positive"):
        parse_granularity(f"g{bad}")
