"""The default offline corpus: the Python standard library's own sources and text docs.

    python -m data_prep.corpus --out data/stdlib/corpus.jsonl            # first 20 MB
    python -m data_prep.corpus --out big.jsonl --max-mb 200 --include-site-packages

Every ``.py`` file (docstrings and comments included) and every ``.rst``/``.txt`` file shipped
with the interpreter becomes one JSON line ``{"text": ...}``, walked in sorted order so the
corpus is the same on every run; exact duplicates and non-UTF-8 files are left out.
``--include-site-packages`` adds the installed packages' sources and docs (``.py``, ``.pyi``,
``.md``, ``.rst``, ``.txt``) for corpora larger than the standard library.
"""

import argparse
import hashlib
import json
import os
import sys
import sysconfig

from tqdm import tqdm

STDLIB_SUFFIXES = (".py", ".rst", ".txt")
PACKAGE_SUFFIXES = (".py", ".pyi", ".md", ".rst", ".txt")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def roots(include_site_packages: bool) -> list[tuple[str, tuple[str, ...]]]:
    paths = sysconfig.get_paths()
    found = [(paths["stdlib"], STDLIB_SUFFIXES)]
    if include_site_packages:
        for key in ("purelib", "platlib"):
            if paths[key] not in [r for r, _ in found]:
                found.append((paths[key], PACKAGE_SUFFIXES))
    return found


def iter_files(root: str, suffixes: tuple[str, ...], skip_nested_packages: bool):
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__"
                         and not (skip_nested_packages and d in SKIP_DIRS))
        for name in sorted(files):
            if name.endswith(suffixes):
                yield os.path.join(dirpath, name)


def build(out: str, max_mb: float, include_site_packages: bool) -> dict:
    limit = int(max_mb * 1e6)
    seen: set[bytes] = set()
    stats = {"documents": 0, "bytes": 0, "duplicates": 0, "not_utf8": 0, "files_seen": 0}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    bar = tqdm(total=limit, unit="B", unit_scale=True, desc="corpus", file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 15.0)
    with open(tmp, "w", encoding="utf-8") as f:
        for root, suffixes in roots(include_site_packages):
            for path in iter_files(root, suffixes, skip_nested_packages=suffixes == STDLIB_SUFFIXES):
                stats["files_seen"] += 1
                try:
                    with open(path, "rb") as g:
                        data = g.read()
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    stats["not_utf8"] += 1
                    continue
                except OSError:
                    continue
                digest = hashlib.blake2b(data, digest_size=16).digest()
                if not text.strip() or digest in seen:
                    stats["duplicates"] += bool(text.strip())
                    continue
                if stats["bytes"] + len(data) > limit:
                    break
                seen.add(digest)
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                stats["documents"] += 1
                stats["bytes"] += len(data)
                bar.update(len(data))
            else:
                continue
            break
    bar.close()
    os.replace(tmp, out)
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output .jsonl path")
    p.add_argument("--max-mb", type=float, default=20.0,
                   help="stop before the text exceeds this many MB (default 20)")
    p.add_argument("--include-site-packages", action="store_true",
                   help="also take installed packages' sources and docs")
    args = p.parse_args(argv)
    if args.max_mb <= 0:
        p.error("--max-mb must be positive")
    s = build(args.out, args.max_mb, args.include_site_packages)
    print(f"wrote {args.out}: {s['documents']:,} documents, {s['bytes'] / 1e6:.1f} MB of text "
          f"(cap {args.max_mb:g} MB; {s['files_seen']:,} files seen, {s['duplicates']:,} duplicates "
          f"and {s['not_utf8']:,} non-UTF-8 files left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
