"""bench/cost_model.py: collective formulas, exact bytes, the netns reproduction, layout errors."""
from __future__ import annotations

import statistics

import pytest

from bench import cost_model as cm
from hope_dist.config import ConfigError

IB = cm.CLUSTERS["h100-ib"]


def test_collectives_by_hand():
    # flat ring all-reduce of 1 GB over 4 GPUs of a node: 2 (p - 1) steps of (lat + N / p / bw)
    assert cm.all_reduce(1e9, cm.Group(4, 1), IB) == pytest.approx(6 * (3e-6 + 1e9 / 4 / 450e9), rel=1e-12)
    # 8 GB reduce-scatter over 8 GPUs x 4 nodes: 7 NVLink steps of 1 GB, then 3 steps of 0.25 GB over
    # the node's NIC (400 Gbit/s x 0.9 efficiency) that its 8 GPUs share
    nic = 400e9 / 8 * 0.9 / 8
    expected = 7 * (3e-6 + 8e9 / 8 / 450e9) + 3 * (5e-6 + 8e9 / 32 / nic)
    assert cm.reduce_scatter(8e9, cm.Group(8, 4), IB) == pytest.approx(expected, rel=1e-12)
    assert cm.all_gather(8e9, cm.Group(8, 4), IB) == cm.reduce_scatter(8e9, cm.Group(8, 4), IB)
    assert cm.all_reduce(123.0, cm.Group(1, 1), IB) == 0.0
    assert cm.wire_bytes(100, 4, "all_reduce") == 150 and cm.wire_bytes(100, 4, "reduce_scatter") == 75


def test_fit_link_recovers_alpha_beta():
    rows = [{"bytes": n, "s": 2 * 1e-3 + n / 118e6} for n in (2**26, 4, 2**20, 2**24)]
    link = cm.fit_link(rows)
    assert link.bw == pytest.approx(118e6, rel=1e-9) and link.lat == pytest.approx(1e-3 + 2 / 118e6, rel=1e-9)


@pytest.fixture(scope="module")
def cal():
    return cm.load_calibration()


def test_bytes_equal_the_stacks_bytes_reduced(cal):
    """The model's window-average bytes_reduced = the stack's metric, measured in the 2-rank
    runs (BucketSync's real buckets), to the byte; and |base| + sum_l |theta_l| / P_l."""
    cluster = cm.netns_cluster(cal)
    for name, periods in (("clocked", (1, 4, 16, 64)), ("all_period_1", (1, 1, 1, 1))):
        config, over = cm.netns_config(cal, periods)
        p = cm.predict(config, cm.Layout(2, 1, 1, "ddp"), cluster, compute_s=0.0, overrides=over)
        measured = statistics.fmean(r["bytes"] for r in cal["runs"][name]["steps"])
        assert p.bytes_reduced_avg == pytest.approx(measured, rel=1e-9), name
        s = cm.model_sizes(config, over)
        formula = 4 * sum(s.group_total(g) / p for g, p in zip(s.periods, (1, *periods)))
        assert p.bytes_reduced_avg == pytest.approx(formula, rel=1e-12)
    # FSDP's reduce-scatter input per rank is the same whole (unsharded) gradient
    p = cm.predict(config, cm.Layout(2, 1, 1, "fsdp"), cluster, compute_s=0.0, overrides=over)
    assert p.bytes_reduced_avg == pytest.approx(formula, rel=1e-12)


def test_reproduces_the_netns_runs_within_15_percent(cal):
    for row in cm.validate(cal):
        assert abs(row["predicted_s"] / row["measured_s"] - 1) <= 0.15, row
        assert abs(row["predicted_comm_s"] / row["measured_comm_s"] - 1) <= 0.15, row


def test_clocked_gain_and_worst_step(cal):
    config, over = cm.netns_config(cal, (1, 4, 16, 64))
    cluster = cm.netns_cluster(cal)
    c = cm.predict(config, cm.Layout(2, 1, 1, "ddp"), cluster, True, 0.1, over)
    f = cm.predict(config, cm.Layout(2, 1, 1, "ddp"), cluster, False, 0.1, over)
    assert c.step_avg < f.step_avg
    assert c.step_worst == pytest.approx(f.step_avg)  # every level ticks: the all-periods-1 step


def test_layout_errors_name_the_argument_and_the_fix():
    with pytest.raises(ConfigError, match=r"--layout dp=4,tp=4,pp=1: dp x tp x pp = 16.*32 GPUs.*dp=8"):
        cm.check_layout(cm.Layout(4, 4, 1), IB, cm.load_config(cm.ROOT / "configs/hope_760m.yaml"))
    with pytest.raises(ConfigError, match=r"--layout tp=16: .*inside one node of 8 GPUs.*raise dp or pp"):
        cm.check_layout(cm.Layout(2, 16, 1), IB, cm.load_config(cm.ROOT / "configs/hope_1b3.yaml"))
    with pytest.raises(ConfigError, match=r"engine=zero3: use one of ddp, fsdp, zero1, zero2"):
        cm.check_layout(cm.Layout(32, 1, 1, "zero3"), IB, cm.load_config(cm.ROOT / "configs/hope_760m.yaml"))
    with pytest.raises(ConfigError, match=r"--layout 'dp=8,tp': 'tp' is not KEY=VALUE"):
        cm.parse_layout("dp=8,tp")
    assert cm.parse_layout("dp=8,tp=4,pp=1,engine=zero2,ac=1") == cm.Layout(8, 4, 1, "zero2",
                                                                            activation_checkpoint=True)
