"""bench.py and support/baselines.py: the adapter baselines (parameter counts, identity at init,
placement), every arm's forward (the prefix arms' too), the FLOP count against torch's counter,
the verdicts on constructed rounds, the plan and progress lines, and the CLI end to end on a
tiny model. The timing harness and the intervals are tested in test_bench_timing.py. No timing
is asserted: timings are what bench.py reports, not what it must get."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from model import GPT, GPTConfig, KVCache
from support import baselines, timing

ROOT = Path(bench.__file__).resolve().parent
TINY = GPTConfig(**bench.MODELS["tiny"])


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**bench.MODELS["tiny"], **kw})).eval()


@pytest.mark.parametrize("kind", ["H", "L"])
@pytest.mark.parametrize("n_layer,n_embd,m", [(2, 32, 1), (2, 32, 7), (3, 48, 20)])
def test_adapter_parameter_counts_match_formula(kind, n_layer, n_embd, m):
    model = tiny(n_layer=n_layer, n_embd=n_embd, n_head=4)
    before = model.num_params()
    baselines.add_adapters(model, kind, m)
    C, L = n_embd, n_layer
    formula = L * 2 * (2 * C * m + m + C) if kind == "H" else L * (2 * C * m + m + 3 * C)
    assert baselines.adapter_param_count(kind, L, C, m) == formula
    assert baselines.adapter_params(model) == formula
    assert model.num_params() - before == formula  # nothing else was added


def test_unknown_adapter_kind_is_refused():
    for call in (lambda: baselines.add_adapters(tiny(), "P", 4),
                 lambda: baselines.adapter_param_count("P", 2, 32, 4)):
        with pytest.raises(ValueError, match="unknown adapter kind"):
            call()


@pytest.mark.parametrize("kind", ["H", "L"])
@pytest.mark.parametrize("target", [500_000, 11_000_000])
def test_bottleneck_is_the_nearest_to_the_target_count(kind, target):
    # GPT-2 medium, the model of the paper's Table 1, at its two adapter sizes
    L, C = 24, 1024
    m = baselines.bottleneck_for(kind, L, C, target)
    err = abs(baselines.adapter_param_count(kind, L, C, m) - target)
    assert err <= abs(baselines.adapter_param_count(kind, L, C, m + 1) - target)
    assert m == 1 or err <= abs(baselines.adapter_param_count(kind, L, C, m - 1) - target)


def test_adapters_sit_where_the_papers_put_them():
    h = baselines.add_adapters(tiny(), "H", 4)
    for block in h.h:  # Houlsby: after attention's output projection and after the MLP
        assert isinstance(block.attn.c_proj, baselines.Then)
        assert isinstance(block.mlp.c_proj, baselines.Then)
        assert isinstance(block.attn.c_proj.adapter.ln, torch.nn.Identity)
    lin = baselines.add_adapters(tiny(), "L", 4)
    for block in lin.h:  # Lin: one adapter with its own LayerNorm on the block's output
        assert isinstance(block, baselines.Then)
        assert isinstance(block.adapter.ln, torch.nn.LayerNorm)
        assert not isinstance(block.module.attn.c_proj, baselines.Then)
    # The Lin adapter sees the block's output: checked by value on one block
    x = torch.randn(2, 5, TINY.n_embd)
    seen = []
    lin.h[0].adapter.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        lin.h[0](x)
        torch.testing.assert_close(seen[0], lin.h[0].module(x), rtol=0, atol=0)


@torch.no_grad()
def test_every_arm_gives_base_shapes_and_adapters_start_as_identity():
    base = tiny()
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    idx[:, -1] = bench.prefix_settings(TINY, 16)["separator"]  # where the prefix arms' infix goes
    unmerged = bench.build_arm(base, "lora_unmerged", seed=3)
    before_merge = unmerged(idx)
    assert (before_merge - base(idx)).abs().max() > 1e-4  # random A, B: not the identity
    arms = bench.Arms(base, bench.ARMS, seed=3).get(3000)
    # All arms share the base weights; the merged arm merged W0 + BA into them, so the base arm
    # now computes exactly what the merged arm does, and that is the unmerged arm's function
    for a, model in arms.items():
        assert model.wte.weight is base.wte.weight, a
    ref = base(idx)
    torch.testing.assert_close(arms["lora_merged"](idx), ref, rtol=0, atol=0)
    torch.testing.assert_close(ref, before_merge, rtol=1e-4, atol=1e-4)
    for a, model in arms.items():
        out = model(idx)
        assert out.shape == (2, 12, TINY.vocab_size), a
        if a.startswith("adapter_"):  # up-projection zero at init: exactly the base model
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        # decoding with the KV cache works in every arm, one token at a time
        cache = KVCache(model.config, 2, 13, "cpu", torch.float32)
        model(idx, cache=cache)
        assert model(idx[:, :1], cache=cache, last_only=True).shape == (2, 1, TINY.vocab_size)
    # and the adapters are on the forward path: a non-zero up-projection changes the logits
    for a in ("adapter_H", "adapter_L"):
        for m in arms[a].modules():
            if isinstance(m, baselines.Adapter):
                m.up.weight.normal_()
        assert (arms[a](idx) - ref).abs().max() > 1e-3, a
    # the prefix arms: their special tokens are attended to, and take 16 positions
    for a in bench.PREFIX_ARMS:
        assert (arms[a](idx) - ref).abs().max() > 1e-3, a
        assert timing.context_positions(arms[a]) == 16
        assert arms[a].method_config["l_p"] == 8 and arms[a].method_config["l_i"] == 8


def test_prefix_settings_split_prefix_and_infix_and_fit_the_vocabulary():
    s = bench.prefix_settings(TINY, 5)
    assert (s["l_p"], s["l_i"]) == (2, 3)
    assert all(0 <= t < TINY.vocab_size for t in (s["separator"], *s["init_tokens"]))
    from support.prefix import INIT_TOKENS, SEPARATOR
    gpt2 = GPTConfig(**bench.MODELS["gpt2"])  # GPT-2's vocabulary: support/prefix.py's own ids
    assert bench.prefix_settings(gpt2, 16)["separator"] == SEPARATOR
    assert bench.prefix_settings(gpt2, 16)["init_tokens"] == list(INIT_TOKENS)


def test_arms_are_built_once():
    arms = bench.Arms(tiny(), bench.ARMS)
    small, large = arms.get(2000), arms.get(3000)
    assert all(small[a] is large[a] for a in ("base", "lora_merged", "lora_unmerged",
                                              *bench.PREFIX_ARMS))
    assert all(small[a] is not large[a] for a in ("adapter_H", "adapter_L"))
    assert all(arms.get(2000)[a] is small[a] for a in bench.ARMS)


@pytest.mark.parametrize("kind", ["forward", "train", "lora_train"])
def test_flop_count_matches_torch_counter(kind):
    """6N + 12LHQT per token (nanoGPT's estimate_mfu), 4N when the weights are frozen, a third
    of it for a forward: within the biases' and LayerNorms' share of torch's own count (the
    math attention backend, so attention's matmuls are counted too)."""
    from lora import apply_lora

    model = tiny().train()
    n = bench.counted_params(model)
    if kind == "lora_train":
        apply_lora(model, **bench.PAPER_LORA)
    B, T = 2, 64
    idx = torch.randint(0, TINY.vocab_size, (B, T))
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        if kind == "forward":
            with torch.no_grad():
                model(idx)
        else:
            model(idx, idx).backward()
    est = B * T * bench.flops_per_token(TINY, n, T, kind)
    assert abs(est / fc.get_total_flops() - 1) < 0.03


def run_bench(*args, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_run_writes_every_arm_and_figure(tmp_path):
    out = tmp_path / "out.json"
    r = run_bench("--quick", "--model", "tiny", "--adapter-params", "3k", "--rounds", "2",
                  "--warmup", "1", "--decode-tokens", "2", "--train-rounds", "1",
                  "--mem-steps", "1", "--threads", "1", "--profile", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for part in (res["forward"][0], res["decode"]):  # --profile: where each arm's time went
        assert set(part["profile"]) == set(bench.ARMS)
        assert all(ops and ops[0]["op"].startswith("aten::") for ops in part["profile"].values())
    keys = {"mean_ms", "std_ms", "ratio_to_base", "ratio_ci95", "extra_params", "positions"}
    for part in (res["forward"][0], res["decode"]):
        assert set(part["arms"]) == set(bench.ARMS)
        for a, s in part["arms"].items():
            assert keys <= set(s) and s["mean_ms"] > 0
            # the prefix arms take --prefix-tokens (default 16) positions of the context
            assert s["positions"] == (16 if a in bench.PREFIX_ARMS else 0), a
            lo, hi = s["ratio_ci95"]  # two rounds: an interval around the ratio
            assert lo <= s["ratio_to_base"] <= hi
        assert part["arms"]["base"]["ratio_to_base"] == 1.0
        assert part["arms"]["base"]["ratio_ci95"] == [1.0, 1.0]
    f = res["forward"][0]
    assert (f["batch"], f["seq"]) == (1, 128) and 0 < f["base_mfu"]
    assert res["decode"]["base_bandwidth_share"] > 0 and res["decode"]["base_gemv_share"] > 0
    assert res["machine"]["matmul_flops"] > 0 and res["machine"]["gemv_bandwidth"] > 0
    tr = res["train"]["arms"]
    assert tr["lora"]["trainable_params"] < tr["full"]["trainable_params"]
    for s in tr.values():
        assert s["peak_bytes"] > 0 and s["tokens_per_s"] > 0 and s["mfu"] > 0
    assert {t["target"] for t in res["targets"]} == {t[0] for t in bench.CLAIMS}
    for t in res["targets"]:
        assert t["verdict"] in ("met", "missed", "within noise")
    # the ratios' intervals are in the JSON and printed: one round trip through the report
    timed = {t["target"]: t for t in res["targets"]}["train: lora step time / full"]
    assert timed["ci95"] is None and res["train"]["arms"]["lora"]["ratio_ci95"] is None  # 1 round
    merged = {t["target"]: t for t in res["targets"]}["decode 1 token: lora_merged / base"]
    lo, hi = merged["ci95"]
    assert f"decode 1 token: lora_merged / base: {merged['value']:.3f} [{lo:.3f}, {hi:.3f}]" \
        in r.stdout
    assert "lora_unmerged" in r.stdout and "MISS" not in r.stdout
    assert res["prefix"] == dict(tokens=16, l_p=8, l_i=8)
    # the report's arm tables have a positions column: 16 on the prefix arms' rows
    tables = [line.split() for line in r.stdout.splitlines() if " spends one call in" not in line]
    assert sum(row[:4] == ["arm", "extra", "params", "positions"] for row in tables) == 2
    for a in bench.PREFIX_ARMS:
        rows = [row for row in tables if row and row[0] == a]
        assert len(rows) == 2 and all(row[2] == "16" for row in rows), a
    assert all(row[2] == "0" for row in tables if row and row[0] == "adapter_H")
    # Before any measurement, one line with the plan; then a line as each measurement
    # completes, before the report.
    lines = r.stdout.splitlines()
    assert lines[0].startswith("bench.py: tiny shape") and "2 rounds" in lines[0]
    report = next(i for i, line in enumerate(lines) if line.startswith("Targets"))
    progress = ["forward 1x128: base", "decode, per token: base", "training peak memory, full",
                "training peak memory, lora", "training step: full"]
    at = [next(i for i, line in enumerate(lines) if want in line) for want in progress]
    assert at == sorted(at) and 0 < at[0] and at[-1] < report
    assert res["seconds"] > 0


def test_help_shows_every_option_and_the_shared_machine_settings():
    p = bench.parser()
    text = p.format_help()
    assert "(default: None)" not in text
    for action in p._actions:  # argparse keeps no public list of the options
        if action.help is argparse.SUPPRESS:
            continue
        assert action.help, action.option_strings
        assert "default" not in action.help or action.default is None, action.option_strings
    # the settings for a shared machine are said in the heading of the run's group
    assert "run (on a shared or busy machine: --clock cpu --threads 1)" in text


def plan_args(**kw):
    a = dict(device="cpu", dtype="float32", threads=2, clock="wall", rounds=10, warmup=2,
             profile=False, decode_prompt=128, decode_tokens=8, train_batch=2, train_seq=128,
             train_rounds=3, mem_steps=2, peak_flops=1e11, gemv_bandwidth=1e10)
    return argparse.Namespace(**{**a, **kw})


def test_plan_line_says_what_runs_and_in_which_settings():
    shapes = [(1, 128)]
    line = bench.plan_line(plan_args(), "tiny", bench.ARMS, shapes, set())
    assert "forward 1x128" in line and "decode 8 tokens" in line and "train 2x128" in line
    assert "2 threads, wall clock" in line and f"{len(bench.ARMS)} arms x 10 rounds" in line
    line = bench.plan_line(plan_args(clock="cpu", threads=1), "tiny", bench.ARMS, shapes,
                           {"decode", "train"})
    assert "1 threads, cpu clock" in line
    assert "decode" not in line and "train" not in line


def test_bad_input_is_one_line_error():
    r = run_bench("--model", "tiny", "--shapes", "3y4")
    assert r.returncode == 1
    assert r.stderr.startswith("error:") and "BATCHxSEQ" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,msg", [
    (["--arms", "base,prefix"], "unknown"),
    (["--adapter-params", "lots"], "--adapter-params"),
    (["--skip", "everything"], "--skip"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--shapes", "1x999"], "longer than"),
    (["--adapter-params", "1M"], "wider than n_embd"),
])
def test_bad_input_raises_value_error(args, msg):
    with pytest.raises(ValueError, match=msg):
        bench.main(["--model", "tiny", "--skip", "decode,train", "--rounds", "1", *args])


def test_init_loads_real_weights_in_every_process(tiny_base, tmp_path):
    """--init reaches the memory probes too: they train the same checkpoint (its parameter
    count differs from the tiny shape's)."""
    out = tmp_path / "out.json"
    r = run_bench("--init", str(tiny_base), "--quick", "--skip", "forward,decode",
                  "--train-rounds", "1", "--train-seq", "32", "--mem-steps", "1", "--threads", "1",
                  "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    n = GPT.from_pretrained(tiny_base).num_params()
    assert res["params"] == n
    assert res["train"]["arms"]["full"]["trainable_params"] == n


@pytest.fixture
def no_measuring(monkeypatch):
    """Any measurement fails the test: bad input must be found before the first one."""
    def measured(*args, **kwargs):
        raise AssertionError("a measurement ran before the bad input was found")

    for name in ("matmul_flops", "read_bandwidth", "gemv_bandwidth", "time_interleaved"):
        monkeypatch.setattr(bench, name, measured)


@pytest.mark.parametrize("args, error, msg", [
    (["--warmup", "-1"], ValueError, "--warmup must be >= 0, got -1"),
    (["--threads", "0"], ValueError, "--threads must be >= 1, got 0"),
    (["--mem-steps", "0"], ValueError, "--mem-steps must be >= 1, got 0"),
    (["--adapter-params", "inf"], ValueError, "--adapter-params 'inf': give a count"),
    (["--adapter-params", "-5"], ValueError, "--adapter-params '-5': give a count"),
    (["--shapes", "1x128,1x999"], ValueError, "--shapes 1x999: sequence length 999"),
    (["--skip", "forward", "--decode-prompt", "500"], ValueError, "exceeds the model's"),
    (["--train-seq", "512"], ValueError, "--train-seq 512 is too long"),
    (["--prefix-tokens", "0"], ValueError, "--prefix-tokens must be >= 1, got 0"),
    # the prefix arms' positions must fit beside the sequences: 500 + 16 > 512
    (["--shapes", "1x500"], ValueError, r"1x500: sequence length 500 \+ 16 positions of the "
                                        r"prefix arms \(--prefix-tokens\) is longer than"),
    (["--skip", "forward", "--decode-prompt", "490"], ValueError,
     r"--decode-tokens \+ 16 positions of the prefix arms \(--prefix-tokens\) = 522 exceeds"),
])
def test_bad_input_is_found_before_any_measurement(no_measuring, args, error, msg):
    with pytest.raises(error, match=msg):
        bench.main(["--model", "tiny", "--rounds", "1", *args])


def test_without_prefix_arms_the_whole_context_is_the_sequences(no_measuring):
    """--shapes 1x500 leaves too little room for the prefix arms' 16 positions (above), but is
    fine without them: the checks pass and the first measurement is reached."""
    with pytest.raises(AssertionError, match="a measurement ran"):
        bench.main(["--model", "tiny", "--rounds", "1", "--arms", "base,lora_merged",
                    "--shapes", "1x500"])


def test_an_unusable_json_path_is_found_before_any_measurement(no_measuring, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"--json .*file/out.json: cannot write it"):
        bench.main(["--model", "tiny", "--json", str(tmp_path / "file" / "out.json")])
    with pytest.raises(OSError, match="--json .*: cannot write it .a directory is in the way"):
        bench.main(["--model", "tiny", "--json", str(tmp_path)])
    # a usable path passes (the probe leaves nothing there): the first measurement is reached
    with pytest.raises(AssertionError, match="a measurement ran"):
        bench.main(["--model", "tiny", "--json", str(tmp_path / "new" / "out.json")])
    assert list((tmp_path / "new").iterdir()) == []


def test_help_states_the_range_of_every_numeric_flag():
    """Every int flag's help names its range (common.help_with_range), and main refuses a value
    outside it: the range --help states is the one checked."""
    below = {">= 1": 0, ">= 0": -1, "[0, 2**32)": -1}
    for action in bench.parser()._actions:
        if action.type is not int:
            continue
        spec = next((s for s in below if f"({s})" in action.help), None)
        assert spec, action.option_strings
        flag = action.option_strings[0]
        with pytest.raises(ValueError, match=f"{flag} must be"):
            bench.main(["--model", "tiny", flag, str(below[spec])])


def rounds_with_ratios(ratios, base_s=0.01):
    """Per-round times of a base arm and another arm whose paired ratios are the given ones."""
    base = [base_s * (1 + 0.1 * (i % 3)) for i in range(len(ratios))]  # the machine drifts
    return {"base": base, "arm": [b * r for b, r in zip(base, ratios)]}


@pytest.mark.parametrize("ratios, op, bound, want", [
    ([1.027 + 0.05 * d for d in (-1, 1, -0.5, 0.5, 0, -1, 1, 0.2, -0.2, 0)], "<=", 1.01,
     "within noise"),  # straddles the bound
    ([1.05 + 0.002 * d for d in (-1, 1, 0, 0.5, -0.5)], "<=", 1.01, "missed"),  # clearly above
    ([0.99 + 0.002 * d for d in (-1, 1, 0, 0.5, -0.5)], "<=", 1.01, "met"),  # clearly below
    ([0.61 + 0.005 * d for d in (-1, 1, 0)], "<=", 0.65, "met"),
    ([0.70 + 0.002 * d for d in (-1, 1, 0)], ">=", 0.60, "met"),
    ([0.50 + 0.002 * d for d in (-1, 1, 0)], ">=", 0.60, "missed"),
    ([0.61 + 0.1 * d for d in (-1, 1, 0)], ">=", 0.60, "within noise"),
])
def test_verdict_on_constructed_rounds(ratios, op, bound, want):
    s = timing.summarize(rounds_with_ratios(ratios), "base")["arm"]
    assert bench.verdict(s["ratio_to_base"], s["ratio_ci95"], bound, op) == want


def test_verdict_without_an_interval_is_met_or_missed():
    assert bench.verdict(0.36, None, 0.40, "<=") == "met"
    assert bench.verdict(0.42, None, 0.60, ">=") == "missed"


def test_noise_around_a_target_is_not_reported_as_missed(capsys):
    """Merged LoRA is the base model's computation: rounds whose paired ratios average 1.027
    with a wide spread (the issue's 'MISS decode 1 token: lora_merged / base: 1.027') are noise,
    not a miss; a real regression (tight rounds at 1.05) still is."""
    noisy = [1.027 + 0.05 * d for d in (-1, 1, -0.5, 0.5, 0, -1, 1, 0.2, -0.2, 0)]
    slow = [1.05 + 0.002 * d for d in (-1, 1, 0, 0.5, -0.5, 0, 1, -1, 0.2, -0.2)]
    base = rounds_with_ratios(noisy)["base"]
    times = {"base": base, "lora_merged": rounds_with_ratios(noisy)["arm"],
             "lora_unmerged": [b * r * 1.06 for b, r in zip(base, slow)]}
    arms = timing.summarize(times, "base")
    for s in arms.values():
        s["extra_params"] = 0
    res = dict(model="tiny", params=1, dtype="float32", clock="cpu", seconds=1.0,
               machine=dict(device="cpu", threads=1, cpu="x", torch="2", matmul_flops=1e9,
                            read_bandwidth=1e9, gemv_bandwidth=1e9, load_average_start=None,
                            load_average_end=None),
               decode=dict(arms=arms, prompt=8, tokens=2, base_bandwidth_share=0.7,
                           base_gemv_share=0.8))
    res["targets"] = bench.check_targets(res)
    bench.print_report(res)
    out = capsys.readouterr().out
    merged = next(line for line in out.splitlines() if "decode 1 token: lora_merged" in line)
    assert "MISS" not in merged and "missed" not in merged and "within noise" in merged
    assert ": 1.026 [1.001, 1.052] (target <= 1.01)" in merged  # geometric mean, interval
    unmerged = next(line for line in out.splitlines() if "decode 1 token: lora_unmerged" in line)
    assert "missed" in unmerged  # 1.05 * 1.06 ~ 1.11 with a narrow interval: a real miss
    by_name = {t["target"]: t for t in res["targets"]}
    t = by_name["decode 1 token: lora_merged / base"]
    assert t["verdict"] == "within noise" and t["ci95"][0] < 1.01 < t["ci95"][1]
