"""One rank's shard of the expert pool on disk: the safetensors layout, hashed in blocks while written,
read back by byte range.

Layout (readable by `safetensors.safe_open`): 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte offsets (plus `__metadata__`, strings only), then the raw tensor bytes, row
major. A rank that re-slices the pool to another world size reads only the rows it needs from each shard
that overlaps its slice: rows are contiguous byte ranges, so it seeks and reads them straight into its own
tensors, with no second copy of the slice in memory and no pickle.

Checksums scale with what is read, not with the checkpoint: the writer hashes the bytes as they go out, in
blocks of BLOCK bytes (sha256 each), so no file is read again to hash it; a reader verifies exactly the
blocks its byte ranges touch and names the file and the bytes of a block that does not match.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from smat_dist.checkpoint.errors import ShardError

# the host staging buffer of a read into device memory (bounded whatever the slice size)
STAGE_BYTES = 64 << 20

BLOCK = 16 << 20            # bytes per checksum block: extra read per range <= 2 blocks
_WRITE = 8 << 20            # bytes per write call

_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPE = {v: k for k, v in _DTYPES.items()}


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class _HashingFile:
    """Writes bytes and hashes them in fixed blocks on the way out."""

    def __init__(self, path: Path, block: int):
        self.f = open(path, "wb")
        self.block, self.fill, self.size = block, 0, 0
        self.h = hashlib.sha256()
        self.blocks: list[str] = []

    def write(self, mv: memoryview) -> None:
        pos, n = 0, len(mv)
        while pos < n:
            take = min(self.block - self.fill, n - pos, _WRITE)
            piece = mv[pos:pos + take]
            self.h.update(piece)
            self.f.write(piece)
            self.fill += take
            pos += take
            if self.fill == self.block:
                self.blocks.append(self.h.hexdigest())
                self.h, self.fill = hashlib.sha256(), 0
        self.size += n

    def close(self) -> dict:
        if self.fill:
            self.blocks.append(self.h.hexdigest())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return digest_record(self.size, self.block, self.blocks)


def digest_record(size: int, block: int, blocks: list[str]) -> dict:
    """What the manifest keeps of a file: its size, block digests, and one digest over them."""
    return {"size": size, "block": block, "blocks": blocks,
            "sha256": hashlib.sha256("".join(blocks).encode()).hexdigest()}


def hash_file(path: Path, block: int = BLOCK) -> dict:
    """digest_record of an existing file (the small files other writers produce, e.g. DeepSpeed's)."""
    blocks, size = [], 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                break
            blocks.append(hashlib.sha256(data).hexdigest())
            size += len(data)
    return digest_record(size, block, blocks)


def header_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The JSON header of a shard of `tensors` (in the given order), padded to 8 bytes. It reads only dtypes
    and shapes (`meta` tensors will do), and every offset is a Python int: no 32-bit wrap at any size."""
    header: dict = {}
    off = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in a shard file")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def block_span(start: int, end: int, block: int) -> range:
    """Indices of the checksum blocks that bytes [start, end) touch (end > start)."""
    return range(start // block, (end - 1) // block + 1)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                block: int = BLOCK) -> dict:
    """Write tensors (in the given order) and string metadata; fsync; returns the file's digest record."""
    raw = header_bytes(tensors, metadata)
    out = _HashingFile(Path(path), block)
    out.write(memoryview(struct.pack("<Q", len(raw))))
    out.write(memoryview(raw))
    for t in tensors.values():
        if t.numel():
            out.write(_bytes_of(t))
    return out.close()


class ShardReader:
    """Reads rows of the tensors of one shard file, verifying the blocks it touches against `digest`.

    `hashed` counts the bytes this reader hashed (the checkpoint benchmark's verified-bytes figure)."""

    def __init__(self, path: Path, digest: dict | None):
        self.path, self.digest = Path(path), digest
        self.hashed = 0
        self._cache: tuple[int, bytes] | None = None    # the last verified block, reused by the next range
        try:
            self.f = open(self.path, "rb")
        except OSError as e:
            raise ShardError(f"cannot open shard {self.path}: {e}") from e
        self.size = os.fstat(self.f.fileno()).st_size
        if digest is not None and digest["size"] != self.size:
            raise ShardError(f"shard {self.path} has {self.size} bytes, the manifest recorded {digest['size']} "
                             "(truncated or overwritten)")
        head = bytearray(8)
        self._read_into(0, memoryview(head))
        (n,) = struct.unpack("<Q", bytes(head))
        if n > self.size - 8:
            raise ShardError(f"shard {self.path}: header length {n} exceeds the file ({self.size} bytes)")
        raw = bytearray(n)
        self._read_into(8, memoryview(raw))
        try:
            self.header = json.loads(bytes(raw))
        except json.JSONDecodeError as e:
            raise ShardError(f"shard {self.path}: unreadable header ({e})") from e
        self.base = 8 + n
        self.metadata: dict[str, str] = self.header.pop("__metadata__", {}) or {}

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def info(self, name: str) -> dict:
        if name not in self.header:
            raise ShardError(f"shard {self.path} has no tensor {name!r} (has {sorted(self.header)})")
        return self.header[name]

    def shape(self, name: str) -> list[int]:
        return list(self.info(name)["shape"])

    def read(self, name: str) -> torch.Tensor:
        """A whole (small) tensor."""
        meta = self.info(name)
        out = torch.empty(meta["shape"], dtype=TORCH_DTYPE[meta["dtype"]])
        self.read_rows_into(name, 0, out.shape[0] if out.dim() else 1, out)
        return out

    def read_rows_into(self, name: str, a: int, b: int, out: torch.Tensor) -> None:
        """Rows [a, b) of tensor `name` (along dim 0) into the contiguous tensor `out`."""
        meta = self.info(name)
        dtype = TORCH_DTYPE[meta["dtype"]]
        if out.dtype != dtype or not out.is_contiguous():
            raise ShardError(f"shard {self.path}: {name} is {dtype}, read into a {out.dtype} tensor")
        shape = meta["shape"]
        rows = shape[0] if shape else 1
        row_bytes = (meta["data_offsets"][1] - meta["data_offsets"][0]) // max(1, rows)
        if not 0 <= a <= b <= rows or out.numel() * out.element_size() != (b - a) * row_bytes:
            raise ShardError(f"shard {self.path}: rows [{a}, {b}) of {name} {shape} do not fit {list(out.shape)}")
        if a == b:
            return
        start = self.row_start(name, a)
        if out.device.type == "cpu":
            self._read_into(start, memoryview(out.view(-1).view(torch.uint8).numpy()))
        else:
            self._read_staged(start, out.view(-1).view(torch.uint8))

    def row_start(self, name: str, a: int) -> int:
        """The file offset of row `a` of tensor `name` (Python ints: no 32-bit wrap at any size)."""
        meta = self.info(name)
        rows = meta["shape"][0] if meta["shape"] else 1
        row_bytes = (meta["data_offsets"][1] - meta["data_offsets"][0]) // max(1, rows)
        return self.base + meta["data_offsets"][0] + a * row_bytes

    def _read_staged(self, start: int, flat: torch.Tensor) -> None:
        """Bytes from `start` into `flat` (uint8, any device) through a bounded host buffer (pinned for CUDA):
        a device tensor (the pool lives on the GPU before a resume) has no host memory to read into."""
        total = flat.numel()
        stage = torch.empty(min(total, STAGE_BYTES), dtype=torch.uint8, pin_memory=flat.device.type == "cuda")
        view = memoryview(stage.numpy())
        for off in range(0, total, stage.numel()):
            n = min(stage.numel(), total - off)
            self._read_into(start + off, view[:n])
            flat[off:off + n].copy_(stage[:n])     # synchronous: the stage is reused by the next chunk

    def _read_into(self, start: int, dest: memoryview) -> None:
        end = start + len(dest)
        if end > self.size:
            raise ShardError(f"shard {self.path} is truncated: bytes [{start}, {end}) past its end ({self.size})")
        if self.digest is None:
            self.f.seek(start)
            got = self.f.readinto(dest)
            if got != len(dest):
                raise ShardError(f"shard {self.path}: short read at byte {start}")
            return
        block = self.digest["block"]
        for k in block_span(start, end, block):
            data = self._block(k, block)
            lo, hi = max(start, k * block), min(end, (k + 1) * block)
            dest[lo - start:hi - start] = data[lo - k * block:hi - k * block]

    def _block(self, k: int, block: int) -> bytes:
        if self._cache is not None and self._cache[0] == k:
            return self._cache[1]
        self.f.seek(k * block)
        data = self.f.read(min(block, self.size - k * block))
        self.hashed += len(data)
        blocks = self.digest["blocks"]
        if k >= len(blocks) or hashlib.sha256(data).hexdigest() != blocks[k]:
            raise ShardError(f"checkpoint file {self.path} is corrupt: sha256 mismatch in bytes "
                             f"[{k * block}, {k * block + len(data)})")
        self._cache = (k, data)
        return data
