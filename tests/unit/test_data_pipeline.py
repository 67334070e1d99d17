"""The trainer's data stream on small Megatron datasets written by megatron-core's own builder:
seeded order, exact resume, dp slicing, blending, document boundaries, and named errors."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from helpers import write_indexed_dataset

from hope_dist.data import build_train_stream
from hope_dist.data.blend import BLOCK

EOD = 0


def make_docs(n: int, base: int, seed: int) -> list[np.ndarray]:
    """Document i: tokens base + 1 + (7 i + position) % 97, then EOD; so a token tells its
    dataset (base 0 or 100) and documents differ from each other."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(3, 40))
        docs.append(np.append(base + 1 + (i * 7 + np.arange(length)) % 97, EOD))
    return docs


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    a_docs, b_docs = make_docs(300, 0, 1), make_docs(200, 100, 2)
    return (str(write_indexed_dataset(d / "a", a_docs)), a_docs,
            str(write_indexed_dataset(d / "b", b_docs)), b_docs)


def stream(paths, weights=None, dp_rank=0, dp_size=1, seed=0, seq_len=16, gb=8, **kw):
    return build_train_stream(paths, weights, seq_len=seq_len, global_batch=gb, dp_rank=dp_rank,
                              dp_size=dp_size, seed=seed, eod_id=kw.pop("eod_id", EOD), **kw)


def take(s, steps):
    out = []
    for _ in range(steps):
        b = s.next_batch()
        assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])  # labels: next token
        out.append(torch.cat([b["tokens"], b["labels"][:, -1:]], dim=1))
    return torch.cat(out)


def test_batch_shapes_and_dtypes(two_sets):
    s = stream([two_sets[0]], gb=8, dp_size=2)
    b = s.next_batch()
    assert b["tokens"].shape == b["labels"].shape == (4, 16)
    assert b["tokens"].dtype == b["labels"].dtype == torch.int64
    assert s.consumed_samples == 8 and s.eod_id == EOD and s.vocab_size == 98


def test_same_seed_same_order_other_seed_other_order(two_sets):
    a = take(stream([two_sets[0]], seed=3), 5)
    assert torch.equal(a, take(stream([two_sets[0]], seed=3), 5))
    assert not torch.equal(a, take(stream([two_sets[0]], seed=4), 5))


def test_resume_after_k_steps_continues_exactly(two_sets):
    paths = [two_sets[0], two_sets[2]]
    full = take(stream(paths, [0.6, 0.4], seed=5), 7)
    first = stream(paths, [0.6, 0.4], seed=5)
    take(first, 3)
    resumed = stream(paths, [0.6, 0.4], seed=5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # survives serialization
    assert torch.equal(take(resumed, 4), full[3 * 8:])


def test_dp_ranks_disjoint_and_union_is_dp1_even_across_resume(two_sets):
    paths = [two_sets[0], two_sets[2]]
    dp1 = take(stream(paths, [0.5, 0.5], seed=6, gb=8), 6)
    ranks = [stream(paths, [0.5, 0.5], seed=6, gb=8, dp_rank=r, dp_size=2) for r in range(2)]
    seen = [set(), set()]
    for step in range(3):
        parts = [take(r, 1) for r in ranks]
        assert torch.equal(torch.cat(parts), dp1[step * 8:(step + 1) * 8])
        for r, part in enumerate(parts):
            seen[r].update(map(tuple, part.tolist()))
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]  # disjoint samples
    state = ranks[0].state_dict()  # resume the dp=2 run as dp=4: global order is kept
    quads = [stream(paths, [0.5, 0.5], seed=6, gb=8, dp_rank=r, dp_size=4) for r in range(4)]
    for q in quads:
        q.load_state_dict(state)
    assert torch.equal(torch.cat([take(q, 1) for q in quads]), dp1[24:32])


def test_blend_weights_honoured(two_sets):
    s = stream([two_sets[0], two_sets[2]], [0.7, 0.3], seed=7, gb=256)
    samples = take(s, 2 * BLOCK // 256)
    body = samples.clone()
    body[body == EOD] = -1
    from_a = ((body > 0) & (body <= 100)).any(1)
    from_b = (body > 100).any(1)
    assert not (from_a & from_b).any(), "a sample never mixes datasets"
    share = from_a.float().mean().item()
    assert abs(share - 0.7) <= 1 / BLOCK, share  # exact per whole block, up to rounding


def test_samples_are_packed_documents_with_eod_kept(two_sets):
    _, a_docs, _, _ = two_sets
    s = stream([two_sets[0]], seed=8, seq_len=64, gb=4)
    samples = take(s, 10).numpy()
    assert (samples == EOD).sum() > 10
    pieces = {tuple(d[:-1]) for d in a_docs}
    for row in samples:
        cuts = np.flatnonzero(row == EOD)
        for lo, hi in zip(cuts[:-1] + 1, cuts[1:]):  # every full piece between two EODs is a doc
            assert tuple(row[lo:hi]) in pieces
        # the piece after the last EOD is a document's beginning
        tail = tuple(row[cuts[-1] + 1:])
        assert any(p[:len(tail)] == tail for p in pieces)


def test_epochs_wrap_reshuffled_and_logged(two_sets, caplog):
    s = stream([two_sets[0]], seed=9, seq_len=16, gb=8)
    per_epoch = s.datasets[0].per_epoch
    with caplog.at_level(logging.INFO, logger="hope_dist.data"):
        samples = take(s, (2 * per_epoch) // 8 + 1)
    assert any("wrapped into epoch 1" in r.message for r in caplog.records)
    first, second = samples[:per_epoch], samples[per_epoch:2 * per_epoch]
    assert not torch.equal(first, second)
    rows = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert rows(first) != rows(second)  # documents reshuffled: new sample boundaries


def test_tokenizer_gives_eod_and_vocab(two_sets, tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text(json.dumps({"model": {"vocab": {"a": 1, "b": 2}}, "added_tokens": [
        {"id": 0, "content": "<|endoftext|>", "special": True}, {"id": 511, "content": "<pad>"}]}))
    s = build_train_stream([two_sets[0]], None, seq_len=16, global_batch=4, dp_rank=0, dp_size=1,
                           seed=0, tokenizer=str(tok))
    assert s.eod_id == 0 and s.vocab_size == 512


def test_corrupt_and_bad_arguments_are_named(two_sets, tmp_path):
    a = two_sets[0]
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 3"):
        stream([a], gb=8, dp_size=3)
    with pytest.raises(ValueError, match="2 data weights for 1 data paths"):
        stream([a], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"missing\.bin does not exist"):
        (tmp_path / "missing.idx").write_bytes(b"")
        stream([str(tmp_path / "missing")])
    for name, damage, message in [("trunc", lambda b, i: (b[:-3], i), "truncated"),
                                  ("idx", lambda b, i: (b, i[:-5]), "corrupt"),
                                  ("magic", lambda b, i: (b, b"XX" + i[2:]), "not a Megatron")]:
        data, index = damage(open(a + ".bin", "rb").read(), open(a + ".idx", "rb").read())
        (tmp_path / f"{name}.bin").write_bytes(data)
        (tmp_path / f"{name}.idx").write_bytes(index)
        with pytest.raises(ValueError, match=message):
            stream([str(tmp_path / name)])
    empty = write_indexed_dataset(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="no documents"):
        stream([str(empty)])
    with pytest.raises(ValueError, match="fewer than one sample"):
        stream([a], seq_len=10**6)
    with pytest.raises(ValueError, match="no end-of-document id"):
        stream([a], eod_id=None)


def test_reads_our_tokenizer_output(tmp_path):
    """data_prep.tokenize -> stream: the prefix and tokenizer of the README's chain work as is."""
    from data_prep import tokenize
    from data_prep.train_tokenizer import train

    texts = [f"def f{i}(x):\n    return x * {i}  # doc {i}\n" * (1 + i % 5) for i in range(200)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train([str(tmp_path / "c.jsonl")], 300, str(tmp_path / "tok.json"))
    assert tokenize.main(["--input", str(tmp_path / "c.jsonl"), "--tokenizer", str(tmp_path / "tok.json"),
                          "--output-prefix", str(tmp_path / "ds")]) == 0
    s = build_train_stream([str(tmp_path / "ds")], None, seq_len=32, global_batch=4, dp_rank=0,
                           dp_size=1, seed=0, tokenizer=str(tmp_path / "tok.json"))
    assert s.eod_id == 0 and s.vocab_size == 300
    tokens = s.next_batch()["tokens"]
    assert tokens.max() < 300 and (tokens == 0).any()
