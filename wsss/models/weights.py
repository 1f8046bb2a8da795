"""Stage-1 weights: MXNet ``.params`` reader/writer (NumPy only), PSA name map, checkpoint loading.

The ImageNet ResNet38 weights (``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``) exist only in MXNet's
NDArray-list format, and MXNet no longer installs on current Python. The format, as written by
``NDArray::Save`` and read by ``NDArray::Load`` / ``LegacyLoad`` in MXNet's
``src/ndarray/ndarray.cc`` (all little-endian)::

    u64 0x112 (list magic) · u64 reserved · u64 N · N records · u64 K · K × (u64 length, bytes)

A record starts with a u32:

* ``0xF993FAC9`` (V2) / ``0xF993FACA`` (V3, NumPy shape semantics): i32 storage type (0 dense;
  1 row-sparse and 2 CSR carry extra data we refuse), shape, then — unless the array is empty —
  i32 device type, i32 device id, i32 dtype, raw data.
* ``0xF993FAC8`` (V1): as V2 without the storage type.
* anything else (legacy, before int64 shapes): that u32 *is* ndim, followed by ndim × u32 dims,
  then device, dtype and data as above.

A V1/V2/V3 shape is ``TShape::Save``: i32 ndim + ndim × i64 dims. An empty array (V1, V2, legacy:
ndim 0; V3: ndim -1, "unknown") stores nothing after its shape. In V3, ndim 0 is a scalar with one
element. dtype codes: 0 f32, 1 f64, 2 f16, 3 u8, 4 i32, 5 i8, 6 i64.
"""

from __future__ import annotations

import io
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsss.errors import WsssError
from wsss.runtime import atomic_path

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA

_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}

# A legacy record's first u32 is its ndim; anything larger means the bytes are not a record.
_MAX_LEGACY_NDIM = 32
_CPU_DEVICE = 1

_VERSIONS = {"v1": V1_MAGIC, "v2": V2_MAGIC, "v3": V3_MAGIC, "legacy": None}


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer; running short raises WsssError."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.path = path

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.pos + size > len(self.data):
            raise WsssError(
                f"{self.path}: truncated or corrupt MXNet .params file "
                f"(needed {size} bytes for {what} at offset {self.pos}, file has {len(self.data)})"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def array(self, count: int, dtype: np.dtype, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype)


def read_mxnet_params(path: str | Path) -> dict[str, np.ndarray]:
    """Read an MXNet NDArray-list ``.params`` file into ``{name: array}`` (native byte order).

    Raises WsssError when the file is missing, unreadable, truncated, sparse or otherwise corrupt.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WsssError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    cur = _Cursor(data, path)
    if cur.unpack("Q", "the header") != LIST_MAGIC:
        raise WsssError(f"{path} is not an MXNet .params file (bad header magic)")
    cur.unpack("Q", "the header")
    count = cur.unpack("Q", "the array count")
    # Every record needs at least 4 bytes; a larger count is garbage, not a huge file.
    if count * 4 > len(data):
        raise WsssError(f"{path}: corrupt MXNet .params file (claims {count} arrays)")
    arrays = [_read_record(cur, i) for i in range(count)]
    names = _read_names(cur)
    if len(names) != len(arrays):
        raise WsssError(
            f"{path}: MXNet .params file has {len(arrays)} arrays but {len(names)} names "
            "(unnamed array lists cannot be mapped to model parameters)"
        )
    return dict(zip(names, arrays))


def _read_names(cur: _Cursor) -> list[str]:
    count = cur.unpack("Q", "the name count")
    names = []
    for i in range(count):
        length = cur.unpack("Q", f"the length of name {i}")
        raw = bytes(cur.take(length, f"name {i}"))
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise WsssError(f"{cur.path}: corrupt MXNet .params file (name {i} is not text)") from exc
    return names


def _read_record(cur: _Cursor, index: int) -> np.ndarray:
    what = f"array {index}"
    magic = cur.unpack("I", what)
    if magic in (V2_MAGIC, V3_MAGIC):
        storage = cur.unpack("i", what)
        # Sparse arrays put a storage shape first; -1 (undefined) only occurs for empty arrays.
        if storage not in (0, -1):
            raise WsssError(f"{cur.path}: {what} uses sparse storage type {storage}; only dense is supported")
        shape = _read_shape(cur, what)
        if shape is None or (magic == V2_MAGIC and len(shape) == 0):
            return _empty()
        if storage != 0:
            raise WsssError(f"{cur.path}: corrupt MXNet .params file ({what} has undefined storage)")
    elif magic == V1_MAGIC:
        shape = _read_shape(cur, what)
        if not shape:
            return _empty()
    else:
        if magic > _MAX_LEGACY_NDIM:
            raise WsssError(f"{cur.path}: corrupt MXNet .params file ({what} starts with 0x{magic:08X})")
        shape = tuple(int(d) for d in cur.array(magic, np.dtype("<u4"), what))
        if not shape:
            return _empty()
    return _read_payload(cur, shape, what)


def _read_shape(cur: _Cursor, what: str) -> tuple[int, ...] | None:
    """``TShape::Save``: i32 ndim, ndim × i64. Returns None for ndim -1 (unknown, V3)."""
    ndim = cur.unpack("i", what)
    if ndim == -1:
        return None
    if not 0 <= ndim <= _MAX_LEGACY_NDIM:
        raise WsssError(f"{cur.path}: corrupt MXNet .params file ({what} has ndim {ndim})")
    dims = tuple(int(d) for d in cur.array(ndim, np.dtype("<i8"), what))
    if any(d < 0 for d in dims):
        raise WsssError(f"{cur.path}: corrupt MXNet .params file ({what} has shape {dims})")
    return dims


def _read_payload(cur: _Cursor, shape: tuple[int, ...], what: str) -> np.ndarray:
    cur.unpack("i", what)  # device type: data is always stored host-side
    cur.unpack("i", what)  # device id
    code = cur.unpack("i", what)
    if code not in _DTYPES:
        raise WsssError(f"{cur.path}: {what} has unsupported MXNet dtype code {code}")
    dtype = _DTYPES[code]
    flat = cur.array(math.prod(shape), dtype, what)
    return flat.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def _empty() -> np.ndarray:
    return np.zeros((0,), dtype=np.float32)


def write_mxnet_params(path: str | Path, arrays: Mapping[str, np.ndarray], version: str = "v2") -> None:
    """Write ``{name: array}`` in MXNet's NDArray-list format (``version``: v1, v2, v3 or legacy).

    The inverse of :func:`read_mxnet_params`, for tests and for exporting small files. Written
    atomically.
    """
    if version not in _VERSIONS:
        raise ValueError(f"version must be one of {sorted(_VERSIONS)}, got {version!r}")
    out = io.BytesIO()
    out.write(struct.pack("<QQQ", LIST_MAGIC, 0, len(arrays)))
    for array in arrays.values():
        out.write(_encode_record(np.asarray(array), version))
    out.write(struct.pack("<Q", len(arrays)))
    for name in arrays:
        raw = name.encode("utf-8")
        out.write(struct.pack("<Q", len(raw)) + raw)
    with atomic_path(path) as tmp:
        tmp.write_bytes(out.getvalue())


def _encode_record(array: np.ndarray, version: str) -> bytes:
    native = array.dtype.newbyteorder("=")
    if native not in _CODES:
        raise ValueError(f"dtype {array.dtype} has no MXNet code")
    code = _CODES[native]
    if version == "legacy":
        head = struct.pack(f"<I{array.ndim}I", array.ndim, *array.shape)
    else:
        shape = struct.pack(f"<i{array.ndim}q", array.ndim, *array.shape)
        storage = b"" if version == "v1" else struct.pack("<i", 0)
        head = struct.pack("<I", _VERSIONS[version]) + storage + shape
    payload = struct.pack("<iii", _CPU_DEVICE, 0, code) + array.astype(_DTYPES[code]).tobytes()
    return head + payload


# res4b3_branch2a_weight, bn2a_branch2b1_moving_mean, ...
_BLOCK_NAME = re.compile(
    r"^(?P<kind>res|bn)(?P<stage>\d)(?P<block>a|b\d+)_(?P<branch>branch\w+?)_"
    r"(?P<param>weight|gamma|beta|moving_mean|moving_var)$"
)
_BN_PARAMS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
_BN7_NAME = re.compile(r"^bn7_(?P<param>gamma|beta|moving_mean|moving_var)$")


def mxnet_to_psa_names(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename MXNet ResNet38 arrays to PSA/WSSS-Tissue parameter names, as torch tensors.

    ``res4b3_branch2a_weight`` → ``b4_3.conv_branch2a.weight``; ``bn2a_branch2a_gamma`` →
    ``b2.bn_branch2a.weight`` (beta/moving_mean/moving_var → bias/running_mean/running_var);
    ``bn7_*`` → ``bn7.*``; ``conv1a_weight`` → ``conv1a.weight``; ``linear1000*`` (the ImageNet
    classifier) is dropped; ``arg:``/``aux:`` prefixes are stripped. Other names pass through
    unchanged so they show up as unexpected in the load report.
    """
    renamed: dict[str, torch.Tensor] = {}
    for raw_name, array in arrays.items():
        name = _psa_name(raw_name.split(":", 1)[1] if raw_name.startswith(("arg:", "aux:")) else raw_name)
        if name is not None:
            renamed[name] = torch.from_numpy(np.ascontiguousarray(array))
    return renamed


def _psa_name(name: str) -> str | None:
    if name.startswith("linear1000"):
        return None
    if name == "conv1a_weight":
        return "conv1a.weight"
    if match := _BN7_NAME.match(name):
        return f"bn7.{_BN_PARAMS[match['param']]}"
    match = _BLOCK_NAME.match(name)
    if match is None:
        return name
    block = f"b{match['stage']}" + ("" if match["block"] == "a" else f"_{match['block'][1:]}")
    if match["kind"] == "res" and match["param"] == "weight":
        return f"{block}.conv_{match['branch']}.weight"
    if match["kind"] == "bn" and match["param"] in _BN_PARAMS:
        return f"{block}.bn_{match['branch']}.{_BN_PARAMS[match['param']]}"
    return name


@dataclass
class LoadReport:
    """What :func:`load_stage1_weights` did. ``imagenet`` is True for MXNet ImageNet weights
    (the caller then applies the pretrained freeze policy)."""

    source: str
    imagenet: bool
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph for the log."""
        kind = "MXNet ImageNet weights" if self.imagenet else "PyTorch state dict"
        total = len(self.loaded) + len(self.missing) + len(self.shape_mismatch)
        parts = [f"Loaded {len(self.loaded)}/{total} model tensors from {self.source} ({kind})."]
        if self.missing:
            parts.append(f"Missing, left at initialisation: {_preview(self.missing)}.")
        if self.shape_mismatch:
            items = [f"{n} (model {tuple(e)}, file {tuple(g)})" for n, e, g in self.shape_mismatch]
            parts.append(f"Shape mismatch, not loaded: {_preview(items)}.")
        if self.unexpected:
            parts.append(f"Ignored, not in the model: {_preview(self.unexpected)}.")
        return " ".join(parts)


def _preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def load_stage1_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load whatever matches from ``path`` into ``model`` and report the rest.

    Accepts an MXNet ``.params`` file (ImageNet ResNet38; recognised by suffix or header), a plain
    state dict ``.pth`` such as WSSS-Tissue's ``stage1_checkpoint_trained_on_luad.pth`` (``module.``
    prefixes allowed), or our checkpoint dict (its ``model`` entry). Every tensor's shape is
    checked; only matching ones load. BatchNorm ``num_batches_tracked`` counters are not reported
    as missing (older and MXNet files lack them). Raises WsssError when the file cannot be read or
    nothing matches.
    """
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"weights file not found: {path}")
    imagenet = _is_mxnet_file(path)
    state = mxnet_to_psa_names(read_mxnet_params(path)) if imagenet else _read_torch_state(path)
    report = _load_matching(model, state, LoadReport(source=str(path), imagenet=imagenet))
    if not report.loaded:
        raise WsssError(
            f"no tensor in {path} matches the stage-1 model "
            f"({len(report.unexpected)} unknown names, {len(report.shape_mismatch)} shape mismatches); "
            "is it the right file?"
        )
    return report


def _is_mxnet_file(path: Path) -> bool:
    """By suffix, or by the list magic so a renamed MXNet file is not fed to torch.load."""
    if path.suffix.lower() == ".params":
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise WsssError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    return head == struct.pack("<Q", LIST_MAGIC)


def _read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to parse a user-supplied file is a user error, not a bug
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WsssError(f"cannot read {path} as a PyTorch checkpoint: {first_line}") from exc
    if isinstance(obj, Mapping) and "stage" in obj and obj["stage"] != 1:
        raise WsssError(f"{path} is a stage-{obj['stage']} checkpoint; a stage-1 checkpoint is needed")
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise WsssError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    return {_strip_module(k): v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _strip_module(name: str) -> str:
    # DataParallel / DDP wrap every name in "module.".
    return name[len("module.") :] if name.startswith("module.") else name


def _load_matching(model: nn.Module, state: Mapping[str, torch.Tensor], report: LoadReport) -> LoadReport:
    expected = model.state_dict()
    matched = {}
    for name, tensor in state.items():
        if name not in expected:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            report.shape_mismatch.append((name, tuple(expected[name].shape), tuple(tensor.shape)))
        else:
            matched[name] = tensor
    if matched:
        model.load_state_dict(matched, strict=False)
    report.loaded = list(matched)
    mismatched = {n for n, _, _ in report.shape_mismatch}
    report.missing = [
        n
        for n in expected
        if n not in matched and n not in mismatched and not n.endswith("num_batches_tracked")
    ]
    return report
