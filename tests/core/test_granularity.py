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


def test_the_questions_methods_ask():
    from qlab.core.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken

    shape = (1536, 576)
    assert PerTensor().columns_per_scale(shape) == 576 and not PerTensor().per_row(shape)
    assert PerChannel(0).columns_per_scale(shape) == 576 and PerChannel(0).per_row(shape)
    assert PerGroup(128).columns_per_scale(shape) == 128 and PerGroup(128).per_row(shape)
    assert PerBlock(64).columns_per_scale(shape) == 64 and PerBlock(64).per_row(shape)
    assert PerToken().per_row(shape)
    for g in (PerChannel(1), PerBlock(100), PerGroup(32, axis=-2)):
        with pytest.raises(ValueError, match="runs of input columns"):
            g.columns_per_scale(shape)
        assert not g.per_row(shape)


def test_groups_along_another_axis():
    """g4@-2 on [2, 10, 3]: groups of 4 tokens per channel (KIVI's keys), the last group of 2."""
    from qlab.core.granularity import PerGroup, parse_granularity

    g = parse_granularity("g4@-2")
    assert g == PerGroup(4, axis=-2) and str(g) == "g4@-2"
    x = torch.arange(60.0).reshape(2, 10, 3)
    G, mask = g.to_groups(x)
    assert G.shape == (2 * 3 * 3, 4) and g.scale_shape(x.shape) == (2, 3, 3)
    assert G[0].tolist() == [0.0, 3.0, 6.0, 9.0]  # channel 0, tokens 0-3
    assert torch.equal(g.from_groups(G, x.shape), x)
    assert mask.sum() == 60
    with pytest.raises(ValueError, match="counts from the end"):
        PerGroup(4, axis=1)
