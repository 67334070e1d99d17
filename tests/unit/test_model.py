"""Model-level properties on top of the memory op's own tests: sizes, causality, document
resets (conv + memory state + attention mask), batch independence, carried state."""
import pytest
import torch

from hope_dist.config import load_config
from hope_dist.model import HopeModel, build_model, count_parameters, document_segments

MIXERS = ["selfmod", "titans", "attention"]


def tiny(mixer, **kw):
    overrides = [f"--model.mixer={mixer}", "--model.vocab_size=64", "--model.d_model=32",
                 "--model.n_heads=2", "--model.chunk_size=4", "--model.proj_chunk_size=8"]
    overrides += [f"--model.{k}={v}" for k, v in kw.items()]
    torch.manual_seed(0)
    model = build_model(load_config("configs/tiny.yaml", overrides).model).double()
    return model


@pytest.mark.parametrize("name, target", [("hope_760m", 760e6), ("hope_1b3", 1.3e9),
                                          ("transformer_1b3", 1.3e9)])
def test_reference_sizes_within_5_percent(name, target):
    cfg = load_config(f"configs/{name}.yaml")
    with torch.device("meta"):
        total = count_parameters(HopeModel(cfg.model))["total"]
    assert abs(total - target) / target < 0.05, total


@pytest.mark.parametrize("mixer", MIXERS)
def test_causal(mixer):
    model = tiny(mixer)
    tok = torch.randint(1, 64, (2, 24))
    out = model(tok)
    t = 13
    tok2 = tok.clone()
    tok2[:, t + 1:] = torch.randint(1, 64, (2, 24 - t - 1))
    out2 = model(tok2)
    assert torch.equal(out[:, :t + 1], out2[:, :t + 1])
    assert not torch.allclose(out[:, t + 1:], out2[:, t + 1:])


@pytest.mark.parametrize("mixer", MIXERS)
def test_state_resets_at_document_boundary(mixer):
    """A row [doc A, EOD, doc B] gives doc B the logits of doc B alone."""
    model = tiny(mixer)
    eod = 0
    a = torch.randint(1, 64, (1, 11))
    b = torch.randint(1, 64, (1, 19))
    row = torch.cat([a, torch.tensor([[eod]]), b], dim=1)
    packed = model(row, document_segments(row, eod))
    alone_b = model(b)
    alone_a = model(torch.cat([a, torch.tensor([[eod]])], dim=1))
    torch.testing.assert_close(packed[:, 12:], alone_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed[:, :12], alone_a, rtol=1e-10, atol=1e-10)
    # without resets the second document sees the first
    assert not torch.allclose(model(row)[:, 12:], alone_b)


@pytest.mark.parametrize("mixer", MIXERS)
def test_batch_equals_per_sequence(mixer):
    model = tiny(mixer)
    tok = torch.randint(1, 64, (3, 20))
    tok[1, 7] = 0
    out = model(tok, document_segments(tok, 0))
    for i in range(3):
        row = tok[i:i + 1]
        torch.testing.assert_close(out[i:i + 1], model(row, document_segments(row, 0)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("momentum", [False, True])
def test_two_segments_with_carried_state_equal_one(mixer, momentum):
    model = tiny(mixer, momentum=momentum)
    tok = torch.randint(1, 64, (2, 32))
    full = model(tok)
    first, state = model(tok[:, :16], return_state=True)
    second, _ = model(tok[:, 16:], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-10, atol=1e-10)


OPTIONS = [{"memory_inputs": "per_memory"}, {"memory_inputs": "per_memory_conv"}, {"retain_init": "true"},
           {"memory_inputs": "per_memory", "retain_init": "true"}, {"proj_rate": "0", "memory_depth": "1"},
           {"rate_norm": "true"}, {"rates_from": "input", "memory_inputs": "per_memory"}, {"w2_delta": "false"}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o))
def test_memory_options_keep_the_contract(options):
    """docs/model.md section 2.10's options: carried state equals one long call, documents reset, and
    per-memory inputs give selfmod four input projections (per_memory) or four convolutions of one (_conv)."""
    model = tiny("selfmod", **options)
    tok = torch.randint(1, 64, (2, 32))
    first, state = model(tok[:, :16], return_state=True)
    second, _ = model(tok[:, 16:], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), model(tok), rtol=1e-10, atol=1e-10)
    row = torch.cat([tok[:1, :9], torch.zeros(1, 1, dtype=torch.long), tok[1:, :13]], dim=1)
    torch.testing.assert_close(model(row, document_segments(row, 0))[:, 10:], model(tok[1:, :13]),
                               rtol=1e-10, atol=1e-10)
    mixer, per = model.layers["0"].mixer, {"a_k", "a_v", "a_eta", "a_alpha"}
    kind = options.get("memory_inputs", "shared")
    assert set(mixer.proj) == ({*per, "q", "g"} if kind == "per_memory" else {"a", "q", "g"})
    assert set(mixer.conv) == ({"a", "q"} if kind == "shared" else {*per, "q"})


def probe(model, tok) -> dict:
    mixer = model.layers["0"].mixer
    mixer.probe_health = True
    with torch.no_grad():
        model(tok)
    return mixer.health


def test_probes_show_shared_inputs_ask_for_identity_writes_and_no_write_ablation_stays_at_m0():
    """kv_cos: with one shared input, k and v of HOPE's near-identity memories point the same way
    (the diagnosis of docs/RECALL.md); per-memory convolutions separate them. eta_max = 0 with
    retention toward M_0 (bench_quality's hope-nowrite) leaves every memory exactly at M_0."""
    tok = torch.randint(1, 64, (1, 32))
    assert probe(tiny("selfmod"), tok)["kv_cos"] > 0.95
    assert abs(probe(tiny("selfmod", memory_inputs="per_memory_conv"), tok)["kv_cos"]) < 0.5
    assert probe(tiny("selfmod", eta_max=0.0, retain_init="true"), tok)["write_rel"] < 1e-6  # probes run in fp32
    assert probe(tiny("selfmod", eta_max=0.0), tok)["write_rel"] > 0.05  # retention alone decays M_0


def test_meta_init_is_finite_and_seeded():
    cfg = load_config("configs/tiny.yaml").model
    torch.manual_seed(3)
    m1 = build_model(cfg)
    torch.manual_seed(3)
    m2 = build_model(cfg)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.isfinite(p1).all(), n
        assert torch.equal(p1, p2), n
    assert not any(p.is_meta for p in m1.parameters())



@pytest.mark.parametrize("mixer", ["selfmod", "titans"])
def test_memory_init_knobs(mixer):
    """model.memory_w1_std, memory_w2_std and alpha_init set the memories' initial W1, W2 and retention; the
    defaults keep init_std, 1/sqrt(d_h) and 0.99 (the spec's near-identity memories)."""
    default, tuned = (tiny(mixer, **kw).layers["0"].mixer
                      for kw in ({}, {"memory_w1_std": 0.5, "memory_w2_std": 0.6, "alpha_init": 0.999}))
    alpha_b = (lambda m: m.alpha_b) if mixer == "selfmod" else (lambda m: m.rates["alpha"].bias)
    assert torch.sigmoid(alpha_b(default)).allclose(torch.tensor(0.99, dtype=torch.float64))
    assert torch.sigmoid(alpha_b(tuned)).allclose(torch.tensor(0.999, dtype=torch.float64))
    assert default.mem_w1.std().item() == pytest.approx(0.02, rel=0.2)
    assert tuned.mem_w1.std().item() == pytest.approx(0.5, rel=0.2)
    assert default.mem_w2.std().item() == pytest.approx(default.head_dim ** -0.5, rel=0.2)
    assert tuned.mem_w2.std().item() == pytest.approx(0.6, rel=0.2)
    from hope_dist.config import ConfigError
    for bad, match in (("--model.alpha_init=1.0", "model.alpha_init=1.0 must be in (0, 1)"),
                       ("--model.memory_w1_std=0", "model.memory_w1_std=0.0 must be > 0"),
                       ("--model.memory_w2_std=-1", "model.memory_w2_std=-1.0 must be > 0")):
        with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
            load_config("configs/tiny.yaml", [bad])

def test_tied_embeddings_stay_tied_after_meta_init():
    cfg = load_config("configs/tiny.yaml", ["--model.tie_embeddings=true"]).model
    model = build_model(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    untied = build_model(load_config("configs/tiny.yaml").model)
    assert count_parameters(model)["norms_and_head"] < count_parameters(untied)["norms_and_head"]


@pytest.mark.parametrize("mixer", ["selfmod", "titans"])
@pytest.mark.parametrize("momentum", [False, True])
def test_memories_stay_finite_on_repetitive_text_at_init(mixer, momentum):
    """Code repeats (indentation, runs of one token): the same key many times in a chunk, whose
    inner gradient is taken at the chunk start and does not shrink as the memory moves. The
    initial rates must keep that from overshooting (the momentum is an EMA, so its step is eta too)."""
    cfg = load_config("configs/tiny.yaml", [f"--model.mixer={mixer}", f"--model.momentum={momentum}"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    pattern = torch.randint(1, cfg.vocab_size, (3,))
    tok = torch.cat([pattern.repeat(40), torch.randint(1, cfg.vocab_size, (8,))])[None]
    tok = torch.cat([tok, torch.full((1, 128), 7)], dim=0)  # one token repeated
    out = model(tok)
    assert torch.isfinite(out).all()
    assert out.abs().max() < 100


@pytest.mark.parametrize("options, v_learns", [({}, False), ({"selfgen_values": "false"}, True),
                                               ({"stopgrad_vhat": "false"}, True)])
def test_value_memory_learns_only_through_undetached_targets(options, v_learns):
    """v enters the op only through the targets vhat: with self-generated targets detached (the spec's
    default) M_v's initial weights get no outer gradient at all (docs/model.md 2.3); the other memories do."""
    model = tiny("selfmod", **options)
    model(torch.randint(1, 64, (2, 32))).sum().backward()
    grad = model.layers["0"].mixer.mem_w2.grad.flatten(1).norm(dim=1)  # per memory: k, v, eta, alpha, o
    assert (grad[1] > 1e-6) == v_learns
    assert all(grad[i] > 1e-8 for i in (0, 2, 3, 4))
