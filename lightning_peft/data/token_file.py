"""The cache file of one tokenized data source: safetensors, written chunk by chunk, opened memory-mapped.

The file is a plain safetensors file (any safetensors reader opens it) with the arrays of `TokenizedData` laid out
back to back: `input_ids` first, then `loss_bits` and the small per-example index (`offsets`, `record_index`,
`truncated`, `dropped`). The writer streams the token ids straight to their place after a header area reserved up
front, so memory stays bounded whatever the size of the data; the header is written last, padded with spaces (the
format allows it). The reader maps `input_ids` and `loss_bits` with `np.memmap`, so a warm start reads only the
header and the index, and the pages of the token ids are read when a batch needs them.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lightning_peft.data.tokenized import TokenizedData

# Room for the 8-byte length and the JSON header; the data then starts 4 KiB in, aligned for every dtype.
_DATA_START = 4096
_INDEX = ("offsets", "record_index", "truncated", "dropped")
_DTYPES = {"U8": np.uint8, "U16": np.uint16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write(path: Path, parts: Iterable[TokenizedData], metadata: dict[str, str]) -> None:
    """Write the concatenation of `parts` (in order; their record numbers already the whole source's) to `path`.

    Only the per-example index (about 17 bytes an example) and one part at a time are held in memory.
    """
    # The loss bits go to a spool file beside the target and are appended after the token ids.
    with path.open("wb") as out, tempfile.TemporaryFile(dir=path.parent) as bits:
        writer = _Writer(out, bits)
        for part in parts:
            writer.add(part)
        writer.finish(metadata)


def read(path: Path) -> tuple[TokenizedData, dict[str, str]]:
    """The data in `path` (token ids and loss bits memory-mapped, read-only) and the file's metadata.

    Raises:
        ValueError: the file is not a complete cache file (truncated, or arrays that do not fit together).
    """
    header = _header(path)
    metadata = header.pop("__metadata__", {})
    end = max((spec["data_offsets"][1] for spec in header.values()), default=0)
    if path.stat().st_size != _DATA_START + end:
        raise ValueError(f"the file holds {path.stat().st_size} bytes, the header describes {_DATA_START + end}")
    mapped = {name: _array(path, spec, memory_map=name in ("input_ids", "loss_bits")) for name, spec in header.items()}
    mapped["truncated"] = mapped["truncated"].astype(bool)
    data = TokenizedData(**mapped, n_records=int(metadata["n_records"]), format=metadata["format"])
    _check(data)
    return data, metadata


class _Writer:
    def __init__(self, out: BinaryIO, bits: BinaryIO):
        self.out, self.bits = out, bits
        self.out.seek(_DATA_START)
        self.pending = np.zeros(0, bool)  # mask bits that do not fill a byte yet
        self.n_tokens, self.n_records, self.dtype, self.format = 0, 0, None, ""
        self.index: dict[str, list[np.ndarray]] = {name: [] for name in _INDEX}

    def add(self, part: TokenizedData) -> None:
        ids = np.asarray(part.input_ids)
        if self.dtype is None:  # the first part decides (every part comes from the same tokenizer)
            self.dtype, self.format = ids.dtype, part.format
        self.out.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        mask = np.concatenate([self.pending, part.loss_mask()])
        whole = len(mask) // 8 * 8
        self.bits.write(np.packbits(mask[:whole]).tobytes())
        self.pending = mask[whole:]
        self.index["offsets"].append(np.asarray(part.offsets[1:]) + self.n_tokens)
        self.index["record_index"].append(np.asarray(part.record_index))
        self.index["truncated"].append(np.asarray(part.truncated, dtype=np.uint8))
        self.index["dropped"].append(np.asarray(part.dropped))
        self.n_tokens += len(ids)
        self.n_records += part.n_records

    def finish(self, metadata: dict[str, str]) -> None:
        self.dtype = self.dtype or np.dtype(np.int32)
        self.bits.write(np.packbits(self.pending).tobytes())
        self.bits.seek(0)
        shutil.copyfileobj(self.bits, self.out, 1 << 24)
        arrays = {name: np.concatenate(parts or [np.zeros(0, np.int64)]) for name, parts in self.index.items()}
        arrays["offsets"] = np.concatenate([[0], arrays["offsets"]]).astype(np.int64)
        arrays["record_index"] = arrays["record_index"].astype(np.int64)
        arrays["truncated"] = arrays["truncated"].astype(np.uint8)
        arrays["dropped"] = arrays["dropped"].astype(np.int64)
        sizes = {"input_ids": (self.n_tokens, self.dtype), "loss_bits": ((self.n_tokens + 7) // 8, np.dtype(np.uint8))}
        sizes |= {name: (len(array), array.dtype) for name, array in arrays.items()}
        for name in _INDEX:
            self.out.write(arrays[name].tobytes())
        metadata = {**metadata, "n_records": str(self.n_records), "format": self.format}
        self.out.seek(0)
        self.out.write(_header_bytes(sizes, metadata))


def _header_bytes(sizes: dict[str, tuple[int, np.dtype]], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    position = 0
    for name, (count, dtype) in sizes.items():
        size = count * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": [count], "data_offsets": [position, position + size]}
        position += size
    text = json.dumps(header).encode()
    if len(text) > _DATA_START - 8:
        raise ValueError("the cache header does not fit its reserved space")
    return struct.pack("<Q", _DATA_START - 8) + text.ljust(_DATA_START - 8, b" ")


def _header(path: Path) -> dict:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length != _DATA_START - 8:
            raise ValueError(f"unexpected header length {length}")
        return json.loads(handle.read(length))


def _array(path: Path, spec: dict, memory_map: bool) -> np.ndarray:
    dtype = np.dtype(_DTYPES[spec["dtype"]])
    start, end = spec["data_offsets"]
    count = (end - start) // dtype.itemsize
    if count == 0:
        return np.zeros(0, dtype)
    array = np.memmap(path, dtype=dtype, mode="r", offset=_DATA_START + start, shape=(count,))
    return array if memory_map else np.array(array)


def _check(data: TokenizedData) -> None:
    n = len(data.record_index)
    if not (len(data.offsets) == n + 1 == len(data.truncated) + 1 and data.offsets[-1] == len(data.input_ids)) or (
        data.offsets[0] != 0
    ):
        raise ValueError("the index does not match the token ids")
    if len(data.loss_bits) != (len(data.input_ids) + 7) // 8:
        raise ValueError("the loss mask does not match the token ids")
