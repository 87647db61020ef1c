""".gguf files: read them into qlab tensors, write qlab tensors out, re-quantize a model with a mix.

A .gguf file is a header of key/values (architecture, hyper-parameters, tokenizer) followed by
tensors, each stored in its block format exactly as in memory. Writing goes through the ``gguf``
package (llama.cpp's own Python writer), reading through a small header walker; qlab adds:

* clear errors for files that are not GGUF, truncated, or whose tensor data does not add up
  (:class:`GGUFFormatError`), and a check that every block's scales decode to finite numbers,
  so a corrupted file never turns silently into garbage weights;
* :func:`quantize_gguf`: dequantize a model's tensors, pick per-tensor formats with a mix
  (``qlab.gguf.mixes``), quantize them with qlab's byte-exact formats and write a file that
  llama.cpp loads -- what ``llama-quantize --allow-requantize`` does.

Shapes are in torch order ([rows, row length]); GGUF stores them reversed (ne[0] = row length).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType as T, GGUFValueType

from qlab.gguf.blocks import FORMATS, GGUFTensor, quantize
from qlab.gguf.mixes import FILE_TYPE, choose_types

class GGUFFormatError(ValueError):
    """The file is not a valid GGUF (bad magic, truncated, inconsistent or non-finite data)."""


@dataclass
class GGUFFile:
    """A .gguf in memory: architecture, key/value metadata and tensors (in file order)."""

    arch: str
    metadata: dict = field(default_factory=dict)        # key -> (value, GGUFValueType, sub_type)
    tensors: dict = field(default_factory=dict)         # name -> GGUFTensor | torch.Tensor

    def dequantized(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        return t.dequantize() if isinstance(t, GGUFTensor) else t.float()

    def table(self) -> list[dict]:
        """name, shape, type, bits per weight of every tensor."""
        rows = []
        for name, t in self.tensors.items():
            if isinstance(t, GGUFTensor):
                rows.append(dict(name=name, shape=tuple(t.shape), qtype=t.qtype, bits_per_weight=t.bits_per_weight))
            else:
                rows.append(dict(name=name, shape=tuple(t.shape), qtype=str(t.dtype).replace("torch.", ""),
                                 bits_per_weight=8.0 * t.element_size()))
        return rows


def _check_header(path: str) -> int:
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise GGUFFormatError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    if size < 24:
        raise GGUFFormatError(f"{path}: truncated GGUF ({size} bytes, the header alone takes 24)")
    return size


# ---------------------------------------------------------------- reading
# The header is walked with struct (GGUF v3: magic, version, n_tensors, n_kv, key/values, tensor
# infos, aligned data). gguf.GGUFReader would do it too, but it builds a numpy view for each of
# the ~100k vocabulary strings: 15-45 s for this small model against ~1 s here.

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read_value(fh, vtype: int, keep: bool = True):
    """One metadata value; arrays of numbers come back as lists, skipped cheaply when not kept."""
    if vtype == 8:                                                    # string: u64 length + bytes
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
        if len(raw) != n:
            raise GGUFFormatError("header cut short inside a string")
        return raw.decode("utf-8") if keep else None
    if vtype == 9:                                                    # array: u32 type, u64 count, items
        sub, count = struct.unpack("<IQ", fh.read(12))
        if sub in _SCALAR:
            size = count * struct.calcsize(_SCALAR[sub])
            if not keep:
                fh.seek(size, 1)
                return None
            return np.frombuffer(fh.read(size), dtype=np.dtype(_SCALAR[sub])).tolist()
        return [_read_value(fh, sub, keep) for _ in range(count)]
    fmt = _SCALAR.get(vtype)
    if fmt is None:
        raise GGUFFormatError(f"unknown GGUF value type {vtype}")
    return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]


def _scan(path: str, keep_values: bool):
    """Walk the header: (metadata {key: (value, type, sub_type)}, tensor infos, data start)."""
    size = _check_header(path)
    meta = {}
    try:
        with open(path, "rb") as fh:
            _, version, n_tensors, n_kv = struct.unpack("<4sIQQ", fh.read(24))
            for _ in range(n_kv):
                (n,) = struct.unpack("<Q", fh.read(8))
                key = fh.read(n).decode()
                (vtype,) = struct.unpack("<I", fh.read(4))
                sub = None
                if vtype == 9:
                    (sub,) = struct.unpack("<I", fh.read(4))
                    fh.seek(-4, 1)
                keep = keep_values or key == "general.alignment"
                meta[key] = (_read_value(fh, vtype, keep), GGUFValueType(vtype),
                             None if sub is None else GGUFValueType(sub))
            infos = []
            for _ in range(n_tensors):
                (n,) = struct.unpack("<Q", fh.read(8))
                name = fh.read(n).decode()
                (ndim,) = struct.unpack("<I", fh.read(4))
                dims = struct.unpack(f"<{ndim}Q", fh.read(8 * ndim))
                qtype, offset = struct.unpack("<IQ", fh.read(12))
                infos.append((name, T(qtype), tuple(int(d) for d in reversed(dims)), offset))
            alignment = int(meta.get("general.alignment", (32,))[0])
            start = -(-fh.tell() // alignment) * alignment
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, GGUFFormatError):
            raise
        raise GGUFFormatError(f"{path}: corrupted or truncated GGUF header ({e})") from e
    index = {}
    for name, qtype, shape, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * type_size
        if start + offset + nbytes > size:
            raise GGUFFormatError(f"{path}: truncated: tensor {name} needs bytes up to {start + offset + nbytes}, "
                                  f"file has {size}")
        index[name] = (qtype.name, shape, start + offset, nbytes)
    return meta, index


def tensor_index(path) -> dict:
    """name -> (type name, torch-order shape, absolute byte offset, nbytes), read from the header.

    Raises :class:`GGUFFormatError` for a bad magic, a header cut short, or tensor data that would
    run past the end of the file.
    """
    return _scan(str(path), keep_values=False)[1]


def load_tensors(path, names=None, validate: bool = True, index: dict | None = None) -> dict:
    """Tensors of a .gguf (all, or those in ``names``) without parsing the metadata values.

    Quantized tensors come back as :class:`GGUFTensor`, float ones as torch tensors.
    """
    index = tensor_index(path) if index is None else index
    names = list(index) if names is None else list(names)
    mm = np.memmap(str(path), dtype=np.uint8, mode="r")
    out = {}
    for name in names:
        if name not in index:
            raise KeyError(f"{path}: no tensor {name!r}")
        qtype, shape, offset, nbytes = index[name]
        out[name] = _make_tensor(str(path), name, qtype, shape, np.array(mm[offset:offset + nbytes]), validate)
    return out


def _make_tensor(path, name, qtype, shape, raw: np.ndarray, validate: bool):
    if qtype in ("F32", "F16"):
        arr = raw.view(np.float32 if qtype == "F32" else np.float16).reshape(shape)
        return torch.from_numpy(arr.copy())
    if qtype not in FORMATS:
        raise GGUFFormatError(f"{path}: tensor {name} has type {qtype}, which qlab does not read")
    fmt = FORMATS[qtype]
    if shape[-1] % fmt.block_size:
        raise GGUFFormatError(f"{path}: tensor {name} rows of {shape[-1]} do not fit {qtype} blocks")
    gt = GGUFTensor(qtype, shape, raw.reshape(-1, shape[-1] // fmt.block_size * fmt.type_size))
    if validate and not fmt.finite_scales(gt.data):
        raise GGUFFormatError(f"{path}: tensor {name} ({qtype}) decodes to non-finite values: corrupted scales")
    return gt


def read_gguf(path, validate: bool = True) -> GGUFFile:
    """Read a .gguf into :class:`GGUFFile`: metadata values, and every tensor -- quantized ones as
    :class:`GGUFTensor` (bytes kept, not dequantized), F32/F16 ones as torch tensors.

    ``validate`` raises if any block's fp16 scale or min is NaN/inf (the only way a block can
    decode to a non-finite weight).
    """
    path = str(path)
    meta, index = _scan(path, keep_values=True)
    meta = {k: v for k, v in meta.items() if not k.startswith("GGUF.")}
    out = GGUFFile(arch=meta.get("general.architecture", (None,))[0], metadata=meta)
    out.tensors = load_tensors(path, validate=validate, index=index)
    return out


def write_gguf(path, file: GGUFFile, file_type: int | None = None) -> None:
    """Write :class:`GGUFFile` with the ``gguf`` package writer (metadata copied verbatim)."""
    w = gguf.GGUFWriter(str(path), file.arch)
    for key, (value, vtype, sub) in file.metadata.items():
        if key == "general.architecture" or (key == "general.file_type" and file_type is not None):
            continue
        w.add_key_value(key, value, vtype, sub_type=sub)
    if file_type is not None:
        w.add_file_type(file_type)
    for name, t in file.tensors.items():
        if isinstance(t, GGUFTensor):
            data = t.data.reshape(*t.shape[:-1], t.data.shape[-1])
            w.add_tensor(name, data, raw_dtype=T[t.qtype])
        else:
            arr = t.detach().cpu().numpy()
            w.add_tensor(name, arr if arr.dtype in (np.float32, np.float16) else arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(src, dst, mix: str, imatrix: dict | None = None, progress: bool = True) -> list[dict]:
    """Re-quantize every tensor of ``src`` with a llama.cpp mix and write ``dst``.

    Each tensor is dequantized to float32 first (as llama.cpp does with --allow-requantize), then
    quantized with the type :func:`~qlab.gguf.mixes.choose_types` picks. ``imatrix`` maps tensor
    names to importance vectors. Returns the per-tensor choices (with ``nbytes`` added).
    """
    from tqdm.auto import tqdm

    model = read_gguf(src, validate=False)
    hkv = model.metadata.get(f"{model.arch}.attention.head_count_kv", (1,))[0]
    hq = model.metadata.get(f"{model.arch}.attention.head_count", (1,))[0]
    choices = choose_types(mix, [(n, t.shape) for n, t in model.tensors.items()],
                           n_gqa=int(hq) // max(int(hkv), 1), has_imatrix=imatrix is not None)
    new = GGUFFile(arch=model.arch, metadata=model.metadata)
    for c in tqdm(choices, desc=f"quantize {mix}", disable=not progress):
        w = model.dequantized(c["name"])
        if c["qtype"] == "F32":
            new.tensors[c["name"]] = w.float()
        elif c["qtype"] == "F16":
            new.tensors[c["name"]] = w.half()
        else:
            im = None if imatrix is None else imatrix.get(c["name"])
            new.tensors[c["name"]] = quantize(w, c["qtype"], imatrix=im)
        c["nbytes"] = int(new.tensors[c["name"]].nbytes) if isinstance(new.tensors[c["name"]], GGUFTensor) \
            else new.tensors[c["name"]].numel() * new.tensors[c["name"]].element_size()
    write_gguf(dst, new, file_type=FILE_TYPE[mix])
    return choices
