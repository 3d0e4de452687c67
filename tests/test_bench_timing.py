"""support/timing.py: the intervals against known values, the interleaved harness's order and
output (on a counting clock) and shared copies. No timing is asserted, only what the harness
returns."""
import itertools
import math

import pytest
import torch

from support import timing


# ---------------------------------------------------------------- intervals


def test_t_quantile_matches_the_published_table():
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (10, 2.228), (30, 2.042)):
        assert timing.t_quantile_975(df) == pytest.approx(t, rel=2e-3), df


def test_paired_ratio_is_a_t_interval_on_the_log_ratios():
    # log-ratios -0.1, 0, 0.1 on a drifting base: mean 0, sd 0.1, 3 rounds ->
    # exp(± t(0.975, 2) * 0.1 / sqrt(3)), t(0.975, 2) = 4.302653
    base = [0.010, 0.011, 0.012]
    arm = [b * math.exp(d) for b, d in zip(base, (-0.1, 0.0, 0.1))]
    ratio, ci = timing.paired_ratio(arm, base)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert ratio == pytest.approx(1.0)
    assert ci == pytest.approx([math.exp(-half), math.exp(half)], rel=1e-6)
    # a constant ratio 2: geometric mean 2, an interval of width 0
    assert timing.paired_ratio([2 * b for b in base], base) == (pytest.approx(2.0),
                                                                pytest.approx([2.0, 2.0]))
    assert timing.paired_ratio([0.02], [0.01]) == (pytest.approx(2.0), None)  # one round
    s = timing.summarize({"base": base, "arm": arm}, "base", per=2)
    assert s["base"]["ratio_to_base"] == 1.0 and s["base"]["ratio_ci95"] == [1.0, 1.0]
    assert s["arm"]["ratio_ci95"] == pytest.approx(ci)
    assert s["base"]["median_ms"] == pytest.approx(5.5)  # 11 ms per call, 2 items per call


# ---------------------------------------------------------------- the harness


def test_time_interleaved_warms_up_then_rotates_the_order_each_round():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    clock = itertools.count().__next__  # each timed call reads the clock twice: 1 "second"
    times = timing.time_interleaved(fns, rounds=4, warmup=2, sync=lambda: None, clock=clock)
    assert calls[:6] == list("aabbcc")  # warmup: each arm, untimed
    assert "".join(calls[6:]) == "abc" "bca" "cab" "abc"  # no arm always first
    assert times == {k: [1, 1, 1, 1] for k in "abc"}  # one time per round per key


def test_shared_copy_shares_the_weights_not_the_modules():
    from conftest import tiny_gpt

    model = tiny_gpt()
    copy = timing.shared_copy(model)
    for (name, p), q in zip(model.named_parameters(), copy.parameters()):
        assert p is q, name  # the same tensors, so the same storage
    assert copy.h[0] is not model.h[0]
    copy.h[0].attn.extra = torch.nn.Linear(2, 2)  # a module added to the copy only
    assert not hasattr(model.h[0].attn, "extra")
