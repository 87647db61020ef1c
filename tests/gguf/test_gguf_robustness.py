"""Bad inputs and damaged files: clear errors, never silent zeros, never a half-written file.

Issue 16, items 4, 5, 9 (GGUF part), 14 and 15 (bf16 in write_gguf).
"""
import os
import struct

import numpy as np
import pytest
import torch
import gguf

from qlab import gguf as qg
from qlab.gguf import files
from qlab.gguf.files import GGUFFile, GGUFFormatError, quantize_gguf, read_gguf, tensor_index, write_gguf

ALL = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def gaussian(rows=4, n=256, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


# ---------------------------------------------------------------- item 5: encoder inputs

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(name, bad):
    """Before: Q2_K turned the 256-value block holding one NaN into zeros, Q3_K gave 57 zeros, the others
    wrote NaN/inf scales."""
    x = gaussian()
    x[2, 77] = bad
    with pytest.raises(ValueError, match=rf"{name}: input has 1 non-finite values \(first at row 2, "
                                         rf"column 77: {bad}\); GGUF quantization needs finite data"):
        qg.get_format(name).quantize_rows(x)


def test_non_finite_error_names_the_tensor():
    x = gaussian()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="Q4_K: tensor blk.0.ffn_up.weight has 1 non-finite values"):
        qg.quantize(torch.from_numpy(x), "Q4_K", name="blk.0.ffn_up.weight")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_values_too_large_for_fp16_scales_are_refused(name, with_imatrix):
    """1e30 is finite, but its block scale is not an fp16: before, inf/NaN scales were written silently."""
    x = gaussian()
    x[1, 3] = 1e30
    imat = np.ones(256, np.float32) if with_imatrix else None
    with pytest.raises(ValueError, match=rf"{name}: input is too large for fp16 block scales \(row 1, "
                                         r"max \|x\| = 1e\+30.*keep it in F32"):
        qg.quantize(x, name, imatrix=imat)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("imat,message", [
    (np.zeros(256), "imatrix is all zeros: every block would quantize to 0"),
    (np.full(256, np.nan), r"imatrix has 256 non-finite entries \(first at column 0\)"),
    (np.r_[np.ones(255), np.inf], r"imatrix has 1 non-finite entries \(first at column 255\)"),
    (-np.ones(256), r"imatrix has 256 negative entries \(first at column 0, -1\).*must be >= 0"),
    (np.ones(128), "imatrix has 128 entries, rows have 256: pass one importance value per input column"),
], ids=["zeros", "nan", "inf", "negative", "short"])
def test_bad_imatrix_is_refused(name, imat, message):
    """Before: an all-zero, NaN or negative imatrix quantized the whole tensor to zeros (Q4_K, Q4_0, Q6_K,
    Q2_K, Q3_K) or to NaN (Q4_0, Q3_K, Q6_K)."""
    with pytest.raises(ValueError, match=message):
        qg.get_format(name).quantize_rows(gaussian(), imatrix=imat.astype(np.float32))


def test_bad_imatrix_error_names_the_tensor():
    with pytest.raises(ValueError, match="imatrix for blk.3.attn_q.weight is all zeros"):
        qg.quantize(gaussian(), "Q4_K", imatrix=np.zeros(256, np.float32), name="blk.3.attn_q.weight")


def test_valid_imatrix_with_some_zero_entries_is_still_accepted():
    imat = np.ones(256, np.float32)
    imat[:8] = 0.0
    t = qg.quantize(gaussian(), "Q4_K", imatrix=imat)
    assert t.data.shape == (4, 144)


# ---------------------------------------------------------------- item 4: atomic writes

@pytest.fixture
def tiny_file():
    rows = gaussian(2, 256)
    f = GGUFFile(arch="llama", metadata={"qlab.note": ("x", gguf.GGUFValueType.STRING, None)})
    f.tensors["a.weight"] = qg.quantize(rows, "Q4_K")
    f.tensors["norm.weight"] = torch.arange(256, dtype=torch.float32)
    return f


def test_failed_write_leaves_the_old_file_intact_and_no_temporary(tmp_path, tiny_file, monkeypatch):
    """Before: writing a larger file over an existing one on a full disk left it truncated and unreadable."""
    path = tmp_path / "model.gguf"
    write_gguf(path, tiny_file)
    old = path.read_bytes()
    bigger = GGUFFile(arch="llama", metadata=dict(tiny_file.metadata), tensors=dict(tiny_file.tensors))
    bigger.tensors["b.weight"] = qg.quantize(gaussian(64, 256, seed=1), "Q8_0")

    real_write = gguf.GGUFWriter.write_tensors_to_file

    def disk_full(self, *args, **kwargs):
        for fh in self.fout:
            fh.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_gguf(path, bigger)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.gguf"]
    assert read_gguf(path).tensors["a.weight"].qtype == "Q4_K"

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real_write)
    write_gguf(path, bigger)
    assert list(read_gguf(path).tensors) == ["a.weight", "norm.weight", "b.weight"]
    assert os.listdir(tmp_path) == ["model.gguf"]


def test_write_through_a_symlink_replaces_the_target(tmp_path, tiny_file):
    target = tmp_path / "real.gguf"
    target.write_bytes(b"old")
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    write_gguf(link, tiny_file)
    assert link.is_symlink() and read_gguf(target).tensors["a.weight"].qtype == "Q4_K"


def test_quantize_gguf_refuses_to_overwrite_its_source(tmp_path, tiny_file):
    """Before: quantize_gguf(p, p, mix) overwrote its own source."""
    src = tmp_path / "m.gguf"
    write_gguf(src, tiny_file)
    old = src.read_bytes()
    link = tmp_path / "alias.gguf"
    link.symlink_to(src)
    for dst in (src, link, tmp_path / "." / "m.gguf"):
        with pytest.raises(ValueError, match="is the input file .* would destroy the source: choose another output"):
            quantize_gguf(src, dst, "Q4_K_M", progress=False)
    assert src.read_bytes() == old


# ---------------------------------------------------------------- write_gguf refuses what read_gguf refuses

def test_write_refuses_nan_scales_and_nan_floats(tmp_path, tiny_file):
    """Before: write_gguf wrote NaN scales that read_gguf then refused."""
    data = tiny_file.tensors["a.weight"].data.copy()
    data[1, 0:2] = np.array([np.nan], np.float16).view(np.uint8)              # Q4_K d of row 1
    bad = GGUFFile(arch="llama", tensors={"a.weight": qg.GGUFTensor("Q4_K", (2, 256), data)})
    with pytest.raises(ValueError, match=r"tensor a.weight \(Q4_K\) has NaN/inf block scales"):
        write_gguf(tmp_path / "x.gguf", bad)
    nanf = GGUFFile(arch="llama", tensors={"norm.weight": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="tensor norm.weight holds 1 NaN/inf values"):
        write_gguf(tmp_path / "x.gguf", nanf)
    assert os.listdir(tmp_path) == []


def test_bf16_tensor_is_written_and_read_back_exactly(tmp_path):
    """Before: a bf16 tensor in write_gguf raised TypeError (numpy has no bfloat16)."""
    t = torch.randn(3, 64).to(torch.bfloat16)
    f = GGUFFile(arch="llama", tensors={"norm.weight": t, "half": t.half()})
    write_gguf(tmp_path / "b.gguf", f)
    back = read_gguf(tmp_path / "b.gguf").tensors
    assert back["norm.weight"].dtype == torch.bfloat16 and torch.equal(back["norm.weight"], t)
    assert back["half"].dtype == torch.float16 and torch.equal(back["half"], t.half())
    assert tensor_index(tmp_path / "b.gguf")["norm.weight"][0] == "BF16"


def test_non_float_tensor_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="tensor ids has dtype torch.int64; GGUF float tensors are"):
        write_gguf(tmp_path / "i.gguf", GGUFFile(arch="llama", tensors={"ids": torch.arange(4)}))


# ---------------------------------------------------------------- item 9: reading is strict where llama.cpp is

def _header(version=3, n_tensors=0, n_kv=0):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def _tensor_info(name, dims, qtype, offset):
    return _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) \
        + struct.pack("<IQ", qtype, offset)


def _file(tmp_path, header: bytes, name="f.gguf", data=b""):
    """A .gguf of ``header`` padded to the default alignment (32), then ``data``."""
    path = tmp_path / name
    path.write_bytes(header + b"\0" * (-len(header) % 32) + data)
    return path


def test_duplicate_tensor_names_are_refused(tmp_path):
    """Before: the second tensor of the same name silently replaced the first."""
    body = _header(n_tensors=2) + _tensor_info("w", [4], 0, 0) + _tensor_info("w", [4], 0, 32)
    path = _file(tmp_path, body, data=np.arange(16, dtype=np.float32).tobytes())
    with pytest.raises(GGUFFormatError, match="duplicate tensor name 'w'"):
        read_gguf(path)


def test_duplicate_keys_are_refused(tmp_path):
    kv = _string("general.architecture") + struct.pack("<I", 8) + _string("llama")
    path = _file(tmp_path, _header(n_kv=2) + kv + kv)
    with pytest.raises(GGUFFormatError, match="duplicate key 'general.architecture'"):
        read_gguf(path)


@pytest.mark.parametrize("qtype,raw", [(0, np.array([1.0, np.nan, 2.0, 3.0], np.float32).tobytes()),
                                       (1, np.array([1.0, np.inf, 2.0, 3.0], np.float16).tobytes()),
                                       (30, np.array([0x7FC0, 0x3F80, 0, 0], np.uint16).tobytes())])
def test_float_tensor_with_nan_fails_validation(tmp_path, qtype, raw):
    """Before: an F32 tensor holding NaN passed read_gguf(validate=True)."""
    path = _file(tmp_path, _header(n_tensors=1) + _tensor_info("norm.weight", [4], qtype, 0), data=raw)
    with pytest.raises(GGUFFormatError, match=r"tensor norm.weight \((F32|F16|BF16)\) holds 1 non-finite values"):
        read_gguf(path)
    assert read_gguf(path, validate=False).tensors["norm.weight"].shape == (4,)


@pytest.mark.parametrize("version", [0, 1, 4, 99, 0x03000000])
def test_unsupported_version_is_refused(tmp_path, version):
    """Before: version 99 was read as if it were 3."""
    path = _file(tmp_path, _header(version=version))
    with pytest.raises(GGUFFormatError, match=f"GGUF version {version} is not supported"):
        read_gguf(path)


def test_version_2_is_read(tmp_path):
    path = _file(tmp_path, _header(version=2, n_tensors=1) + _tensor_info("w", [2], 0, 0),
                 data=np.array([1.5, -2.0], np.float32).tobytes())
    assert read_gguf(path).tensors["w"].tolist() == [1.5, -2.0]


# ---------------------------------------------------------------- item 14: hostile headers

def _alignment_kv(value, vtype=4):
    return _string("general.alignment") + struct.pack("<I", vtype) + struct.pack(files._SCALAR[vtype], value)


@pytest.mark.parametrize("body,message", [
    (_header(n_kv=1) + _alignment_kv(0), "general.alignment is 0, it must be a power of 2"),
    (_header(n_kv=1) + _alignment_kv(48), "general.alignment is 48, it must be a power of 2"),
    (_header(n_tensors=1) + _tensor_info("w", [2**40, 2**40], 0, 0), "truncated: tensor w needs bytes up to"),
    (_header(n_tensors=1) + _tensor_info("w", [2**63, 2**63, 2**63, 2**63], 0, 0), "truncated: tensor w needs"),
    (_header(n_tensors=1) + _tensor_info("w", [1] * 5, 0, 0), "tensor w has 5 dimensions, GGUF allows at most 4"),
    (_header(n_tensors=1) + _tensor_info("w", [100], 12, 0), "rows of 100 values, not a multiple of the Q4_K block"),
    (_header(n_tensors=1) + _tensor_info("w", [32], 4, 0), "tensor w has unknown ggml type 4"),
    (_header(n_tensors=1) + _tensor_info("w", [32], 0, 2**64 - 1), "truncated: tensor w needs"),
    (_header(n_kv=1) + _string("k") + struct.pack("<IIQ", 9, 4, 2**62), "4611686018427387904 array items of k needs"),
    (_header(n_kv=1) + _string("k") + struct.pack("<IIQ", 9, 8, 2**62), "strings of k needs"),
    (_header(n_kv=1) + _string("k") + struct.pack("<IIQ", 9, 9, 1), "key k is an array of unsupported type 9"),
    (_header(n_kv=1) + _string("k") + struct.pack("<IQ", 8, 2**63), "the value of k needs"),
    (_header(n_kv=1) + struct.pack("<Q", 2**64 - 1), "key 0 needs"),
    (_header(n_kv=1) + _string("k") + struct.pack("<I", 13) + b"\0" * 8, "key k has unknown GGUF value type 13"),
    (_header(n_kv=2**63), "key/values cannot fit"),
    (_header(n_tensors=2**40), "tensor infos cannot fit"),
    (_header(n_kv=1) + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", 0) + b"\0", "key 0 is not valid UTF-8"),
], ids=["alignment-0", "alignment-48", "huge-dims", "dims-2^63", "5-dims", "row-vs-block", "unknown-type",
        "offset-2^64", "huge-array", "huge-string-array", "nested-array", "huge-string", "huge-key", "value-type-13",
        "n_kv-2^63", "n_tensors-2^40", "bad-utf8"])
def test_hostile_headers_are_format_errors(tmp_path, body, message):
    """Before: alignment 0 raised ZeroDivisionError, huge dims or counts a numpy/MemoryError/OverflowError."""
    path = _file(tmp_path, body, data=b"\0" * 64)
    with pytest.raises(GGUFFormatError, match=message):
        read_gguf(path)


@pytest.mark.parametrize("seed", range(12))
def test_random_bytes_after_the_magic_are_format_errors(tmp_path, seed):
    """Before: 12 of 12 seeds raised MemoryError or OverflowError. Random bytes after the magic, after a
    valid version, and after a valid version with small counts must all be a GGUFFormatError."""
    rng = np.random.default_rng(seed)
    junk = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    small_counts = struct.pack("<IQQ", 3, int(rng.integers(1, 4)), int(rng.integers(1, 40)))
    for i, body in enumerate((b"GGUF" + junk, b"GGUF" + struct.pack("<I", 3) + junk, b"GGUF" + small_counts + junk)):
        path = tmp_path / f"junk{i}.gguf"
        path.write_bytes(body)
        with pytest.raises(GGUFFormatError):
            read_gguf(path)


@pytest.mark.parametrize("seed", range(12))
def test_damaged_valid_file_reads_or_is_a_format_error(tmp_path, tiny_file, seed):
    """Flip a few random bytes of a valid file (header or data): the result is a clean read or a
    GGUFFormatError, never another exception."""
    src = tmp_path / "ok.gguf"
    write_gguf(src, tiny_file)
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(seed)
    header_end = tensor_index(src)["a.weight"][2]
    for _ in range(50):
        bad = bytearray(data)
        for pos in rng.integers(4, header_end if rng.random() < 0.8 else len(data), 3):
            bad[pos] = int(rng.integers(0, 256))
        path = tmp_path / "bad.gguf"
        path.write_bytes(bytes(bad))
        try:
            read_gguf(path)
        except GGUFFormatError:
            pass
