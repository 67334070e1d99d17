"""lm-eval model "hope" and transformers' AutoModelForCausalLM on exported folders, offline: the
harness's numbers equal the project's own loader computed independently (loglikelihood, rolling
perplexity windows, greedy generation), every request starts from a fresh state, and bad input
(too-long requests, a tokenizer larger than the model's vocabulary) fails with a named error."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets / transformers are imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

import hope_dist
from hope_dist.config import load_config
from hope_dist.lm_eval_model import HopeEvalLM, RequestTooLong
from hope_dist.model import build_model
from hope_dist.pretrained_io import PretrainedError, save_pretrained

from helpers import DATA, REPO

TASKS = DATA / "lm_eval"
EOT = "<|endoftext|>"
close = lambda a, b: torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-5)


def corpus() -> list[str]:
    rows = [json.loads(line) for f in ("mc.jsonl", "gen.jsonl", "ppl.jsonl") for line in (TASKS / f).open()]
    texts = [r["text"] for r in rows if "text" in r]
    texts += [r["question"] + " " + r["choices"][r["answer"]] + "." for r in rows if "question" in r]
    return texts + [r["prompt"] + r["target"] + "." for r in rows if "prompt" in r]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A byte-level BPE (256 bytes + merges + <|endoftext|> = 0, < 300 ids) trained on the task texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() * 10, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def export(folder: Path, tokenizer: Path | None, mixer: str = "selfmod", vocab: int = 300, steps: int = 0,
           seq_len: int | None = 64) -> Path:
    """A tiny model (trained `steps` AdamW steps on the task texts) saved as an export-hf folder."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"--model.vocab_size={vocab}", f"--model.mixer={mixer}", "--model.d_model=32", "--model.n_heads=2",
        "--model.chunk_size=8", "--model.proj_chunk_size=16",
        "--model.cms=[{width: 32, period: 1}, {width: 32, period: 2}]",
    ]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    if steps:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
        stream = torch.tensor([i for t in corpus() for i in tok.encode(t).ids + [0]])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - 33, (8,), generator=gen)
            batch = torch.stack([stream[s:s + 33] for s in starts])
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return save_pretrained(folder, model.state_dict(), cfg, tokenizer=tokenizer,
                           source={"seq_len": seq_len} if seq_len else {})


@pytest.fixture(scope="module")
def folder(tokenizer_file, tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("hf") / "selfmod", tokenizer_file, steps=150)


@pytest.fixture(scope="module")
def results(folder):
    tm = TaskManager(include_path=str(TASKS))
    cwd = os.getcwd()
    os.chdir(REPO)  # the task YAMLs name their JSONL files relative to the repo root
    try:
        return lm_eval.simple_evaluate(model="hope", model_args={"pretrained": str(folder)}, device="cpu",
                                       tasks=["hope_mc", "hope_gen", "hope_ppl"], task_manager=tm, log_samples=True)
    finally:
        os.chdir(cwd)


def greedy(model, ids: list[int], n: int, eot: int = 0) -> list[int]:
    """Greedy decoding by full recomputation (no state carried), stopping after end of text."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            out.append(tok)
            if tok == eot:
                break
    return out


def test_harness_numbers_equal_the_loader(folder, results):
    lm = hope_dist.from_pretrained(folder)
    tok = lm.tokenizer
    for sample in results["samples"]["hope_mc"]:
        for (ctx, cont), [(ll, _is_greedy)] in zip(sample["arguments"], sample["resps"]):
            ctx_ids, whole = tok.encode(ctx).ids, tok.encode(ctx + cont).ids
            assert whole[:len(ctx_ids)] == ctx_ids
            lm.reset()
            lm.score_ids(ctx_ids)
            close(ll, lm.score_ids(whole[len(ctx_ids):]).total)
    for sample in results["samples"]["hope_ppl"]:
        ids = tok.encode(sample["arguments"][0][0]).ids
        with torch.no_grad():
            logits = lm.model(torch.tensor([[0] + ids[:-1]]))[0]
        close(sample["resps"][0][0], F.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).sum())
    for sample in results["samples"]["hope_gen"]:
        prompt, kwargs = sample["arguments"][0]
        text = tok.decode([t for t in greedy(lm.model, tok.encode(prompt).ids, kwargs["max_gen_toks"]) if t != 0])
        cut = min([text.index(s) for s in kwargs["until"] if s in text] + [len(text)])
        assert sample["resps"][0][0] == text[:cut]
    metrics = results["results"]
    assert metrics["hope_mc"]["acc,none"] >= 0.75, metrics  # the model was trained on these texts
    assert metrics["hope_gen"]["exact_match,none"] >= 2 / 3, metrics
    assert 1 < metrics["hope_ppl"]["byte_perplexity,none"] < 2, metrics


def requests(n_gen: int = 4) -> list[Instance]:
    meta = ("hope_test", 0, 1)
    return [Instance("loglikelihood", {}, ("the cat sat on the", " mat"), 0, meta),
            Instance("loglikelihood", {}, ("the dog", " sat on the log"), 1, meta),
            Instance("loglikelihood", {}, ("", "the cat"), 2, meta),
            Instance("loglikelihood_rolling", {}, ("on the mat the cat sat, on the log the dog sat.",), 3, meta),
            Instance("generate_until", {}, ("the dog sat on", {"until": ["."], "max_gen_toks": n_gen}), 4, meta)]


def run(lm: HopeEvalLM, reqs: list[Instance]) -> list:
    by_type = {t: [r for r in reqs if r.request_type == t]
               for t in ("loglikelihood", "loglikelihood_rolling", "generate_until")}
    out = {}
    for t, rs in by_type.items():
        out.update(zip([r.idx for r in rs], getattr(lm, t)(rs, disable_tqdm=True)))
    return [out[i] for i in sorted(out)]


def test_every_request_starts_from_a_fresh_state(folder):
    """The same requests in two orders give identical results; HopeLM alone would carry state."""
    lm = HopeEvalLM(pretrained=str(folder))
    forward = run(lm, requests())
    backward = run(lm, requests()[::-1])
    assert forward == backward
    lm.lm.reset()
    lm.lm.logits(lm.tok_encode("the dog sat on the log, the cat"))  # a stale state would change this
    assert run(lm, requests()) == forward


def scoring_requests() -> list[Instance]:
    """Loglikelihood requests of many lengths (so batches pad) and rolling ones of several windows."""
    meta = ("hope_test", 0, 1)
    words = "the cat sat on the mat, the dog sat on the log.".split()
    pairs = [(" ".join(words[:n]), " " + " ".join(words[n:n + k])) for n in range(1, 8) for k in (1, 3)]
    reqs = [Instance("loglikelihood", {}, pair, i, meta) for i, pair in enumerate(pairs + [("", "the cat")])]
    texts = [" ".join((words * 6)[:n]) for n in (3, 30, 70)] * 2
    return reqs + [Instance("loglikelihood_rolling", {}, (t,), len(reqs) + i, meta) for i, t in enumerate(texts)]


@pytest.mark.parametrize("mixer", ["selfmod", "titans", "attention"])
def test_batched_scoring_equals_one_by_one(folder, tokenizer_file, tmp_path, mixer):
    """batch_size=5 (rows padded on the right) gives every request's loglikelihood and greedy flag as
    batch_size=1 does, to 1e-5; the long rolling requests span several windows of max_length=24."""
    path = folder if mixer == "selfmod" else export(tmp_path / mixer, tokenizer_file, mixer=mixer)
    one = run(HopeEvalLM(pretrained=str(path), max_length=24, batch_size=1), scoring_requests())
    batched_lm = HopeEvalLM(pretrained=str(path), max_length=24, batch_size="5")
    assert batched_lm.batch_size == 5
    batched = run(batched_lm, scoring_requests())
    assert len(one) == len(batched) == 21
    for a, b in zip(one, batched, strict=True):
        if isinstance(a, tuple):
            close(a[0], b[0])
            assert a[1] == b[1]
        else:
            close(a, b)
    assert len({a[0] if isinstance(a, tuple) else a for a in one}) > 15  # distinct requests, not one number


def test_rolling_windows_predict_each_token_once(folder):
    """max_length=4 over 10 tokens: windows [eot t0 t1 t2]->t0..t3, [t3..t6]->t4..t7, [t5..t8]->t8 t9,
    each from a fresh state."""
    lm = HopeEvalLM(pretrained=str(folder), max_length=4)
    text = "the cat sat on the mat, the dog sat on the log."
    t = lm.tok_encode(text)[:10]
    text = lm.tok_decode(t)
    assert lm.tok_encode(text) == t
    model = lm.lm.model
    expected = 0.0
    with torch.no_grad():
        for window, targets in (([0] + t[:3], t[0:4]), (t[3:7], t[4:8]), (t[5:9], t[8:10])):
            logp = F.log_softmax(model(torch.tensor([window]))[0, -len(targets):], -1)
            expected += float(logp.gather(1, torch.tensor(targets)[:, None]).sum())
    [got] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    close(got, expected)


def test_too_long_requests_are_refused_with_name_and_limit(folder):
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with pytest.raises(RequestTooLong, match=r"hope_mc/doc 0 .*would read \d+ tokens .* > max_length=3\. "
                                                 r"Raise it: --model_args pretrained=.*,max_length=\d+"):
            lm_eval.simple_evaluate(model="hope", model_args={"pretrained": str(folder), "max_length": 3},
                                    tasks=["hope_mc"], task_manager=TaskManager(include_path=str(TASKS)))
    finally:
        os.chdir(cwd)
    lm = HopeEvalLM(pretrained=str(folder), max_length=16)
    with pytest.raises(RequestTooLong, match=r"hope_test/doc 0 \(request #4\).*prompt \d+ \+ max_gen_toks 40 - 1"):
        lm.generate_until([requests(n_gen=40)[-1]])


def test_default_max_length(folder, tokenizer_file, tmp_path):
    assert HopeEvalLM(pretrained=str(folder)).max_length == 8192  # selfmod: a compute bound only
    att = export(tmp_path / "att", tokenizer_file, mixer="attention", seq_len=32)
    assert HopeEvalLM(pretrained=str(att)).max_length == 32  # attention: the training seq_len
    bare = export(tmp_path / "bare", tokenizer_file, mixer="attention", seq_len=None)
    with pytest.raises(PretrainedError, match=r"hope_dist.source.seq_len is missing.*max_length=N"):
        HopeEvalLM(pretrained=str(bare))
    assert HopeEvalLM(pretrained=str(bare), max_length=64).max_length == 64


def test_tokenizer_larger_than_the_model_is_refused(tokenizer_file, tmp_path):
    from transformers import AutoModelForCausalLM

    small = export(tmp_path / "small", tokenizer_file, vocab=200)
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
    message = (rf"{small / 'tokenizer.json'}: the tokenizer has {n} tokens but the model's vocab_size is 200 .*"
               r"--tokenizer PATH/tokenizer.json")
    with pytest.raises(PretrainedError, match=message):
        HopeEvalLM(pretrained=str(small))
    with pytest.raises(PretrainedError, match=message):
        AutoModelForCausalLM.from_pretrained(small, trust_remote_code=True)
    with pytest.raises(PretrainedError, match=r"no tokenizer.json.*--tokenizer"):
        HopeEvalLM(pretrained=str(export(tmp_path / "notok", None)))


@pytest.mark.parametrize("mixer", ["selfmod", "titans", "attention"])
def test_transformers_loads_generates_and_matches(tokenizer_file, tmp_path, mixer):
    from transformers import AutoModelForCausalLM

    out = export(tmp_path / mixer, tokenizer_file, mixer=mixer)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hope.HopeForCausalLM"
    assert config["hope_dist"]["format"] and config["architectures"] == ["HopeModel"] and config["eos_token_id"] == 0
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    lm = hope_dist.from_pretrained(out)
    ids = lm.tokenizer.encode("the cat sat on the mat, the dog sat on the log.").ids
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    close(logits, lm.logits(ids))
    lm.reset()
    new = hf.generate(torch.tensor([ids[:5]]), max_new_tokens=12, do_sample=False)[0, 5:].tolist()
    assert new == lm.generate_ids(ids[:5], 12, stop_id=0) and len(new) >= 1
    with pytest.raises(ValueError, match="left padding"):
        hf(torch.tensor([ids[:4]]), attention_mask=torch.tensor([[0, 1, 1, 1]]))


def test_cli(folder, tmp_path):
    """The documented command, in a fresh process with no network."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "hope_dist.lm_eval_cli", "--model", "hope", "--model_args", f"pretrained={folder}",
           "--tasks", "hope_mc,hope_ppl", "--include_path", str(TASKS), "--device", "cpu",
           "--output_path", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hope_mc" in result.stdout and "bits_per_byte" in result.stdout
    saved = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert saved["results"]["hope_mc"]["acc,none"] >= 0.75
