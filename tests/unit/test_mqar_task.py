"""The trained MQAR task (hope_dist/synthetic/mqar.py): Zoology's layout, answers only where queries are."""
import numpy as np
import pytest

from hope_dist.synthetic.mqar import IGNORE, MQARSetting, mqar_batch


def test_layout_queries_and_answers():
    s = MQARSetting(seq_len=64, pairs=6, vocab_size=128)
    x, y = mqar_batch(s, 50, np.random.default_rng(0))
    assert x.shape == y.shape == (50, 64)
    assert int(x.min()) >= 0 and int(x.max()) < 128
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0:12:2], row_x[1:12:2]
        assert len(set(keys)) == 6 and all(1 <= k < 64 for k in keys) and all(64 <= v < 128 for v in values)
        asked = [(t, lab) for t, lab in enumerate(row_y) if lab != IGNORE]
        assert len(asked) == 6, "one answer per key"
        assert all(t >= 12 and (t - 12) % 2 == 0 for t, _ in asked), "queries sit at even offsets after the pairs"
        binding = dict(zip(keys, values))
        assert sorted(row_x[t] for t, _ in asked) == sorted(keys)
        assert all(binding[row_x[t]] == lab for t, lab in asked), "the label is the queried key's value"


def test_fresh_seeds_give_fresh_examples_and_same_seed_repeats():
    s = MQARSetting(seq_len=32, pairs=4, vocab_size=256)
    a, _ = mqar_batch(s, 8, np.random.default_rng([0, 1]))
    b, _ = mqar_batch(s, 8, np.random.default_rng([0, 2]))
    c, _ = mqar_batch(s, 8, np.random.default_rng([0, 1]))
    assert (a == c).all() and not (a == b).all()


def test_short_gaps_are_favoured():
    """The power law puts most queries soon after the pairs (Zoology's power_a = 0.01)."""
    s = MQARSetting(seq_len=256, pairs=8, vocab_size=1024)
    _, y = mqar_batch(s, 200, np.random.default_rng(0))
    pos = np.nonzero(y.numpy() != IGNORE)[1] - 16
    assert np.mean(pos < 60) > 0.5


@pytest.mark.parametrize("kw, match", [(dict(seq_len=30, pairs=8), "seq_len must be even and >= 4 \\* pairs"),
                                       (dict(seq_len=64, pairs=4, vocab_size=64), "vocab_size=64: needs > seq_len")])
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        MQARSetting(**kw)
