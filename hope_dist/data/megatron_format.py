"""Megatron's indexed-dataset format (``PREFIX.bin`` + ``PREFIX.idx``), written and validated here.

The layout matches ``megatron.core.datasets.indexed_dataset`` (0.16.x) so its ``IndexedDataset``
reads our files unchanged: the ``.bin`` holds every token back to back; the ``.idx`` holds a
34-byte header, int32 sequence lengths, int64 byte pointers and int64 document indices.
One document is one sequence here, EOD included.
"""

import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np

from hope_dist.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class FormatError(DataError):
    """A .bin/.idx pair that is missing, truncated or corrupt."""


def megatron_indexed_dataset():
    """megatron-core's own ``indexed_dataset`` module, the independent reader/writer the tests and
    benchmarks compare against (the ``megatron`` extra; hope_dist itself never imports it). Imported
    without the warnings megatron-core gives on import, which nobody here can act on: that the
    optional Apex / Transformer Engine kernels are not installed, and a deprecation of its own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", message="The following imports from `dynamic_context.py`")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's rule: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def write_header(f, dtype: np.dtype, n_seq: int, n_doc_entries: int) -> None:
    f.write(INDEX_MAGIC)
    f.write(struct.pack("<Q", 1))
    f.write(struct.pack("<B", CODE_OF_DTYPE[np.dtype(dtype)]))
    f.write(struct.pack("<Q", n_seq))
    f.write(struct.pack("<Q", n_doc_entries))


def write_index(path: str, dtype: np.dtype, lengths: np.ndarray) -> None:
    """Index for one-sequence-per-document data with the given token counts."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        write_header(f, dtype, len(lengths), len(lengths) + 1)
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())


@dataclass
class Index:
    """A validated ``.idx``: memory-mapped arrays, nothing copied."""
    dtype: np.dtype
    lengths: np.ndarray       # int32, per sequence
    pointers: np.ndarray      # int64 byte offsets into .bin
    doc_indices: np.ndarray   # int64, sequence index where each document starts (+ final end)

    @property
    def num_tokens(self) -> int:
        if len(self.lengths) == 0:
            return 0
        return int(self.pointers[-1]) // self.dtype.itemsize + int(self.lengths[-1])


def read_index(prefix: str, check_bin: bool = True) -> Index:
    """Open ``PREFIX.idx`` and check it (and the ``.bin`` size) against the format."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    fix = f"re-run data_prep.tokenize with --output-prefix {prefix}"
    for p in (idx_path, bin_path) if check_bin else (idx_path,):
        if not os.path.isfile(p):
            raise FormatError(f"{p} does not exist: {fix}")
    size = os.path.getsize(idx_path)
    if size < HEADER_BYTES:
        raise FormatError(f"corrupt {idx_path}: {size} bytes is shorter than the header; {fix}")
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:9] != INDEX_MAGIC or struct.unpack("<Q", head[9:17])[0] != 1:
        raise FormatError(f"corrupt {idx_path}: not a Megatron MMIDIDX v1 index; {fix}")
    code = head[17]
    if code not in DTYPE_CODES:
        raise FormatError(f"corrupt {idx_path}: unknown dtype code {code}; {fix}")
    dtype = np.dtype(DTYPE_CODES[code])
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    expected = HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if size not in (expected, expected + n_seq):  # + n_seq: optional int8 modes (multimodal)
        raise FormatError(f"corrupt {idx_path}: {size} bytes, expected {expected} for {n_seq} "
                          f"sequences and {n_doc} document entries; {fix}")
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = mm[HEADER_BYTES:HEADER_BYTES + 4 * n_seq].view(np.int32)
    pointers = mm[HEADER_BYTES + 4 * n_seq:HEADER_BYTES + 12 * n_seq].view(np.int64)
    doc_indices = mm[HEADER_BYTES + 12 * n_seq:expected].view(np.int64)
    index = Index(dtype, lengths, pointers, doc_indices)
    _check_consistent(index, idx_path, fix)
    if check_bin:
        want = index.num_tokens * dtype.itemsize
        have = os.path.getsize(bin_path)
        if have != want:
            kind = "truncated" if have < want else "oversized"
            raise FormatError(f"{kind} {bin_path}: {have} bytes, the index says {want}; {fix}")
    return index


def _check_consistent(index: Index, idx_path: str, fix: str) -> None:
    n = len(index.lengths)
    d = index.doc_indices
    if len(d) == 0 or d[0] != 0 or d[-1] != n or np.any(np.diff(d) < 0):
        raise FormatError(f"corrupt {idx_path}: document indices do not cover 0..{n}; {fix}")
    if n and (np.any(index.lengths < 0) or index.pointers[0] != 0 or np.any(
            np.diff(index.pointers) != index.lengths[:-1].astype(np.int64) * index.dtype.itemsize)):
        raise FormatError(f"corrupt {idx_path}: sequence pointers disagree with lengths; {fix}")
