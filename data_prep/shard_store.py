"""Per-shard outputs, their completion markers, and the streaming merge into ``PREFIX.bin/.idx``.

A shard is finished only when its ``.done`` marker exists, names the current plan, and the
``.bin``/``.idx`` beside it validate with the sizes the marker records. Every file is written
under a temporary name, fsynced and renamed, and the marker goes last, so a crash at any point
leaves either a finished shard or one that is redone.
"""

import json
import os
import shutil
import struct

import numpy as np

from hope_dist.data.megatron_format import FormatError, read_index, write_header, write_index


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_rename(tmp: str, path: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardStore:
    """The ``PREFIX.shards/`` folder: plan, shard outputs and markers."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.dir = prefix + ".shards"

    def shard_prefix(self, i: int) -> str:
        return os.path.join(self.dir, f"{i:06d}")

    def marker(self, i: int) -> str:
        return self.shard_prefix(i) + ".done"

    def read_marker(self, i: int, plan_id: str) -> dict | None:
        """The shard's marker if the shard is finished under this plan, else None."""
        try:
            with open(self.marker(i)) as f:
                m = json.load(f)
        except (OSError, ValueError):
            return None
        if m.get("plan_id") != plan_id:
            return None
        try:
            index = read_index(self.shard_prefix(i))
        except FormatError:
            return None
        if len(index.lengths) != m["documents"] or index.num_tokens != m["tokens"]:
            return None
        return m

    def writer(self, i: int, dtype: np.dtype) -> "ShardWriter":
        os.makedirs(self.dir, exist_ok=True)
        return ShardWriter(self.shard_prefix(i), self.marker(i), dtype)


class ShardWriter:
    """Streams one shard's tokens to a temporary ``.bin``; ``finish`` publishes it."""

    def __init__(self, prefix: str, marker: str, dtype: np.dtype):
        self.prefix, self.marker_path, self.dtype = prefix, marker, np.dtype(dtype)
        self.tmp = f".tmp{os.getpid()}"
        if os.path.exists(marker):
            os.remove(marker)  # a stale marker must never vouch for the files we rewrite
        self.bin = open(prefix + ".bin" + self.tmp, "wb")
        self.lengths: list[int] = []

    def add_documents(self, docs: list[list[int]], eod_id: int) -> int:
        """Append documents (EOD added to each); returns tokens written."""
        flat: list[int] = []
        for ids in docs:
            flat.extend(ids)
            flat.append(eod_id)
            self.lengths.append(len(ids) + 1)
        self.bin.write(np.array(flat, dtype=self.dtype).tobytes())
        return len(flat)

    def finish(self, marker: dict) -> None:
        self.bin.close()
        write_index(self.prefix + ".idx" + self.tmp, self.dtype, np.array(self.lengths, np.int64))
        _fsync_rename(self.prefix + ".bin" + self.tmp, self.prefix + ".bin")
        _fsync_rename(self.prefix + ".idx" + self.tmp, self.prefix + ".idx")
        atomic_write_bytes(self.marker_path, json.dumps(marker, sort_keys=True).encode())

    def abort(self) -> None:
        self.bin.close()
        for p in (self.prefix + ".bin" + self.tmp, self.prefix + ".idx" + self.tmp):
            if os.path.exists(p):
                os.remove(p)


def merge_shards(shard_prefixes: list[str], out_prefix: str) -> tuple[int, int]:
    """Concatenate shards in order into ``out_prefix``; holds one shard's index at a time.

    Returns (documents, tokens).
    """
    indices = [read_index(p) for p in shard_prefixes]  # memory maps, not loaded
    dtypes = {ix.dtype for ix in indices}
    if len(dtypes) != 1:
        raise FormatError(f"shards under {out_prefix}.shards mix token dtypes {dtypes}")
    dtype = dtypes.pop()
    n_seq = sum(len(ix.lengths) for ix in indices)
    tmp = f".tmp{os.getpid()}"
    with open(out_prefix + ".idx" + tmp, "wb") as f:
        write_header(f, dtype, n_seq, n_seq + 1)
        for ix in indices:
            f.write(np.ascontiguousarray(ix.lengths).tobytes())
        byte_base = 0
        for ix in indices:
            f.write((ix.pointers + np.int64(byte_base)).tobytes())
            byte_base += ix.num_tokens * dtype.itemsize
        f.write(struct.pack("<q", 0))
        seq_base = 0
        for ix in indices:
            f.write((ix.doc_indices[1:] + np.int64(seq_base)).tobytes())
            seq_base += len(ix.lengths)
    with open(out_prefix + ".bin" + tmp, "wb") as out:
        for p in shard_prefixes:
            with open(p + ".bin", "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    _fsync_rename(out_prefix + ".bin" + tmp, out_prefix + ".bin")
    _fsync_rename(out_prefix + ".idx" + tmp, out_prefix + ".idx")
    return n_seq, byte_base // dtype.itemsize
