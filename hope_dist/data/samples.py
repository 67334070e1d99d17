"""Fixed-length samples of one dataset, in a seeded order that is reshuffled every epoch.

Epoch ``e`` shuffles the documents, concatenates them (EOD tokens kept, so the model sees every
document boundary), cuts the stream into samples of ``seq_len + 1`` tokens that overlap by one
(sample ``s`` covers tokens ``[s*seq_len, (s+1)*seq_len]``), and shuffles the samples. The tail
shorter than a sample is dropped. Sample ``i`` of the never-ending stream is sample
``i % per_epoch`` of epoch ``i // per_epoch``, so any position is reachable without replay.

With ``lanes = G`` (training.carry_state) the samples are not shuffled: the epoch's stream is cut into G
lanes of equal length and sample ``j = s*G + b`` of the epoch is step s of lane b. With G = global_batch,
row b of consecutive global batches reads consecutive segments of the same documents; with G = k x
global_batch (data.lane_groups = k), global step s reads the lanes of group s % k, so consecutive steps
read different documents and each lane advances every k steps.
"""

import logging

import numpy as np

from hope_dist.data.token_file import TokenFile
from hope_dist.errors import DataError

logger = logging.getLogger("hope_dist.data")


class DatasetSamples:
    """docs: the document indices this stream draws from (None: all; a validation split removes its
    held-out documents here)."""

    def __init__(self, data: TokenFile, seq_len: int, seed: int, stream_id: int, docs: np.ndarray | None = None,
                 lanes: int = 0):
        self.data, self.seq_len, self.seed, self.stream_id = data, seq_len, seed, stream_id
        self.docs = np.arange(data.num_documents) if docs is None else docs
        self.lanes = lanes
        num_tokens = int(data.doc_len[self.docs].sum())
        self.per_epoch = (num_tokens - 1) // seq_len
        if lanes:  # whole lanes only; a lane holds per_epoch // lanes consecutive samples
            self.per_epoch -= self.per_epoch % lanes
        if self.per_epoch < 1:
            need = f"{lanes} samples (a lane per row of training.global_batch)" if lanes else "one sample"
            raise DataError(f"{data.prefix} holds {num_tokens} training tokens, fewer than {need} "
                            f"of training.seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data")
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, self.stream_id, e])
            docs = self.docs[rng.permutation(len(self.docs))]
            ends = np.zeros(len(docs) + 1, dtype=np.int64)
            np.cumsum(self.data.doc_len[docs], out=ends[1:])
            order = self._lane_order() if self.lanes else rng.permutation(self.per_epoch)
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (docs, ends, order)
            if e > 0:
                logger.info("data: %s wrapped into epoch %d (documents and samples reshuffled)",
                            self.data.prefix, e)
        return self._epochs[e]

    def _lane_order(self) -> np.ndarray:
        """Sample j = s*G + b of an epoch is stream sample b*L + s (lane b, step s; L samples a lane)."""
        j = np.arange(self.per_epoch)
        return (j % self.lanes) * (self.per_epoch // self.lanes) + j // self.lanes

    def previous_token(self, i: int) -> int:
        """With lanes: the token before sample ``i`` in its lane (the last input the same row saw a step
        earlier), or -1 where the lane starts (the first step of an epoch)."""
        e, j = divmod(i, self.per_epoch)
        if j < self.lanes:
            return -1
        return int(self._read(e, int(self._epoch(e)[2][j]) * self.seq_len - 1, 1)[0])

    def __getitem__(self, i: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of stream sample ``i`` as int64."""
        e, j = divmod(i, self.per_epoch)
        return self._read(e, int(self._epoch(e)[2][j]) * self.seq_len, self.seq_len + 1)

    def _read(self, e: int, pos: int, n: int) -> np.ndarray:
        """Tokens [pos, pos + n) of epoch e's concatenated documents."""
        docs, ends, _ = self._epoch(e)
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
