"""Fixed-length samples of one dataset, in a seeded order that is reshuffled every epoch.

Epoch ``e`` shuffles the documents, concatenates them (EOD tokens kept, so the model sees every
document boundary), cuts the stream into samples of ``seq_len + 1`` tokens that overlap by one
(sample ``s`` covers tokens ``[s*seq_len, (s+1)*seq_len]``), and shuffles the samples. The tail
shorter than a sample is dropped. Sample ``i`` of the never-ending stream is sample
``i % per_epoch`` of epoch ``i // per_epoch``, so any position is reachable without replay.
"""

import logging

import numpy as np

from hope_dist.data.token_file import TokenFile
from hope_dist.errors import DataError

logger = logging.getLogger("hope_dist.data")


class DatasetSamples:
    """docs: the document indices this stream draws from (None: all; a validation split removes its
    held-out documents here)."""

    def __init__(self, data: TokenFile, seq_len: int, seed: int, stream_id: int, docs: np.ndarray | None = None):
        self.data, self.seq_len, self.seed, self.stream_id = data, seq_len, seed, stream_id
        self.docs = np.arange(data.num_documents) if docs is None else docs
        num_tokens = int(data.doc_len[self.docs].sum())
        self.per_epoch = (num_tokens - 1) // seq_len
        if self.per_epoch < 1:
            raise DataError(f"{data.prefix} holds {num_tokens} training tokens, fewer than one sample "
                            f"of training.seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data")
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, self.stream_id, e])
            docs = self.docs[rng.permutation(len(self.docs))]
            ends = np.zeros(len(docs) + 1, dtype=np.int64)
            np.cumsum(self.data.doc_len[docs], out=ends[1:])
            order = rng.permutation(self.per_epoch)
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (docs, ends, order)
            if e > 0:
                logger.info("data: %s wrapped into epoch %d (documents and samples reshuffled)",
                            self.data.prefix, e)
        return self._epochs[e]

    def __getitem__(self, i: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of stream sample ``i`` as int64."""
        e, j = divmod(i, self.per_epoch)
        docs, ends, order = self._epoch(e)
        n = self.seq_len + 1
        pos = int(order[j]) * self.seq_len
        d = int(np.searchsorted(ends, pos, side="right")) - 1
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            doc = docs[d]
            offset = pos - int(ends[d])
            take = min(int(self.data.doc_len[doc]) - offset, n - filled)
            start = int(self.data.doc_start[doc]) + offset
            out[filled:filled + take] = self.data.tokens[start:start + take]
            filled += take
            pos += take
            d += 1
        return out
