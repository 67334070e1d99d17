"""training.carry_state's parts: packed rows that carry state across segments equal one long call
(model/carry.py), rows that do not continue start afresh, and the data stream reads lanes."""
import numpy as np
import pytest
import torch

from helpers import write_indexed_dataset
from hope_dist.data import build_train_stream
from hope_dist.model import document_segments
from test_model import tiny

EOD = 0


def packed_rows(T: int) -> torch.Tensor:
    """Three rows of 2T tokens whose documents cross the middle (row 0 after an EOD at 7, which starts
    its second document at a multiple of proj_chunk_size, as a continued call counts chunks from its
    start), end exactly at it (row 1) or span the whole row (row 2)."""
    tok = torch.randint(1, 64, (3, 2 * T))
    tok[0, 7] = EOD
    tok[0, T + 5] = EOD
    tok[1, T - 1] = EOD
    tok[1, T + 10] = EOD
    return tok


@pytest.mark.parametrize("mixer, kw", [("selfmod", {}), ("titans", {}), ("selfmod", {"momentum": True}),
                                       ("selfmod", {"memory_inputs": "per_memory_conv", "retain_init": "true"})],
                         ids=["selfmod", "titans", "selfmod-momentum", "selfmod-options"])
def test_packed_segments_with_carried_state_equal_one_call(mixer, kw):
    model = tiny(mixer, **kw)
    T = 16
    tok = packed_rows(T)
    full = model(tok, document_segments(tok, EOD))
    a, b = tok[:, :T], tok[:, T:]
    first, state = model(a, document_segments(a, EOD), return_state=True)
    carry = a[:, -1] != EOD  # row 1 ended its document: its next segment starts afresh
    second, _ = model(b, document_segments(b, EOD, carry), state=state, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixer", ["selfmod", "titans"])
def test_rows_that_do_not_continue_start_afresh(mixer):
    model = tiny(mixer, momentum=True)
    tok = packed_rows(16)
    _, state = model(tok[:, :16], document_segments(tok[:, :16], EOD), return_state=True)
    b = tok[:, 16:]
    fresh = model(b, document_segments(b, EOD))
    carry = torch.tensor([False, True, False])
    mixed = model(b, document_segments(b, EOD, carry), state=state)
    torch.testing.assert_close(mixed[[0, 2]], fresh[[0, 2]], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(mixed[1, :10], fresh[1, :10])  # row 1's first document continued
    torch.testing.assert_close(mixed[1, 11:], fresh[1, 11:], rtol=1e-10, atol=1e-10)  # its second is fresh


def test_in_context_cms_rows_that_do_not_continue_start_afresh():
    model = tiny("selfmod", cms_in_context="true", cms="[{width: 64, period: 1, chunk_size: 8}]")
    tok = packed_rows(16)
    _, state = model(tok[:, :16], return_state=True)
    b = tok[:, 16:]
    carry = torch.tensor([False, True, True])
    mixed = model(b, document_segments(b, None, carry), state=state)
    torch.testing.assert_close(mixed[0], model(b[:1])[0], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(mixed[1], model(b[1:2])[0])


def lane_stream(prefix, dp_rank=0, dp_size=1, gb=4, seq_len=8, groups=1):
    return build_train_stream([str(prefix)], None, seq_len=seq_len, global_batch=gb, dp_rank=dp_rank,
                              dp_size=dp_size, seed=3, eod_id=EOD, lanes=True, lane_groups=groups)


@pytest.fixture(scope="module")
def lane_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 50, size=int(rng.integers(5, 40))), EOD) for _ in range(40)]
    return write_indexed_dataset(tmp_path_factory.mktemp("lanes") / "ds", docs)


def test_lanes_continue_row_by_row_and_split_over_ranks(lane_data):
    s = lane_stream(lane_data)
    steps = s.datasets[0].per_epoch // 4
    batches = [s.next_batch() for _ in range(steps + 1)]
    assert (batches[0]["prev"] == -1).all() and (batches[steps]["prev"] == -1).all()  # each epoch's start
    for prev, nxt in zip(batches[:steps - 1], batches[1:steps]):
        assert torch.equal(nxt["tokens"][:, 0], prev["labels"][:, -1])  # the row's next segment
        assert torch.equal(nxt["prev"], prev["tokens"][:, -1])
    ranks = [lane_stream(lane_data, r, 2) for r in range(2)]
    for step in range(3):
        halves = [r.next_batch() for r in ranks]
        for key in ("tokens", "prev"):
            assert torch.equal(torch.cat([h[key] for h in halves]), batches[step][key])


def test_lane_groups_take_turns_and_each_continues_its_own_lanes(lane_data):
    """data.lane_groups=3: step s reads group s % 3, whose rows continue step s - 3's, while consecutive
    steps read other lanes; the dp ranks split each step as they split one group."""
    s = lane_stream(lane_data, groups=3)
    assert s.lanes == 12
    steps = s.datasets[0].per_epoch // 4
    batches = [s.next_batch() for _ in range(steps + 3)]
    assert [b["group"] for b in batches[:7]] == [0, 1, 2, 0, 1, 2, 0]
    assert all((b["prev"] == -1).all() for b in batches[:3] + batches[steps:steps + 3])  # each lane's start
    for prev, nxt in zip(batches[:steps - 3], batches[3:steps]):
        assert torch.equal(nxt["tokens"][:, 0], prev["labels"][:, -1])
        assert torch.equal(nxt["prev"], prev["tokens"][:, -1])
    nexts = [b["tokens"][:, 0] for b in batches[1:steps]]
    assert not all(torch.equal(n, b["labels"][:, -1]) for n, b in zip(nexts, batches[:steps - 1]))
    ranks = [lane_stream(lane_data, r, 2, groups=3) for r in range(2)]
    for step in range(5):
        halves = [r.next_batch() for r in ranks]
        assert halves[0]["group"] == halves[1]["group"] == batches[step]["group"]
        for key in ("tokens", "prev"):
            assert torch.equal(torch.cat([h[key] for h in halves]), batches[step][key])


def test_lanes_need_one_dataset(lane_data):
    from hope_dist.errors import DataError
    with pytest.raises(DataError, match="reads one dataset, but data.paths holds 2"):
        build_train_stream([str(lane_data)] * 2, None, seq_len=8, global_batch=4, dp_rank=0, dp_size=1,
                           seed=3, eod_id=EOD, lanes=True)


def test_trainer_carries_each_micro_batch_and_resumes_only_its_own_layout(random_dataset, tmp_path, caplog):
    from helpers import make_trainer

    run = {"training.carry_state": True, "training.steps": 3, "checkpoint.interval": 3}
    trainer = make_trainer(random_dataset, tmp_path / "a", **run)
    trainer.train()
    assert sorted(trainer.carried.states) == ["g0m0", "g0m1"]  # global_batch 4 in micro-batches of 2
    memory = trainer.carried.states["g0m1"][0]["memory"]
    assert memory.w2.shape[0] == 2 and not memory.w2.requires_grad
    same = make_trainer(random_dataset, tmp_path / "a", **{**run, "training.steps": 4})
    same.maybe_resume()
    for key, state in trainer.carried.states.items():
        assert torch.equal(same.carried.states[key][0]["memory"].w2, state[0]["memory"].w2)
    other = make_trainer(random_dataset, tmp_path / "a", **{**run, "training.micro_batch": 1})
    other.maybe_resume()
    assert other.step == 3 and other.carried.states == {} and "starts afresh" in caplog.text
    grouped = make_trainer(random_dataset, tmp_path / "a", **{**run, "data.lane_groups": 2})
    grouped.maybe_resume()
    assert grouped.carried.states == {}


def test_each_lane_group_keeps_its_own_state(random_dataset, tmp_path):
    """data.lane_groups=2: steps 0 and 2 read group 0, step 1 group 1; each group's rows start from the
    state the group's previous step left, so the two groups end in different states."""
    from helpers import make_trainer

    run = {"training.carry_state": True, "training.steps": 3, "data.lane_groups": 2}
    trainer = make_trainer(random_dataset, tmp_path / "a", **run)
    trainer.train()
    assert sorted(trainer.carried.states) == ["g0m0", "g0m1", "g1m0", "g1m1"]
    assert trainer.data.lanes == 8
    g0, g1 = (trainer.carried.states[f"g{g}m0"][0]["memory"].w2 for g in (0, 1))
    assert not torch.equal(g0, g1)


def test_carry_state_needs_a_recurrent_mixer():
    from hope_dist.config import load_config
    from hope_dist.config import ConfigError

    with pytest.raises(ConfigError, match="training.carry_state=true needs a recurrent model.mixer"):
        load_config("configs/tiny.yaml", ["--model.mixer=attention", "--training.carry_state=true"])


def test_lane_groups_need_lanes():
    from hope_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.lane_groups=4 groups lanes, but the data is shuffled"):
        load_config("configs/tiny.yaml", ["--data.lane_groups=4"])
    with pytest.raises(ConfigError, match="data.lane_groups.*must be >= 1"):
        load_config("configs/tiny.yaml", ["--data.lane_groups=0", "--training.carry_state=true"])


def test_lanes_without_carried_state(random_dataset, tmp_path):
    """data.order=lanes alone: the lane order with every row starting fresh (the control of carry_state)."""
    from helpers import make_trainer

    trainer = make_trainer(random_dataset, tmp_path, **{"data.order": "lanes"})
    assert trainer.carried is None and trainer.data.lanes == 4
