"""One Megatron ``PREFIX.bin/.idx`` pair, validated and memory-mapped, seen as documents."""

import json
import os

import numpy as np

from hope_dist.data.megatron_format import FormatError, read_index


def normalize_prefix(path: str | os.PathLike) -> str:
    """Accept ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``."""
    path = os.fspath(path)
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix) and not os.path.exists(path + ".idx"):
            return path[: -len(suffix)]
    return path


class TokenFile:
    """Token ids of one dataset with each document's span (a document may hold several
    Megatron sequences; they are contiguous in the ``.bin``)."""

    def __init__(self, path: str):
        self.prefix = normalize_prefix(path)
        index = read_index(self.prefix)
        self.num_tokens = index.num_tokens
        if self.num_tokens == 0 or len(index.doc_indices) < 2:
            raise FormatError(f"{self.prefix}.idx holds no documents; tokenize a non-empty corpus "
                              f"with python -m data_prep.tokenize --output-prefix {self.prefix}")
        starts = np.append(index.pointers // index.dtype.itemsize, np.int64(self.num_tokens))
        self.doc_start = starts[index.doc_indices[:-1]]
        self.doc_len = starts[index.doc_indices[1:]] - self.doc_start
        self.tokens = np.memmap(self.prefix + ".bin", dtype=index.dtype, mode="r")

    @property
    def num_documents(self) -> int:
        return len(self.doc_start)

    def max_token_id(self) -> int:
        return int(self.tokens.max())

    def tokenized_with(self) -> dict | None:
        """What data_prep.tokenize recorded in PREFIX.done (tokenizer, vocab_size, eod_id), if anything."""
        try:
            with open(self.prefix + ".done") as f:
                made = json.load(f)
        except (OSError, ValueError):
            return None
        return made if isinstance(made, dict) else None
