"""data_prep.pinned_corpus on a manifest of two archives built here (an sdist and a wheel, no network):
the same bytes on every build, a wrong archive checksum refused, a changed text named by package."""
import io
import json
import re
import tarfile
import zipfile

import pytest

from data_prep import pinned_corpus
from hope_dist.data.readers import InputError

from helpers import REPO

SDIST = {  # deliberately not in sorted order: extraction must sort
    "tinypkg-0.1/tinypkg/b.py": b"def b():\n    return 'b'\n",
    "tinypkg-0.1/README.md": "# tiny \u00e9t\u00e9\n".encode(),
    "tinypkg-0.1/tinypkg/a.py": b"A = 1\n",
    "tinypkg-0.1/tinypkg/__init__.py": b"\n",  # blank: left out
    "tinypkg-0.1/tinypkg.egg-info/SOURCES.txt": b"metadata, left out\n",
    "tinypkg-0.1/tinypkg/latin1.txt": "caf\u00e9\n".encode("latin-1"),  # not UTF-8: left out
    "tinypkg-0.1/tinypkg/data.bin": b"\x00\x01",  # suffix not listed
}
WHEEL = {
    "tinywheel/z.pyi": b"def z() -> int: ...\n",
    "tinywheel/dup.py": b"A = 1\n",  # the same bytes as tinypkg/a.py: kept once
    "tinywheel-2.0.dist-info/top_level.txt": b"tinywheel\n",
}
EXPECTED = ["# tiny \u00e9t\u00e9\n", "A = 1\n", "def b():\n    return 'b'\n", "def z() -> int: ...\n"]


def write_sdist(path, files):
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def write_wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


@pytest.fixture
def tiny(tmp_path):
    """A cache holding both archives and a manifest pinning their checksums and the corpus's."""
    cache = tmp_path / "cache"
    cache.mkdir()
    write_sdist(cache / "tinypkg-0.1.tar.gz", SDIST)
    write_wheel(cache / "tinywheel-2.0-py3-none-any.whl", WHEEL)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"suffixes": [".py", ".pyi", ".md", ".txt"], "packages": [
        {"name": "tinypkg", "version": "0.1", "file": "tinypkg-0.1.tar.gz"},
        {"name": "tinywheel", "version": "2.0", "file": "tinywheel-2.0-py3-none-any.whl"}]}))
    pinned_corpus.build(manifest, cache, tmp_path / "recorded.jsonl", record=True)
    return manifest, cache


def test_build_is_deterministic_and_matches_its_pins(tiny, tmp_path):
    manifest, cache = tiny
    first = pinned_corpus.build(manifest, cache, tmp_path / "a.jsonl")
    second = pinned_corpus.build(manifest, cache, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert first["sha256"] == second["sha256"] == json.loads(manifest.read_text())["corpus_sha256"]
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["text"] for x in lines] == EXPECTED
    assert first["duplicates"] == 1 and first["not_utf8"] == 1


def test_wrong_archive_checksum_is_refused(tiny, tmp_path):
    manifest, cache = tiny
    m = json.loads(manifest.read_text())
    m["packages"][1]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    with pytest.raises(InputError, match=r"tinywheel-2\.0-py3-none-any\.whl: sha256 [0-9a-f]{64} is not the pinned 0+"):
        pinned_corpus.build(manifest, cache, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_changed_text_is_refused_naming_the_package(tiny, tmp_path, capsys):
    manifest, cache = tiny
    m = json.loads(manifest.read_text())
    m["packages"][0]["text_sha256"] = m["corpus_sha256"] = "f" * 64  # as if tinypkg's extraction had changed
    manifest.write_text(json.dumps(m))
    out = tmp_path / "out.jsonl"
    assert pinned_corpus.main(["--manifest", str(manifest), "--cache", str(cache), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not the pinned ffff" in err and "tinypkg 0.1" in err and "tinywheel" not in err
    assert not out.exists() and (tmp_path / "out.jsonl.mismatch").is_file()


def test_quality_manifest_is_pinned_and_documented():
    m = pinned_corpus.load_manifest(pinned_corpus.DEFAULT_MANIFEST)
    assert all(re.fullmatch(r"[0-9a-f]{64}", p.get("sha256", "")) and p.get("text_sha256") for p in m["packages"])
    assert m["corpus_sha256"] in (REPO / "docs/QUALITY.md").read_text()
