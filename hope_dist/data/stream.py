"""The trainer's batches: a never-ending, seeded, blended stream of packed samples.

The global stream is fixed by the datasets, weights, ``seq_len`` and ``seed`` alone. Global step
``s`` takes samples ``[s*gb, (s+1)*gb)`` of it and data-parallel rank ``r`` the contiguous slice
``[r*gb/dp, (r+1)*gb/dp)``, so ranks see disjoint samples whose union is the dp=1 batch, and the
only resume state is the number of global samples consumed, whatever the dp size was.

With ``lanes`` (training.carry_state) the dataset is read in ``lane_groups`` groups of ``global_batch``
lanes (samples.py): row b of global step s is lane b of group s % lane_groups. Each batch also carries
``prev``, the token before each row in its lane (-1 at a lane's start), from which the trainer decides
whether a row continues the state it carried, and ``group``, the group whose state it continues.
"""

import logging
import os

import numpy as np
import torch

from hope_dist.data.blend import BlendSchedule
from hope_dist.data.samples import DatasetSamples
from hope_dist.data.token_file import TokenFile
from hope_dist.data.tokenizer_info import EOD_TOKEN, tokenizer_info
from hope_dist.data.validation import split_documents
from hope_dist.errors import DataError

logger = logging.getLogger("hope_dist.data")


class TrainStream:
    """This rank's share of each global batch; ``consumed_samples`` counts global samples."""

    def __init__(self, datasets: list[DatasetSamples], weights: list[float], *, seq_len: int,
                 global_batch: int, dp_rank: int, dp_size: int, seed: int, eod_id: int,
                 vocab_size: int, vocab_source: str = "the data"):
        self.datasets, self.weights = datasets, weights
        self.vocab_source = vocab_source  # where vocab_size comes from, for the out-of-vocabulary error
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.eod_id, self.vocab_size = eod_id, vocab_size
        self.consumed_samples = 0
        self.lanes = datasets[0].lanes
        self.schedule = BlendSchedule(weights, seed, [d.data.prefix for d in datasets]) \
            if len(datasets) > 1 else None

    def sample(self, j: int) -> np.ndarray:
        """Global sample ``j``: ``seq_len + 1`` tokens."""
        if self.schedule is None:
            return self.datasets[0][j]
        k, i = self.schedule.locate(j)
        return self.datasets[k][i]

    def next_batch(self) -> dict[str, torch.Tensor]:
        local = self.global_batch // self.dp_size
        first = self.consumed_samples + self.dp_rank * local
        rows = np.stack([self.sample(j) for j in range(first, first + local)])
        if rows.max() >= self.vocab_size:
            self._out_of_vocabulary(first, rows)
        batch = torch.from_numpy(rows)
        self.consumed_samples += self.global_batch
        out = {"tokens": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}
        if self.lanes:
            out["prev"] = torch.tensor([self.datasets[0].previous_token(j) for j in range(first, first + local)])
            out["group"] = first // self.global_batch % (self.lanes // self.global_batch)
        return out

    def _out_of_vocabulary(self, first: int, rows: np.ndarray) -> None:
        """An id past the vocabulary would fail as an index error deep inside the embedding (or
        silently train on the wrong tokens): name the file and the tokenizer instead."""
        r = int(np.argmax(rows.max(axis=1) >= self.vocab_size))
        k = 0 if self.schedule is None else self.schedule.locate(first + r)[0]
        raise DataError(f"{self.datasets[k].data.prefix}.bin holds token id {int(rows[r].max())}, outside the "
                        f"vocabulary of {self.vocab_source} ({self.vocab_size} ids): the data was tokenized with "
                        f"another tokenizer; set data.tokenizer to that one or re-tokenize the data "
                        f"(python -m data_prep.tokenize)")

    def _identity(self) -> dict:
        return {"paths": [d.data.prefix for d in self.datasets], "weights": list(self.weights),
                "seq_len": self.seq_len, "seed": self.seed, "lanes": self.lanes}

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, **self._identity()}

    def load_state_dict(self, d: dict) -> None:
        changed = {k: (d[k], v) for k, v in self._identity().items() if k in d and d[k] != v}
        if changed:
            logger.warning("data: resuming with changed %s (saved, now); the sample order is "
                           "not a continuation of the saved run", changed)
        self.consumed_samples = int(d["consumed_samples"])


def build_train_stream(paths: list[str], weights: list[float] | None, *, seq_len: int,
                       global_batch: int, dp_rank: int, dp_size: int, seed: int,
                       eod_id: int | None = None, tokenizer: str | None = None,
                       valid_fraction: float = 0.0, lanes: bool = False, lane_groups: int = 1) -> TrainStream:
    """Open the datasets and check every argument; errors say which one and how to fix it. lanes: read
    in lane_groups groups of one lane per row of the global batch (training.carry_state)."""
    if isinstance(paths, (str, os.PathLike)) or not paths:
        raise DataError(f"data.paths must be a non-empty list of dataset prefixes (PREFIX of PREFIX.bin/.idx), "
                        f"got {paths!r}")
    if weights is not None:
        if len(weights) != len(paths):
            raise DataError(f"{len(weights)} data weights for {len(paths)} data paths {paths}; "
                            "give one weight per path (or none)")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"data.weights {weights} must be >= 0 with a positive sum")
    if seq_len < 1 or global_batch < 1:
        raise DataError(f"seq_len ({seq_len}) and global_batch ({global_batch}) must be positive")
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
    if global_batch % dp_size:
        raise DataError(f"global_batch {global_batch} is not divisible by the data-parallel size "
                        f"{dp_size}; choose a global batch that is a multiple of {dp_size}")
    if lanes and len(paths) > 1:
        raise DataError(f"data in lanes (data.order=lanes or training.carry_state=true) reads one dataset, but "
                        f"data.paths holds {len(paths)}: a blend would switch a row between datasets mid-document; "
                        f"tokenize them into one dataset, or use data.order=shuffled and training.carry_state=false")
    if lane_groups < 1:
        raise DataError(f"lane_groups={lane_groups} must be >= 1 (data.lane_groups)")
    files = [TokenFile(p) for p in paths]
    n_lanes = global_batch * lane_groups if lanes else 0
    if weights is None:  # plain concatenation: each dataset in proportion to its size
        weights = [float(f.num_tokens) for f in files]
    if valid_fraction > 0:  # the held-out documents (data/validation.py) never enter training
        datasets = [DatasetSamples(f, seq_len, seed, k, split_documents(f.num_documents, valid_fraction)[0],
                                   lanes=n_lanes) for k, f in enumerate(files)]
    else:
        datasets = [DatasetSamples(f, seq_len, seed, k, lanes=n_lanes) for k, f in enumerate(files)]

    vocab_size, tok_eod = tokenizer_info(tokenizer) if tokenizer else (None, None)
    if vocab_size is None:
        vocab_size = max(f.max_token_id() for f in files) + 1
    else:
        for f in files:
            check_tokenized_with(f, tokenizer, vocab_size, tok_eod)
    if eod_id is None:
        eod_id = tok_eod
    if eod_id is None:
        raise DataError(f"no end-of-document id: set data.eod_id or data.tokenizer to a tokenizer that defines "
                        f"{EOD_TOKEN!r} (got tokenizer={tokenizer!r})")
    if not 0 <= eod_id < vocab_size:
        raise DataError(f"data.eod_id={eod_id} is outside the vocabulary [0, {vocab_size}) of "
                        f"{f'data.tokenizer={tokenizer}' if tokenizer else 'the data'}")
    total = sum(weights)
    for d, w in zip(datasets, weights):
        logger.info("data: %s: %d documents, %d tokens, %d samples of %d tokens per epoch, "
                    "weight %.3f", d.data.prefix, d.data.num_documents, d.data.num_tokens,
                    d.per_epoch, seq_len + 1, w / total)
    return TrainStream(datasets, weights, seq_len=seq_len, global_batch=global_batch,
                       dp_rank=dp_rank, dp_size=dp_size, seed=seed, eod_id=eod_id,
                       vocab_size=vocab_size, vocab_source=f"data.tokenizer={tokenizer}" if tokenizer else "the data")


def check_tokenized_with(data: TokenFile, tokenizer: str, vocab_size: int, eod_id: int | None) -> None:
    """Data made by data_prep.tokenize records its tokenizer's vocabulary and EOD in PREFIX.done:
    a different tokenizer fails here, before any step (ids past it fail later, in next_batch)."""
    made = data.tokenized_with()
    if made is None or (made.get("vocab_size") == vocab_size and eod_id in (None, made.get("eod_id"))):
        return
    raise DataError(f"{data.prefix}.bin was tokenized with {made.get('tokenizer')} ({made.get('vocab_size')} ids, "
                    f"EOD id {made.get('eod_id')}; see {data.prefix}.done), but data.tokenizer={tokenizer} has "
                    f"{vocab_size} ids, EOD id {eod_id}: set data.tokenizer to the tokenizer the data was made "
                    f"with, or re-tokenize the data with this one")
