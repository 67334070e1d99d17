"""One progress bar for the tokenizer: input bytes with ETA, plus documents/s and tokens/s."""

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total_bytes: int, desc: str):
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                        mininterval=0.5 if tty else 15.0, dynamic_ncols=True, smoothing=0.1)
        self.start = time.perf_counter()
        self.docs = self.tokens = 0

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s",
                                 refresh=False)
        self.bar.update(nbytes)

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.start
