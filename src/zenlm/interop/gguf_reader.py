"""A fast, read-only GGUF parser: metadata with ``struct``, tensors as views of one memory map.

``gguf.GGUFReader`` builds a numpy object for every part of every field, so a vocabulary of tens
of thousands of tokens makes opening a file most of zenlm's cold start. This parser reads the
same header in a single pass into plain Python values and hands out tensors as zero-copy
``uint8`` views of the mapped file,
shaped (rows, bytes per row), the input ``gguf.quants.dequantize`` takes. It offers the small
surface the converters use: ``fields[key].contents()`` and ``tensors`` with ``name``,
``shape`` (GGML order), ``tensor_type`` and ``data``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from zenlm.errors import InteropError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


@dataclass
class Field:
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGML order: fastest-varying dimension first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # uint8 view, (rows, bytes per row)


class FastGGUF:
    def __init__(self, path: str | os.PathLike):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = str(path)
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise InteropError(f"cannot read GGUF file {path}: {exc}") from None
        self._buf = memoryview(self._mm)
        self._pos = 0
        try:
            if bytes(self._buf[:4]) != b"GGUF":
                raise InteropError(f"cannot read GGUF file {path}: it does not start with the GGUF magic")
            self._pos = 4
            version = self._scalar(4)
            if version not in (2, 3):
                raise InteropError(f"cannot read GGUF file {path}: version {version} is not supported (2 or 3 are)")
            n_tensors, n_kv = self._scalar(10), self._scalar(10)
            self.fields = {}
            for _ in range(n_kv):
                key = self._string()
                self.fields[key] = Field(self._value(self._scalar(4)))
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                dims = tuple(self._scalar(10) for _ in range(self._scalar(4)))
                infos.append((name, dims, self._scalar(4), self._scalar(10)))
        except (struct.error, IndexError, UnicodeDecodeError):
            raise InteropError(f"cannot read GGUF file {path}: it is truncated or corrupt (its header does not parse)") from None
        align = int(self.fields.get("general.alignment", Field(32)).value)
        start = (self._pos + align - 1) // align * align
        self.tensors = []
        for name, dims, kind, offset in infos:
            try:
                qtype = GGMLQuantizationType(kind)
                block, size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise InteropError(f"GGUF tensor {name} has unknown type {kind}") from None
            row = dims[0] // block * size
            rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
            begin = start + offset
            if begin + row * rows > len(self._mm):
                raise InteropError(f"cannot read GGUF file {path}: it is truncated (tensor {name} runs past its end)")
            data = self._mm[begin:begin + row * rows].reshape(rows, row)
            self.tensors.append(TensorInfo(name, dims, qtype, data))

    # -- header primitives --------------------------------------------------------------------
    def _scalar(self, kind: int):
        fmt = _SCALARS[kind]
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._scalar(10)
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8")
        self._pos += n
        return s

    def _value(self, kind: int):
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            item, count = self._scalar(4), self._scalar(10)
            if item == STRING:
                return [self._string() for _ in range(count)]
            if item == ARRAY:
                return [self._value(ARRAY) for _ in range(count)]
            dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
            arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
            self._pos += arr.nbytes
            return arr.tolist()
        if kind not in _SCALARS:
            raise InteropError(f"GGUF metadata value of unknown type {kind}")
        return self._scalar(kind)
