""".gguf files: read them into qlab tensors, write qlab tensors out, re-quantize a model with a mix.

A .gguf file is a header of key/values (architecture, hyper-parameters, tokenizer) followed by
tensors, each stored in its block format exactly as in memory. Writing goes through the ``gguf``
package (llama.cpp's own Python writer), reading through a small header walker; qlab adds:

* clear errors for files that are not GGUF, truncated, of another version, with duplicate names, or
  whose tensor data does not add up (:class:`GGUFFormatError`; every length in the header is checked
  against the file size before anything is allocated), and a check that every block's scales and
  every float value are finite, so a corrupted file never turns silently into garbage weights;
* atomic writes (a temporary file beside the target, then a rename): a failed write never leaves a
  truncated file behind, and nothing non-finite is written;
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
# Every length and count read from the file is checked against the bytes left before anything is
# allocated, so a damaged or hostile header is a GGUFFormatError, never a MemoryError / OverflowError.

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
SUPPORTED_VERSIONS = (2, 3)   # v2 and v3 share the layout (64-bit counts); llama.cpp refuses v1 and > 3
MAX_DIMS = 4                  # GGML_MAX_DIMS
_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class _Header:
    """Little-endian fields of a GGUF header, never read past the end of the file."""

    def __init__(self, fh, size: int, path: str):
        self.fh, self.size, self.path, self.pos = fh, size, path, fh.tell()

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise GGUFFormatError(f"{self.path}: truncated or corrupted GGUF header: {what} needs {n} bytes at "
                                  f"offset {self.pos}, the file has {self.left} left")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        self.pos += n
        return self.fh.read(n)

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n
        self.fh.seek(n, 1)

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def string(self, what: str, keep: bool = True) -> str | None:
        (n,) = struct.unpack("<Q", self.take(8, what))
        if not keep:
            return self.skip(n, what)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, key: str, keep: bool = True):
        """One metadata value (not an array)."""
        if vtype == _STRING:
            return self.string(f"the value of {key}", keep)
        fmt = _SCALAR.get(vtype)
        if fmt is None:
            raise GGUFFormatError(f"{self.path}: key {key} has unknown GGUF value type {vtype}")
        return self.unpack(fmt, f"the value of {key}")[0]

    def array(self, sub: int, count: int, key: str, keep: bool = True):
        """An array of ``count`` items of type ``sub``, as a list; skipped cheaply when not kept."""
        if sub in _SCALAR:
            size = count * struct.calcsize(_SCALAR[sub])
            if not keep:
                return self.skip(size, f"{count} array items of {key}")
            return np.frombuffer(self.take(size, f"{count} array items of {key}"), np.dtype(_SCALAR[sub])).tolist()
        if sub != _STRING:   # llama.cpp has no arrays of arrays either
            raise GGUFFormatError(f"{self.path}: key {key} is an array of unsupported type {sub}")
        self.need(8 * count, f"{count} strings of {key}")          # each string takes >= 8 bytes
        what = f"a string of {key}"
        items = [self.string(what, keep) for _ in range(count)]
        return items if keep else None


def _scan(path: str, keep_values: bool):
    """Walk the header: (metadata {key: (value, type, sub_type)}, tensor index)."""
    size = _check_header(path)
    meta = {}
    with open(path, "rb") as fh:
        h = _Header(fh, size, path)
        _, version, n_tensors, n_kv = h.unpack("<4sIQQ", "the fixed header")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (qlab and llama.cpp read "
                                  f"versions {SUPPORTED_VERSIONS}); the file is corrupted or from another tool")
        if n_kv * 13 > h.left:                      # key length (8) + type (4) + a value (>= 1)
            raise GGUFFormatError(f"{path}: corrupted GGUF header: {n_kv} key/values cannot fit in {h.left} bytes")
        if n_tensors * 24 > h.left:                 # name length, n_dims, type, offset
            raise GGUFFormatError(f"{path}: corrupted GGUF header: {n_tensors} tensor infos cannot fit in "
                                  f"{h.left} bytes")
        for i in range(n_kv):
            key = h.string(f"key {i}")
            if key in meta:
                raise GGUFFormatError(f"{path}: duplicate key {key!r} in the GGUF header")
            (vtype,) = h.unpack("<I", f"the type of {key}")
            keep = keep_values or key == "general.alignment"
            sub = None
            if vtype == _ARRAY:
                sub, count = h.unpack("<IQ", f"the array header of {key}")
                value = h.array(sub, count, key, keep)
            else:
                value = h.value(vtype, key, keep)
            try:
                meta[key] = (value, GGUFValueType(vtype), None if sub is None else GGUFValueType(sub))
            except ValueError:
                raise GGUFFormatError(f"{path}: key {key} has unknown GGUF value type {vtype}") from None
        infos = []
        for i in range(n_tensors):
            name = h.string(f"the name of tensor {i}")
            (ndim,) = h.unpack("<I", f"the number of dimensions of {name}")
            if ndim > MAX_DIMS:
                raise GGUFFormatError(f"{path}: tensor {name} has {ndim} dimensions, GGUF allows at most {MAX_DIMS}")
            dims = h.unpack(f"<{ndim}Q", f"the dimensions of {name}")
            qtype, offset = h.unpack("<IQ", f"the type and offset of {name}")
            infos.append((name, qtype, tuple(int(d) for d in reversed(dims)), offset))
        alignment = meta.get("general.alignment", (32,))[0]
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{path}: general.alignment is {alignment!r}, it must be a power of 2")
        start = -(-h.pos // alignment) * alignment
    index = {}
    for name, qtype, shape, offset in infos:
        if name in index:
            raise GGUFFormatError(f"{path}: duplicate tensor name {name!r}: the file holds two tensors of that name")
        try:
            qtype = T(qtype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"{path}: tensor {name} has unknown ggml type {qtype}") from None
        row = shape[-1] if shape else 1
        if row % block:
            raise GGUFFormatError(f"{path}: tensor {name} has rows of {row} values, not a multiple of the "
                                  f"{qtype.name} block size {block}")
        numel = 1
        for d in shape:                             # Python ints: no overflow on a corrupted shape
            numel *= d
        nbytes = numel // block * type_size
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
    if qtype in _FLOAT_TYPES:
        arr = raw.view(_FLOAT_TYPES[qtype]).reshape(shape)
        if validate:
            values = (arr.astype(np.uint32) << 16).view(np.float32) if qtype == "BF16" else arr
            bad = ~np.isfinite(values)
            if bad.any():
                raise GGUFFormatError(f"{path}: tensor {name} ({qtype}) holds {int(bad.sum())} non-finite values: "
                                      f"the file is corrupted (read with validate=False to inspect it)")
        t = torch.from_numpy(arr.copy())
        return t.view(torch.bfloat16) if qtype == "BF16" else t
    if qtype not in FORMATS:
        raise GGUFFormatError(f"{path}: tensor {name} has type {qtype}, which qlab does not read")
    fmt = FORMATS[qtype]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    gt = GGUFTensor(qtype, shape, raw.reshape(rows, shape[-1] // fmt.block_size * fmt.type_size))
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


def _float_array(t: torch.Tensor) -> tuple[np.ndarray, T | None]:
    """The array ``write_gguf`` stores for a float tensor: F32 / F16 as they are, bfloat16 exactly (its
    raw uint16 bits with ggml type BF16), float64 as F32."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), T.BF16
    arr = t.numpy()
    return (arr.astype(np.float32) if arr.dtype == np.float64 else arr), None


def _check_writable(file: GGUFFile) -> None:
    """Refuse what llama.cpp would refuse to load: NaN/inf scales or values, or bytes that do not fit the shape."""
    for name, t in file.tensors.items():
        if isinstance(t, GGUFTensor):
            fmt = t.format
            rows = 1
            for d in t.shape[:-1]:
                rows *= d
            if t.data.dtype != np.uint8 or t.data.shape != (rows, t.shape[-1] // fmt.block_size * fmt.type_size):
                raise ValueError(f"write_gguf: tensor {name} ({t.qtype}, shape {tuple(t.shape)}) has bytes "
                                 f"{t.data.dtype} {t.data.shape}, which do not match its shape")
            if not fmt.finite_scales(t.data):
                raise ValueError(f"write_gguf: tensor {name} ({t.qtype}) has NaN/inf block scales, so it decodes "
                                 f"to non-finite weights (read_gguf and llama.cpp refuse such files): "
                                 f"re-quantize it from finite data")
        elif isinstance(t, torch.Tensor):
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise TypeError(f"write_gguf: tensor {name} has dtype {t.dtype}; GGUF float tensors are float32, "
                                f"float16 or bfloat16: convert it (t.float()) or quantize it (qlab.gguf.quantize) first")
            if not torch.isfinite(t).all():
                raise ValueError(f"write_gguf: tensor {name} holds {int((~torch.isfinite(t)).sum())} NaN/inf "
                                 f"values (read_gguf and llama.cpp refuse such files): fix them before writing")
        else:
            raise TypeError(f"write_gguf: tensor {name} is a {type(t).__name__}; expected a GGUFTensor or a torch.Tensor")


def _temporary_beside(path: str) -> str:
    """A new, empty file in ``path``'s folder (same filesystem, so ``os.replace`` is atomic)."""
    folder, base = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))   # mode from the umask
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def write_gguf(path, file: GGUFFile, file_type: int | None = None) -> None:
    """Write :class:`GGUFFile` with the ``gguf`` package writer (metadata copied verbatim).

    The write is atomic: the file is written to a temporary file in the same folder, flushed to disk,
    then renamed over ``path``; on any failure (a full disk, an interrupt) the temporary file is
    removed and an existing ``path`` is left as it was. Tensors with NaN/inf scales or values are
    refused before anything is written. bfloat16 tensors are stored as GGUF BF16.
    """
    _check_writable(file)
    path = os.path.realpath(str(path))      # through a symlink: replace its target, keep the link
    tmp = _temporary_beside(path)
    w = None
    try:
        w = gguf.GGUFWriter(tmp, file.arch)
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
                arr, raw_dtype = _float_array(t)
                w.add_tensor(name, arr, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        for fh in (w.fout if w is not None else None) or []:
            fh.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def quantize_gguf(src, dst, mix: str, imatrix: dict | None = None, progress: bool = True) -> list[dict]:
    """Re-quantize every tensor of ``src`` with a llama.cpp mix and write ``dst``.

    Each tensor is dequantized to float32 first (as llama.cpp does with --allow-requantize), then
    quantized with the type :func:`~qlab.gguf.mixes.choose_types` picks. ``imatrix`` maps tensor
    names to importance vectors. Returns the per-tensor choices (with ``nbytes`` added).
    ``dst`` may not be ``src`` (nor a link to it); it is written atomically (:func:`write_gguf`).
    """
    from tqdm.auto import tqdm

    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"quantize_gguf: the output {dst} is the input file {src} (or a link to it); "
                         f"writing it would destroy the source: choose another output path")
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
            new.tensors[c["name"]] = quantize(w, c["qtype"], imatrix=im, name=c["name"])
        c["nbytes"] = int(new.tensors[c["name"]].nbytes) if isinstance(new.tensors[c["name"]], GGUFTensor) \
            else new.tensors[c["name"]].numel() * new.tensors[c["name"]].element_size()
    write_gguf(dst, new, file_type=FILE_TYPE[mix])
    return choices
