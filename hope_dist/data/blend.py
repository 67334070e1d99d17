"""Which dataset each global sample comes from, for weighted blends, seekable in O(block).

Samples are dealt in blocks of ``BLOCK``: each block holds exactly ``counts[k]`` samples of
dataset ``k`` (``weights * BLOCK`` rounded by largest remainder), in an order shuffled per block
from the seed. So dataset ``k``'s share of any run of whole blocks is ``counts[k] / BLOCK``,
less than ``1 / BLOCK`` from its weight, and the ``i``-th sample a dataset yields is known
without replaying the past: block ``b`` starts at index ``b * counts[k]`` of every dataset.
"""

import numpy as np

from hope_dist.errors import DataError

BLOCK = 4096


def block_counts(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    exact = w * BLOCK
    counts = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: BLOCK - counts.sum()]] += 1
    return counts


class BlendSchedule:
    def __init__(self, weights: list[float], seed: int, names: list[str]):
        self.counts = block_counts(weights)
        starved = [n for n, w, c in zip(names, weights, self.counts) if w > 0 and c == 0]
        if starved:
            raise DataError(f"data.weights of {starved} round to 0 of {BLOCK} samples per block "
                            "and would never be sampled; raise them or drop those datasets")
        self.seed = seed
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != b:
            rng = np.random.default_rng([self.seed, 0xB1E7D, b])
            which = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))
            rank = np.empty(BLOCK, dtype=np.int64)
            for k in range(len(self.counts)):
                mine = which == k
                rank[mine] = np.arange(int(mine.sum())) + b * self.counts[k]
            self._cached = (b, which, rank)
        return self._cached[1], self._cached[2]

    def locate(self, j: int) -> tuple[int, int]:
        """(dataset, index within that dataset's stream) of global sample ``j``."""
        b, o = divmod(j, BLOCK)
        which, rank = self._block(b)
        return int(which[o]), int(rank[o])
