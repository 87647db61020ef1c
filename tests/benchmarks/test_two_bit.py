"""The two-bit benchmark's configurations: RTN and GPTQ with the rotation are recipe dicts the walker parses."""
import pytest

from qlab.benchmarks.two_bit import configs
from qlab.core.spec import QuantSpec
from qlab.models.walker import Entry, entry


def test_rotated_scalar_methods_at_every_bit_width():
    out = configs(["rtn", "rtn-rot", "gptq-rot"], calib_windows=8, bits=(2, 3, 4))
    labels = [c["label"] for c in out]
    assert labels == ["RTN int2 g128", "RTN int3 g128", "RTN int4 g128",
                      "RTN int2 g128 + rotation", "RTN int3 g128 + rotation", "RTN int4 g128 + rotation",
                      "GPTQ int2 g128 + rotation", "GPTQ int3 g128 + rotation", "GPTQ int4 g128 + rotation"]
    rtn3, gptq3 = out[4], out[7]
    assert entry(rtn3["recipe"]["model.layers.*"]) == Entry("rtn", QuantSpec.parse("int3-g128-asym-minmax"),
                                                            {"rotate": True})
    assert entry(gptq3["recipe"]["model.layers.*"]) == Entry("gptq", QuantSpec.parse("int3-g128-asym-minmax"),
                                                             {"rotate": True})
    assert "calib_windows" not in rtn3 and gptq3["calib_windows"] == 8


def test_unknown_methods_are_named_with_the_known_ones():
    with pytest.raises(SystemExit, match="rtn-rot, gptq-rot"):
        configs(["awq-rot"])
