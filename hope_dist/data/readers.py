"""Input discovery, the shard plan, and reading documents out of one shard.

Inputs are files or folders of ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, ``.parquet``, ``.txt``
(one file = one document), Hugging Face ``datasets`` folders saved with ``save_to_disk``, or the
``.arrow`` files such folders (and the datasets cache) hold.
The plan cuts them into *pieces* (a byte range of a ``.jsonl``, a whole compressed file or
``.txt``, a parquet row group, a row range of a dataset) and groups consecutive pieces into
shards of about ``shard_bytes``. The plan depends on the inputs and the shard size only, never on
the number of workers, so any worker count writes the same shards.
"""

import gzip
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from hope_dist.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
SUFFIXES = JSONL_SUFFIXES + (".parquet", ".txt", ".arrow")


class InputError(UserError, ValueError):
    """Bad input: names the file (and line) and what to do about it."""

    label = "input error"


@dataclass(frozen=True)
class Piece:
    path: str
    kind: str     # jsonl | jsonl.gz | jsonl.zst | parquet | txt | arrow | hf
    start: int    # byte offset (jsonl), row group (parquet) or row (hf); 0 otherwise
    stop: int     # exclusive, same unit
    size: int     # estimated bytes on disk, the unit of progress


def _kind(path: str) -> str | None:
    for suffix in (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet", ".txt", ".arrow"):
        if path.endswith(suffix):
            return suffix[1:]
    return None


def _is_hf_dataset(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f))
               for f in ("state.json", "dataset_dict.json"))


def discover(inputs: list[str]) -> list[tuple[str, str]]:
    """(path, kind) for every input file or dataset folder, in a deterministic order."""
    found: list[tuple[str, str]] = []
    for item in inputs:
        if not os.path.exists(item):
            raise InputError(f"input {item} does not exist")
        if os.path.isdir(item):
            if _is_hf_dataset(item):
                found.append((item, "hf"))
                continue
            for root, dirs, files in os.walk(item):
                dirs.sort()
                if _is_hf_dataset(root):
                    found.append((root, "hf"))
                    dirs.clear()
                    continue
                found += [(os.path.join(root, f), _kind(f)) for f in sorted(files) if _kind(f)]
        elif _kind(item):
            found.append((item, _kind(item)))
        else:
            raise InputError(f"input {item}: unsupported file type; use one of {', '.join(SUFFIXES)} "
                             "or a folder saved by datasets.save_to_disk")
    if not found:
        raise InputError(f"no input files ({', '.join(SUFFIXES)}) found in {inputs}")
    return found


def load_hf(path: str, kind: str, split: str | None):
    """A saved dataset folder (``hf``) or one ``.arrow`` file, memory-mapped."""
    import datasets

    if kind == "arrow":
        return datasets.Dataset.from_file(path)
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in ds else None
        if split not in ds:
            raise InputError(f"{path} holds splits {list(ds)}; choose one with --split")
        ds = ds[split]
    return ds


def _pieces(path: str, kind: str, shard_bytes: int, split: str | None) -> list[Piece]:
    if kind == "jsonl":
        size = os.path.getsize(path)
        return [Piece(path, kind, a, min(a + shard_bytes, size), min(shard_bytes, size - a))
                for a in range(0, size, shard_bytes)]
    if kind == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return [Piece(path, kind, g, g + 1, meta.row_group(g).total_byte_size)
                for g in range(meta.num_row_groups)]
    if kind in ("hf", "arrow"):
        ds = load_hf(path, kind, split)
        rows = len(ds)
        bytes_per_row = max(1, ds.data.nbytes // max(rows, 1))
        step = max(1, shard_bytes // bytes_per_row)
        return [Piece(path, kind, a, min(a + step, rows), (min(a + step, rows) - a) * bytes_per_row)
                for a in range(0, rows, step)]
    return [Piece(path, kind, 0, 0, os.path.getsize(path))]


def plan_shards(inputs: list[str], shard_bytes: int | None, split: str | None = None
                ) -> tuple[list[list[Piece]], dict]:
    """Group pieces into shards; returns (shards, a JSON-able description of the inputs)."""
    files = discover(inputs)
    total = sum(_tree_size(p) for p, _ in files)
    if shard_bytes is None:  # ~64 shards, each between 1 MiB and 256 MiB
        shard_bytes = min(256 << 20, max(1 << 20, total // 64))
    shards: list[list[Piece]] = []
    current: list[Piece] = []
    for path, kind in files:
        for piece in _pieces(path, kind, shard_bytes, split):
            current.append(piece)
            if sum(p.size for p in current) >= shard_bytes:
                shards.append(current)
                current = []
    if current:
        shards.append(current)
    described = [{"path": os.path.abspath(p), "kind": k, "bytes": _tree_size(p),
                  "mtime_ns": _tree_mtime(p)} for p, k in files]
    return shards, {"inputs": described, "shard_bytes": shard_bytes, "split": split,
                    "shards": [[asdict(p) for p in s] for s in shards]}


def _tree_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def _tree_mtime(path: str) -> int:
    if os.path.isdir(path):
        return max(os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(path) for f in fs)
    return os.stat(path).st_mtime_ns


class DocumentReader:
    """Yields ``(text, progress_bytes)`` for a shard's documents, counting what it skips.

    Skipped: malformed JSON lines, documents with empty text, ``.txt`` files that are not UTF-8
    (``strict`` turns each into an error naming file and line). A missing text key is an error.
    """

    def __init__(self, text_key: str, strict: bool, split: str | None = None):
        self.text_key, self.strict, self.split = text_key, strict, split
        self.skipped: Counter[str] = Counter()
        self.examples: list[str] = []
        self._first_lines: dict[Piece, int] = {}

    def _skip(self, reason: str, where: Callable[[], str], detail: str = "") -> None:
        """``where`` is called only for a message: locating a line may mean counting lines."""
        if self.strict:
            raise InputError(f"{where()}: {reason}{detail} (drop --strict to skip and count these)")
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where()}: {reason}{detail}")

    def read(self, shard: list[Piece]) -> Iterator[tuple[str, int]]:
        for piece in shard:
            yield from getattr(self, "_read_" + piece.kind.replace(".", "_"))(piece)

    def _text(self, record, where: Callable[[], str]) -> str | None:
        if not isinstance(record, dict):
            self._skip("line is not a JSON object", where)
            return None
        if self.text_key not in record:
            raise InputError(f"{where()}: no key {self.text_key!r} (keys: {sorted(record)[:10]}); "
                             "pass the right one with --text-key")
        text = record[self.text_key]
        if not isinstance(text, str):
            raise InputError(f"{where()}: {self.text_key!r} holds {type(text).__name__}, not text")
        if not text:
            self._skip("empty text", where)
            return None
        return text

    def _lines(self, piece: Piece, raw, lines, first_line: int | None) -> Iterator[tuple[str, int]]:
        last = raw.tell()
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            where = lambda n=n: f"{piece.path}:{self._line_no(piece, first_line, n)}"  # noqa: E731
            try:
                record = json.loads(line)
            except ValueError as e:
                self._skip("malformed JSON", where, f" ({str(e)[:60]})")
                continue
            text = self._text(record, where)
            if text is not None:
                pos = raw.tell()
                yield text, pos - last
                last = pos

    def _line_no(self, piece: Piece, first_line: int | None, n: int) -> int:
        if first_line is None:
            if piece not in self._first_lines:  # its first line follows a newline at >= start-1
                with open(piece.path, "rb") as f:
                    self._first_lines[piece] = 2 + f.read(piece.start - 1).count(b"\n")
            first_line = self._first_lines[piece]
        return first_line + n

    def _read_jsonl(self, piece: Piece) -> Iterator[tuple[str, int]]:
        with open(piece.path, "rb") as f:
            if piece.start:
                f.seek(piece.start - 1)
                f.readline()  # the line that straddles our start belongs to the previous piece

            def lines():
                while f.tell() < piece.stop:
                    line = f.readline()
                    if not line:
                        return
                    yield line
            yield from self._lines(piece, f, lines(), None if piece.start else 1)

    def _read_jsonl_gz(self, piece: Piece) -> Iterator[tuple[str, int]]:
        with open(piece.path, "rb") as raw, gzip.open(raw) as f:
            yield from self._lines(piece, raw, f, 1)

    def _read_jsonl_zst(self, piece: Piece) -> Iterator[tuple[str, int]]:
        import io

        import zstandard

        with open(piece.path, "rb") as raw:
            f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
            yield from self._lines(piece, raw, f, 1)

    def _read_txt(self, piece: Piece) -> Iterator[tuple[str, int]]:
        with open(piece.path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self._skip("not UTF-8", lambda: piece.path, f" ({e.reason} at byte {e.start})")
            return
        if text:
            yield text, piece.size
        else:
            self._skip("empty text", lambda: piece.path)

    def _columns(self, piece: Piece, names: list[str]) -> None:
        if self.text_key not in names:
            raise InputError(f"{piece.path}: no column {self.text_key!r} (columns: {names}); "
                             "pass the right one with --text-key")

    def _rows(self, piece: Piece, texts: list, first_row: int) -> Iterator[tuple[str, int]]:
        share = piece.size / max(len(texts), 1)
        carried = 0.0
        for n, text in enumerate(texts):
            carried += share
            if text is None or text == "":
                self._skip("empty text", lambda n=n: f"{piece.path} row {first_row + n}")
                continue
            if not isinstance(text, str):
                raise InputError(f"{piece.path} row {first_row + n}: {self.text_key!r} holds "
                                 f"{type(text).__name__}, not text")
            yield text, int(carried)
            carried -= int(carried)

    def _read_parquet(self, piece: Piece) -> Iterator[tuple[str, int]]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(piece.path)
        self._columns(piece, pf.schema_arrow.names)
        first_row = sum(pf.metadata.row_group(g).num_rows for g in range(piece.start))
        texts = pf.read_row_group(piece.start, columns=[self.text_key]).column(0).to_pylist()
        yield from self._rows(piece, texts, first_row)

    def _read_hf(self, piece: Piece) -> Iterator[tuple[str, int]]:
        ds = load_hf(piece.path, piece.kind, self.split)
        self._columns(piece, ds.column_names)
        texts = ds.select_columns([self.text_key])[piece.start:piece.stop][self.text_key]
        yield from self._rows(piece, texts, piece.start)

    _read_arrow = _read_hf
