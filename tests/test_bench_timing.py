"""support/timing.py: the intervals against known values, the interleaved harness's order and
output (on a counting clock), shared copies, peak training memory in a fresh process, and
inference_ratios and cached decoding on tiny models of every kind bench.py times (plain, LoRA
merged, adapters, prefix tuning). No timing is asserted, only what the harness returns."""
import itertools
import math

import pytest
import torch

from lora import apply_lora, merge_lora
from support import timing
from support.decoding import generate
from support.methods import apply_method

SEP = 7  # the tiny prefix models' separator (support.prefix.SEPARATOR is beyond 128 tokens)
NBYTES = 64 * 2 ** 20  # what the memory probe's step allocates


def tiny_models():
    """A tiny base and its arms, sharing its weights as bench.py's do: name -> model (eval)."""
    from conftest import tiny_gpt

    base = tiny_gpt()
    lora = apply_lora(timing.shared_copy(base))
    with torch.no_grad():  # B = 0 at init: make the merge change the weights
        for p in lora.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    merge_lora(lora)
    prefix = dict(separator=SEP, init_tokens=[3, 4, 5])
    return {"base": base, "lora_merged": lora.eval(),
            "adapter_h": apply_method(timing.shared_copy(base), "adapter_h", bottleneck=4),
            "pre_embed": apply_method(timing.shared_copy(base), "pre_embed", l_p=2, l_i=3,
                                      **prefix),
            "pre_layer": apply_method(timing.shared_copy(base), "pre_layer", l_p=3, l_i=2,
                                      **prefix)}


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


# ---------------------------------------------------------------- peak memory


def _allocating_step(nbytes):
    """peak_training_memory's build (module level: pickled to the fresh process): a step that
    writes a tensor of nbytes, so that all of it is resident."""
    def step():
        return torch.ones(nbytes // 4).sum()
    return step


def _failing_build():
    raise ValueError("no model to build here")


def test_peak_training_memory_counts_what_the_step_allocates_and_nothing_of_this_process():
    held = torch.ones(2 * NBYTES // 4)  # this process's: not in the fresh one  # noqa: F841
    res = timing.peak_training_memory(_allocating_step, NBYTES, steps=2, threads=1)
    assert set(res) == {"peak_bytes", "memory_method"}
    assert NBYTES <= res["peak_bytes"] < 2 * NBYTES, res
    assert res["memory_method"].endswith("before build")


def test_an_error_in_the_memory_probe_is_an_oserror_with_its_message():
    with pytest.raises(OSError, match="ValueError: no model to build here"):
        timing.peak_training_memory(_failing_build)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        timing.peak_training_memory(_failing_build, steps=0)


# ---------------------------------------------------------------- inference latency of models


def test_inference_ratios_times_every_kind_of_model_against_the_base():
    models = tiny_models()
    models["adapter_h"].train()  # left as it came: in training mode
    res = timing.inference_ratios(models, seq=16, prompt=8, tokens=3, rounds=2, warmup=1)
    assert set(res) == set(models)
    keys = {"forward_ratio", "forward_ci95", "decode_ratio", "decode_ci95", "forward_ms",
            "decode_ms_per_token"}
    for name, r in res.items():
        assert set(r) == keys, name
        assert r["forward_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["decode_ratio"] > 0
        lo, hi = r["forward_ci95"]
        assert lo <= r["forward_ratio"] <= hi, name
    b = res["base"]
    assert (b["forward_ratio"], b["decode_ratio"]) == (1.0, 1.0)
    assert b["forward_ci95"] == b["decode_ci95"] == [1.0, 1.0]
    assert models["adapter_h"].training and not models["pre_layer"].training


def test_inference_ratios_needs_room_for_the_prefix_positions():
    models = tiny_models()  # block_size 64; the prefix models take 5 positions
    assert timing.context_positions(models["pre_embed"]) == 5
    assert timing.context_positions(models["adapter_h"]) == 0
    with pytest.raises(ValueError, match="pre_embed: seq 60 .* 5 positions .* block_size 64"):
        timing.inference_ratios(models, seq=60, prompt=8, tokens=2, rounds=1)
    with pytest.raises(ValueError, match="base 'none' is not among"):
        timing.inference_ratios(models, "none")


@torch.no_grad()
def test_cached_decoding_of_a_prefix_model_equals_its_forward_without_cache():
    """The timed decoding is real decoding: after the prefill, its last logits are those of one
    forward over prompt + tokens, every call alike (the cache is rewound each time)."""
    model = tiny_models()["pre_layer"]
    model.prefix.activations.normal_()  # special tokens that matter
    g = torch.Generator().manual_seed(1)
    prompt = timing.end_with_separator(torch.randint(0, 128, (1, 10), generator=g),
                                       {"m": model})
    assert prompt[0, -1] == SEP
    tokens = torch.randint(0, 128, (4, 1, 1), generator=g)
    decode = timing.cached_decoder(model, prompt, tokens)
    full = model(torch.cat([prompt, tokens.view(1, -1)], dim=1))  # (1, 14, vocab)
    for _ in range(2):
        torch.testing.assert_close(decode()[:, -1], full[:, -1])
    # and greedy generation with the cache chooses what it chooses without one
    torch.testing.assert_close(generate(model, prompt, 6, greedy=True),
                               generate(model, prompt, 6, greedy=True, use_cache=False))
