"""tools/convert.py and hope_dist.from_pretrained: consolidate, export -> from_pretrained (same
logits, state carried across calls for every mixer), import back -> same training, reshard,
inspect, and clear errors for broken folders."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hope_dist
from hope_dist.checkpoint import CheckpointError, read_flat
from hope_dist.pretrained_io import PretrainedError
from tools import convert
from tools.inspect_ckpt import main as inspect_main

from helpers import REPO, make_trainer as make, read_losses as losses



@pytest.fixture(scope="module")
def trained(random_dataset, tmp_path_factory):
    """A run of 6 steps with a checkpoint at step 3 (between CMS ticks) and at the end."""
    run_dir = tmp_path_factory.mktemp("run")
    trainer = make(random_dataset, run_dir, **{"training.steps": 6, "checkpoint.interval": 3})
    trainer.train()
    return trainer, run_dir, run_dir / "checkpoints" / "step-3"


def test_consolidate_fp32_and_bf16(trained, tmp_path):
    from safetensors.torch import load_file

    trainer, _, _ = trained
    final = trainer.checkpointer.path(6)
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out = tmp_path / f"model-{dtype}.safetensors"
        assert convert.main(["consolidate", str(final), str(out), "--dtype", dtype]) == 0
        weights = load_file(str(out))
        assert set(weights) == set(trainer.model.state_dict())
        for n, p in trainer.model.state_dict().items():
            assert torch.equal(weights[n], p.to(torch_dtype)), n


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_export_then_from_pretrained_gives_training_logits(trained, tmp_path, bpe_tokenizer, shard):
    trainer, _, _ = trained
    out = tmp_path / "hf"
    args = ["export-hf", str(trainer.checkpointer.path(6)), str(out), "--tokenizer", str(bpe_tokenizer)]
    assert convert.main(args + (["--max-shard-size", shard] if shard else [])) == 0
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and "model.safetensors" not in files
    lm = hope_dist.from_pretrained(out)
    tokens = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lm.model(tokens), trainer.model(tokens))
    assert lm.tokenizer.decode(lm.tokenizer.encode("the cat").ids) == "the cat"


@pytest.mark.parametrize("mixer", ["selfmod", "titans", "attention"])
def test_session_carries_state_across_calls(random_dataset, tmp_path, mixer):
    """Scoring piece by piece and greedy generation token by token compute what one forward over
    the whole sequence computes: bit for bit when the pieces end on proj_chunk_size (16) boundaries,
    and in float64 to rounding (1e-12) for any pieces (other lengths change matmul shapes only)."""
    trainer = make(random_dataset, tmp_path, **{"model.mixer": mixer, "training.steps": 1})
    trainer.train()
    out = tmp_path / "hf"
    assert convert.main(["export-hf", str(trainer.checkpointer.path(1)), str(out)]) == 0
    ids = torch.randint(1, 96, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    lm = hope_dist.from_pretrained(out)
    with torch.no_grad():
        full = lm.model(torch.tensor([ids]))[0]
    assert torch.equal(torch.cat([lm.logits(ids[a:b]) for a, b in ((0, 16), (16, 32), (32, 45))]), full)

    lm = hope_dist.from_pretrained(out, dtype=torch.float64)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():
        full = lm.model(torch.tensor([ids]))[0]
    close(torch.cat([lm.logits(ids[a:b]) for a, b in ((0, 5), (5, 23), (23, 24), (24, 45))]), full)
    lm.reset()
    logprobs = F.log_softmax(full, -1).gather(1, torch.tensor(ids[1:] + [0])[:, None])[:, 0]
    close(lm.score_ids(ids[:20]).logprobs, logprobs[:19])
    close(lm.score_ids(ids[20:30]).logprobs, logprobs[19:29])  # continues: ids[20] scored from ids[19]
    lm.reset()
    generated = lm.generate_ids(ids[:10], max_new_tokens=8)
    seq = ids[:10]
    with torch.no_grad():
        for _ in range(8):
            seq = seq + [int(lm.model(torch.tensor([seq]))[0, -1].argmax())]
    assert generated == seq[10:]


def test_text_scoring_and_sampling(trained, tmp_path, bpe_tokenizer):
    trainer, _, _ = trained
    out = tmp_path / "hf"
    convert.main(["export-hf", str(trainer.checkpointer.path(6)), str(out), "--tokenizer", str(bpe_tokenizer)])
    lm = hope_dist.from_pretrained(out)
    text = "the cat sat on the mat"
    score = lm.score(text)
    assert len(score.logprobs) == len(lm.tokenizer.encode(text).ids) - 1
    assert score.total < 0 and score.perplexity > 1
    runs = []
    for _ in range(2):
        lm.reset()
        runs.append(lm.generate_ids(lm.tokenizer.encode(text).ids, 12, temperature=0.8, top_k=20, seed=7))
    assert runs[0] == runs[1] and len(runs[0]) <= 12
    lm.reset()
    assert isinstance(lm.generate(text, max_new_tokens=5), str)


def test_import_with_base_resumes_identically(trained, random_dataset, tmp_path):
    """Export step 3 -> import into step 3's training state -> resume: the next-step loss and
    every later loss equal the original run's, and so do the final parameters."""
    trainer, run_dir, step3 = trained
    hf = tmp_path / "hf"
    assert convert.main(["export-hf", str(step3), str(hf)]) == 0
    new_run = tmp_path / "resumed"
    out = new_run / "checkpoints" / "step-3"
    assert convert.main(["import-hf", str(hf), str(out), "--base", str(step3)]) == 0
    resumed = make(random_dataset, new_run, **{"training.steps": 6, "checkpoint.interval": 3})
    resumed.train()
    ref, got = losses(run_dir), losses(new_run)
    assert sorted(got) == [3, 4, 5] and all(got[s] == ref[s] for s in got), (got, ref)
    for (n, p), q in zip(trainer.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n


def test_weights_only_import_starts_training_from_them(trained, random_dataset, tmp_path):
    trainer, _, step3 = trained
    hf = tmp_path / "hf"
    convert.main(["export-hf", str(step3), str(hf)])
    out = tmp_path / "weights"
    assert convert.main(["import-hf", str(hf), str(out)]) == 0
    fresh = make(random_dataset, tmp_path / "run", **{"checkpoint.resume": str(out)})
    fresh.maybe_resume()
    saved = read_flat(step3, "model.")
    assert fresh.step == 0
    for n, p in fresh.model.named_parameters():
        assert torch.equal(p, saved[f"model.{n}"]), n


def test_reshard_keeps_window_totals_and_resumes(trained, random_dataset, tmp_path):
    """dp=1 -> dp=2 -> dp=1: the clocks' pending window sums are split (total on rank 0) and
    folded back without loss; resuming the round trip matches the original run bit for bit."""
    trainer, run_dir, step3 = trained
    two = tmp_path / "dp2"
    assert convert.main(["reshard", str(step3), str(two), "--dp-shard", "2", "--tp", "2"]) == 0
    a, b = read_flat(step3, "clock."), read_flat(two, "clock.")
    key = "clock.dp0.acc.layers.1.cms.levels.2.mlp.down.weight"
    assert torch.equal(b[key], a[key]) and not b[key.replace("dp0", "dp1")].any()
    meta = json.loads((two / "meta.json").read_text())
    assert meta["layout"] == {"dp": 2, "tp": 2, "pp": 1} and meta["world_size"] == 4
    back = tmp_path / "run" / "checkpoints" / "step-3"
    assert convert.main(["reshard", str(two), str(back), "--dp-shard", "1", "--tp", "1"]) == 0
    resumed = make(random_dataset, tmp_path / "run", **{"training.steps": 6, "checkpoint.interval": 3})
    resumed.train()
    ref, got = losses(run_dir), losses(tmp_path / "run")
    assert all(got[s] == ref[s] for s in got) and sorted(got) == [3, 4, 5]


def test_reshard_rejects_impossible_layout(trained, tmp_path, capsys):
    _, _, step3 = trained
    assert convert.main(["reshard", str(step3), str(tmp_path / "x"), "--tp", "3"]) == 2
    assert "parallel.tp=3 does not divide model.n_heads=2" in capsys.readouterr().err


def test_inspect_reports_step_contents_and_verification(trained, capsys):
    _, run_dir, step3 = trained
    assert inspect_main([str(step3), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "step 3," in text and "verify: OK" in text
    assert "model.layers.0.mixer.mem_w1" in text and "(5, 2, 16, 16)" in text
    result = subprocess.run([sys.executable, "-m", "tools.inspect_ckpt", str(run_dir / "checkpoints")],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and "committed steps [3, 6]" in result.stdout and "step 6," in result.stdout


def test_broken_exported_folders_are_named(trained, tmp_path):
    trainer, _, step3 = trained
    hf = tmp_path / "hf"
    convert.main(["export-hf", str(step3), str(hf)])
    config = json.loads((hf / "config.json").read_text())
    weights = hf / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(PretrainedError, match=f"{weights}: unreadable"):
        hope_dist.from_pretrained(hf)
    weights.write_bytes(good)
    config["hope_dist"]["model"]["d_model"] = 48
    config["hope_dist"]["model"]["n_heads"] = 3
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="the weights do not fit the model config") as err:
        hope_dist.from_pretrained(hf)
    assert f"{weights} vs {hf / 'config.json'}" in str(err.value)
    assert "tok_embeddings.weight: stored (96, 32), config wants (96, 48)" in str(err.value)
    llama = {**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (hf / "config.json").write_text(json.dumps(llama))
    with pytest.raises(PretrainedError, match=f"{hf / 'config.json'}.*not another architecture"):
        hope_dist.from_pretrained(hf)
    with pytest.raises(PretrainedError, match="config.json: missing"):
        hope_dist.from_pretrained(tmp_path)


def test_convert_refuses_damaged_checkpoint(trained, tmp_path, capsys):
    _, _, step3 = trained
    broken = tmp_path / "step-3"
    shutil.copytree(step3, broken)
    (broken / "COMMITTED").unlink()
    assert convert.main(["consolidate", str(broken), str(tmp_path / "m.safetensors")]) == 2
    assert f"{broken / 'COMMITTED'}: missing" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="COMMITTED: missing"):
        convert.export_hf(str(broken), str(tmp_path / "hf"))
