"""tools/evaluate.py and hope_dist/evals: carrying the state over segments equals one long forward,
perplexity equals a hand computation, passkey / MQAR data are deterministic and right (a cheating
scorer gets 100%), the CLI end to end on a committed checkpoint and on an exported folder, and
clear errors (with nothing written) for bad inputs."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hope_dist.config import ModelConfig, from_dict
from hope_dist.evals import long_context as lc
from hope_dist.evals import mqar as mq
from hope_dist.evals import passkey as pk
from hope_dist.evals.loading import EvalError, open_documents
from hope_dist.evals.perplexity import perplexity
from hope_dist.model import build_model
from tools import convert
from tools import evaluate

from helpers import make_trainer, write_indexed_dataset

VOCAB, EOD = 96, 0


def tiny_model(mixer: str, dtype=torch.float32, **extra):
    cfg = from_dict(ModelConfig, {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "mixer": mixer,
                                  "chunk_size": 8, "proj_chunk_size": 16, "cms": [{"width": 32, "period": 1}], **extra})
    torch.manual_seed(0)
    return build_model(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def long_docs(tmp_path_factory) -> Path:
    """A Megatron prefix of 6 documents of 50..200 tokens, EOD last."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([rng.integers(1, VOCAB, int(n) - 1), [EOD]]) for n in (200, 50, 130, 1, 180, 97)]
    return write_indexed_dataset(tmp_path_factory.mktemp("evaldata") / "docs", docs)


@pytest.fixture(scope="module")
def checkpoint(random_dataset, tmp_path_factory) -> Path:
    """A committed step-4 checkpoint of the tiny selfmod job (seq_len 32, proj_chunk_size 16)."""
    run_dir = tmp_path_factory.mktemp("evalrun")
    make_trainer(random_dataset, run_dir, **{"training.steps": 4, "checkpoint.interval": 4}).train()
    return run_dir / "checkpoints" / "step-4"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json of 96 tokens with digits (<|endoftext|> = 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyzTWHR0123456789 .?,"))
    text = [pk.FILLER, pk.NEEDLE.format(key=12345), pk.PROMPT, "the cat sat on the mat."] * 20
    tok.train_from_iterator(text, trainer)
    path = tmp_path_factory.mktemp("evaltok") / "tokenizer.json"
    tok.save(str(path))
    return path


# ------------------------------------------------------------------ long context: carry == one forward
@pytest.mark.parametrize("mixer", ["selfmod", "titans"])
def test_segments_with_carry_equal_one_long_forward(mixer):
    model = tiny_model(mixer)
    x = torch.randint(1, VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
    for segment in (16, 32, 48):
        carried = lc.segmented_logits(model, x, segment, carry=True)
        torch.testing.assert_close(carried, full, rtol=0, atol=1e-5)
        reset = lc.segmented_logits(model, x, segment, carry=False)
        torch.testing.assert_close(reset[:, :segment], full[:, :segment], rtol=0, atol=1e-5)
        assert (reset[:, segment:] - full[:, segment:]).abs().max() > 1e-3  # the memory matters after a reset


def test_segment_must_be_a_multiple_of_proj_chunk():
    with pytest.raises(EvalError,
                       match=r"--segment 24 is not a multiple of model.proj_chunk_size=16.*--segment 16 or 32"):
        lc.check_segment(tiny_model("selfmod"), 24)
    with pytest.raises(EvalError, match="--long-len 32 must exceed --segment 32"):
        lc.check_segment(tiny_model("titans"), 32, 32)
    lc.check_segment(tiny_model("attention"), 24)  # attention is never carried


def test_long_context_table(long_docs):
    model = tiny_model("selfmod")
    docs = open_documents(str(long_docs), _loaded(model))
    r = lc.long_context(model, docs, length=128, segment=32, max_docs=3, batch_size=2, progress=False)
    assert r["documents"] == 3 and r["modes"] == ["carry", "reset"]  # the docs of 200, 130 and 180 tokens
    assert [(b["start"], b["end"]) for b in r["buckets"]] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert r["buckets"][0]["carry"] == pytest.approx(r["buckets"][0]["reset"], abs=1e-5)
    assert r["buckets"][1]["carry"] != pytest.approx(r["buckets"][1]["reset"], abs=1e-4)
    # by hand: the first 128 targets of the same documents, one long forward
    tf = [d for d in open_documents(str(long_docs), _loaded(model)) if len(d) > 128][:3]
    x = torch.tensor(np.stack([d[:129] for d in tf]))
    with torch.no_grad():
        nll = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none").mean(0)
    assert r["buckets"][3]["carry"] == pytest.approx(float(nll[96:].mean()), abs=1e-5)
    assert lc.bucket_edges(100, 32, "pow2") == [0, 1, 2, 4, 8, 16, 32, 64, 100]
    att = lc.long_context(tiny_model("attention"), open_documents(str(long_docs), _loaded(model)), 64, 32, 2,
                          progress=False)
    assert att["modes"] == ["reset"] and "attention" in att["note"]


def _loaded(model, tokenizer=None):
    from hope_dist.evals.loading import Loaded

    return Loaded(model, "test", "export", None, 32, tokenizer, EOD)


# ------------------------------------------------------------------ perplexity
def test_perplexity_equals_hand_computation(long_docs):
    model = tiny_model("selfmod")
    window, budget = 64, 500
    r = perplexity(model, open_documents(str(long_docs), _loaded(model)), window, budget, batch_size=3,
                   progress=False)
    from hope_dist.data.token_file import TokenFile

    tf = TokenFile(str(long_docs))
    total, count = 0.0, 0
    with torch.no_grad():
        for a, n in zip(tf.doc_start, tf.doc_len):
            doc = torch.tensor(tf.tokens[a:a + n].astype(np.int64))
            for s in range(0, n - 1, window):  # each window alone, fresh state
                take = min(window, n - 1 - s, budget - count)
                logits = model(doc[None, s:s + take])[0]
                total += float(F.cross_entropy(logits, doc[s + 1:s + 1 + take], reduction="sum"))
                count += take
                if count == budget:
                    break
            if count == budget:
                break
    assert r["tokens"] == count == budget and r["complete"]
    assert r["loss"] == pytest.approx(total / count, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert r["tokens_per_s"] > 0



def test_heldout_reads_the_documents_training_held_out(long_docs):
    """--heldout F reads exactly the documents a run with data.valid_fraction=F never trained on."""
    from hope_dist.data.token_file import TokenFile
    from hope_dist.data.validation import split_documents

    loaded = _loaded(tiny_model("selfmod"))
    tf = TokenFile(str(long_docs))
    train, held = split_documents(len(tf.doc_len), 0.34)
    got = list(open_documents(str(long_docs), loaded, heldout=0.34))
    assert len(got) == len(held) == 2 and len(train) == 4
    for ids, d in zip(got, held):
        np.testing.assert_array_equal(ids, tf.tokens[tf.doc_start[d]:tf.doc_start[d] + tf.doc_len[d]])
    assert sum(len(x) for x in got) < sum(len(x) for x in open_documents(str(long_docs), loaded))

# ------------------------------------------------------------------ passkey
@pytest.mark.parametrize("mode", ["tokens", "text"])
def test_passkey_samples_are_deterministic_and_placed(mode, tokenizer_file):
    from hope_dist.data.encoders import load_encoder

    if mode == "text":
        enc = load_encoder(str(tokenizer_file))
        vocab = pk.Vocab.text(lambda s: enc.encode_batch([s])[0])
    else:
        vocab = pk.Vocab.tokens(VOCAB, EOD)
    a = pk.make_samples(vocab, (512, 1024), (0.0, 0.5, 1.0), per_cell=2, seed=3)
    b = pk.make_samples(vocab, (512, 1024), (0.0, 0.5, 1.0), per_cell=2, seed=3)
    assert [s.context for s in a] == [s.context for s in b] and [s.answer for s in a] == [s.answer for s in b]
    assert [s.context for s in pk.make_samples(vocab, (512,), (0.5,), seed=4)] != [a[2].context]
    for s in a:
        assert len(s.context) == s.length
        assert s.context[s.needle_pos:s.needle_pos + len(s.needle)] == s.needle == vocab.needle(s.key)
        assert s.candidates[s.answer] == vocab.answer(s.key) and len(s.candidates) == 10
        assert len({len(c) for c in s.candidates}) == 1 and len({tuple(c) for c in s.candidates}) == 10
        assert s.context[-len(vocab.prompt()):] == vocab.prompt()
        filler = len(s.context) - len(s.needle) - len(vocab.prompt())
        assert s.needle_pos == round(s.depth * filler)
        if mode == "text":
            assert f"pass key is {s.key}." in enc.tok.decode(s.context)
    assert pk.passkey(a, pk.oracle_scorer, progress=False)["accuracy"] == 1.0
    wrong = pk.passkey(a, lambda s: [0.0] * len(s.candidates), progress=False)  # ties are wrong
    assert wrong["accuracy"] == 0.0


def test_passkey_model_scorer_matches_one_forward():
    """The scorer's carried context + batched candidates give the same log-likelihoods as one
    forward per candidate over context + candidate."""
    for mixer in ("selfmod", "attention"):
        model = tiny_model(mixer)
        sample = pk.make_samples(pk.Vocab.tokens(VOCAB, EOD), (200,), (0.3,), candidates=3)[0]
        got = pk.model_scorer(model, feed=32)(sample)
        for c, score in zip(sample.candidates, got):
            x = torch.tensor([sample.context + c])
            with torch.no_grad():
                logp = torch.log_softmax(model(x)[0], -1)
            want = sum(float(logp[len(sample.context) + i - 1, t]) for i, t in enumerate(c))
            assert score == pytest.approx(want, abs=1e-4)


def test_passkey_length_below_prompt():
    with pytest.raises(EvalError, match=r"--passkey-lengths \[8\]: below the 12 tokens"):
        pk.make_samples(pk.Vocab.tokens(VOCAB, EOD), (8, 512), (0.5,))


# ------------------------------------------------------------------ MQAR
class InductionOracle(torch.nn.Module):
    """Predicts the token that followed the last earlier occurrence of the current token."""

    def __init__(self, vocab):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        B, T = x.shape
        out = torch.zeros(B, T, self.cfg.vocab_size)
        for b in range(B):
            seen = {}
            for t in range(T):
                if t:
                    seen[int(x[b, t - 1])] = int(x[b, t])
                if int(x[b, t]) in seen:
                    out[b, t, seen[int(x[b, t])]] = 1.0
        return out


def test_mqar_data_and_oracle():
    keys, values = mq.split_vocab(0, VOCAB, EOD)
    assert EOD not in keys and EOD not in values and not set(keys) & set(values)
    t1, q = mq.make_mqar(8, 5, keys, values, seed=2)
    t2, _ = mq.make_mqar(8, 5, keys, values, seed=2)
    assert t1.shape == (5, 32) and np.array_equal(t1, t2) and list(q) == list(range(16, 32, 2))
    for row in t1:
        pairs = dict(zip(row[0:16:2], row[1:16:2]))
        assert len(pairs) == 8 and all(pairs[row[p]] == row[p + 1] for p in q)
    r = mq.mqar(InductionOracle(VOCAB), (2, 8, 32), n_samples=6, eod_id=EOD, progress=False)
    assert [x["accuracy"] for x in r["by_pairs"]] == [1.0, 1.0, 1.0]
    r = mq.mqar(tiny_model("titans"), (4, 16), n_samples=8, eod_id=EOD, train_seq_len=32, progress=False)
    assert [x["beyond_train_context"] for x in r["by_pairs"]] == [False, True]
    assert all(0 <= x["accuracy"] <= 1 for x in r["by_pairs"]) and r["tokens"] == 8 * (16 + 64)
    with pytest.raises(EvalError, match="--mqar-pairs"):
        mq.check(tiny_model("titans"), (64,), (1, 60), EOD)


# ------------------------------------------------------------------ CLI end to end
FAST = ["--no-progress", "--tokens", "300", "--long-len", "64", "--long-docs", "2", "--passkey-lengths", "64,128",
        "--passkey-depths", "0.2,0.8", "--mqar-pairs", "2,4", "--mqar-samples", "4", "--batch-size", "4"]


def test_cli_on_checkpoint(checkpoint, long_docs, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main([str(checkpoint), "--out", str(out), "--data", str(long_docs), *FAST]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["long_context.png", "mqar.png", "passkey.png", "results.json", "results.md"]
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["kind"] == "checkpoint" and res["model"]["step"] == 4 and res["model"]["train_seq_len"] == 32
    t = res["tasks"]
    assert t["perplexity"]["tokens"] == 300 and t["perplexity"]["window"] == 32
    assert t["long_context"]["segment"] == 32 and len(t["long_context"]["buckets"]) == 2
    assert t["passkey"]["mode"] == "tokens" and t["passkey"]["samples"] == 4
    assert all(t[k]["tokens_per_s"] > 0 for k in t)
    md = (out / "results.md").read_text()
    assert "## Perplexity" in md and "carry - reset" in md and "## MQAR" in md
    assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert "perplexity:" in capsys.readouterr().out


def test_cli_on_export_with_jsonl_and_tokenizer(checkpoint, tokenizer_file, tmp_path):
    hf = tmp_path / "hf"
    assert convert.main(["export-hf", str(checkpoint), str(hf), "--tokenizer", str(tokenizer_file)]) == 0
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": (pk.FILLER + "the cat sat on the mat. ") * k}) + "\n"
                            for k in (1, 3, 5)))
    out = tmp_path / "eval"
    assert evaluate.main([str(hf), "--out", str(out), "--data", str(data), "--tasks", "perplexity,passkey",
                          *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["kind"] == "export" and res["model"]["train_seq_len"] == 32  # read from the source
    assert res["tasks"]["passkey"]["mode"] == "text" and res["tasks"]["perplexity"]["tokens"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["passkey.png", "results.json", "results.md"]


# ------------------------------------------------------------------ errors: clear, and nothing written
def _fails(capsys, args, match, out):
    assert evaluate.main([*args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not out.exists()


def test_errors(checkpoint, long_docs, tokenizer_file, tmp_path, capsys):
    out = tmp_path / "never"
    ck = str(checkpoint)
    _fails(capsys, [ck, "--data", str(tmp_path / "nope")], "nope.bin and", out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(capsys, [ck, "--data", str(empty)], "the file is empty", out)
    _fails(capsys, [ck, "--data", str(long_docs), "--segment", "24"], "not a multiple of model.proj_chunk_size=16", out)
    _fails(capsys, [ck, "--tasks", "passkey", "--passkey-lengths", "8"], "below the", out)
    _fails(capsys, [ck, "--tasks", "perplexity"], "need --data", out)
    _fails(capsys, [ck, "--tasks", "bogus"], "unknown ['bogus']", out)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "one document"}\n')
    _fails(capsys, [ck, "--data", str(jsonl), "--heldout", "0.1"], "needs --data as a Megatron PREFIX", out)
    _fails(capsys, [ck, "--data", str(long_docs), "--heldout", "1.5"], "must be in (0, 1)", out)
    big = tmp_path / "big.json"
    spec = json.loads(tokenizer_file.read_text())
    spec["added_tokens"].append({**spec["added_tokens"][0], "id": 500, "content": "<|extra|>"})
    big.write_text(json.dumps(spec))
    _fails(capsys, [ck, "--tokenizer", str(big)], "has 501 tokens but the model's vocabulary is 96", out)
    uncommitted = tmp_path / "step-9"
    shutil.copytree(checkpoint, uncommitted)
    (uncommitted / "COMMITTED").unlink()
    _fails(capsys, [str(uncommitted)], "COMMITTED: missing (the save did not finish)", out)
    _fails(capsys, [str(checkpoint.parent.parent)], "is a run directory; pass one of its checkpoints", out)
    # a Megatron file tokenized with a larger vocabulary
    wide = write_indexed_dataset(tmp_path / "wide", [np.array([5, 300, 0])])
    _fails(capsys, [ck, "--data", str(wide), "--tasks", "perplexity"], "token id 300 >= the model's vocab_size 96", out)
