"""experiments/studies.py: the §7 math on constructed cases, and the studies end to end on a tiny
model."""
import math

import pytest
import torch
from conftest import one_error_line

from experiments.studies import (delta_w_vs_w, projection_norm, right_singular_vectors,
                                 similarity_grid, subspace_similarity, top_directions)


def orthonormal(k, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))[0]


# ---------------------------------------------------------------- subspace similarity (§7.2)

def test_phi_is_one_for_identical_subspaces():
    U = orthonormal(32, 8, 0)
    for i in range(1, 9):
        assert subspace_similarity(U, U, i, i) == pytest.approx(1.0)
    # A different basis of the same span: phi depends on the subspace, not the basis.
    Q = orthonormal(8, 8, 1)
    assert subspace_similarity(U, U @ Q, 8, 8) == pytest.approx(1.0)
    # A subspace inside a bigger one is fully contained: phi = 1 (normalized by min(i, j)).
    assert subspace_similarity(U, U, 3, 8) == pytest.approx(1.0)


def test_phi_is_zero_for_orthogonal_subspaces():
    Q = orthonormal(32, 16, 2)
    assert subspace_similarity(Q[:, :8], Q[:, 8:], 8, 8) == pytest.approx(0.0, abs=1e-12)
    assert subspace_similarity(Q[:, :8], Q[:, 8:], 3, 5) == pytest.approx(0.0, abs=1e-12)


def test_phi_hand_computed_case():
    # span{e1, e2} against span{(e1 + e3)/sqrt2}: squared cosine 1/2, min(i, j) = 1.
    U1 = torch.eye(4, dtype=torch.float64)[:, :2]
    U2 = torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=torch.float64) / math.sqrt(2)
    assert subspace_similarity(U1, U2, 2, 1) == pytest.approx(0.5)
    assert subspace_similarity(U1, U2, 1, 1) == pytest.approx(0.5)
    # span{e1} against span{e2}: orthogonal.
    assert subspace_similarity(U1[:, 1:], U2, 1, 1) == pytest.approx(0.0)


def test_phi_always_in_unit_interval_and_grid_matches_pointwise():
    for seed in range(5):
        U1, U2 = orthonormal(16, 8, seed), orthonormal(16, 12, seed + 100)
        grid = similarity_grid(U1, U2)
        assert grid.shape == (8, 12)
        assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0 + 1e-12
        for i, j in [(1, 1), (3, 7), (8, 12), (8, 1)]:
            assert float(grid[i - 1, j - 1]) == pytest.approx(subspace_similarity(U1, U2, i, j))
    # A full basis contains everything: phi = 1 against it, whatever the other subspace.
    assert torch.allclose(similarity_grid(U1, orthonormal(16, 16, 9))[:, -1],
                          torch.ones(8, dtype=torch.float64))


def test_phi_rejects_out_of_range_indices():
    U = orthonormal(8, 4, 0)
    with pytest.raises(ValueError):
        subspace_similarity(U, U, 0, 1)
    with pytest.raises(ValueError):
        subspace_similarity(U, U, 1, 5)


def test_right_singular_vectors_of_A_span_its_row_space_in_order():
    # A = diag(3, 1) on the first two input coordinates of R^5: the right-singular vectors are
    # e1 (sigma 3) then e2 (sigma 1), up to sign.
    A = torch.zeros(2, 5)
    A[0, 0], A[1, 1] = 1.0, 3.0
    V = right_singular_vectors(A)
    assert V.shape == (5, 2)
    assert abs(float(V[1, 0])) == pytest.approx(1.0) and abs(float(V[0, 1])) == pytest.approx(1.0)
    # The span is A's row space, whatever B multiplies it by: phi with A's rows is 1.
    rows = torch.linalg.qr(A.T.double())[0]
    assert subspace_similarity(V, rows, 2, 2) == pytest.approx(1.0)


# ---------------------------------------------------------------- Delta W against W (§7.3)

def test_projection_norm_matches_hand_computation():
    W = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    e = torch.eye(3, dtype=torch.float64)
    # U^T W V picks the block of W in rows U, columns V.
    assert projection_norm(W, e[:, :1], e[:, :1]) == pytest.approx(1.0)
    assert projection_norm(W, e[:, :2], e[:, :2]) == pytest.approx(math.sqrt(1 + 4 + 9 + 16))
    assert projection_norm(W, e[:, 2:], e[:, :2]) == pytest.approx(0.0)
    # A rotated direction: u = (e1 + e2)/sqrt2, v = e2 -> (2 + 4)/sqrt2.
    u = (e[:, :1] + e[:, 1:2]) / math.sqrt(2)
    assert projection_norm(W, u, e[:, 1:2]) == pytest.approx(6 / math.sqrt(2))
    # Its own top-r directions give the norm of W's top-r singular values.
    s = torch.linalg.svdvals(W)
    assert projection_norm(W, *top_directions(W, 2)) == pytest.approx(float(s[:2].norm()))


def test_delta_w_vs_w_on_a_constructed_update():
    # W is diagonal with large values on coordinates 0..3 and tiny ones elsewhere; Delta W is a
    # rank-2 update on coordinates 6, 7, which W barely has: the amplification factor is large,
    # W's own directions project to its top singular values, Delta W's to W's tiny block.
    d = 8
    W = torch.diag(torch.tensor([10.0, 9.0, 8.0, 7.0, 0.5, 0.4, 0.3, 0.2], dtype=torch.float64))
    dW = torch.zeros(d, d, dtype=torch.float64)
    dW[6, 6], dW[7, 7] = 2.0, 1.0
    out = delta_w_vs_w(W, dW, r=2)
    assert out["proj_w"] == pytest.approx(math.hypot(10.0, 9.0))
    assert out["proj_delta_w"] == pytest.approx(math.hypot(0.3, 0.2))
    assert out["norm_w"] == pytest.approx(float(W.norm()))
    assert out["norm_delta_w"] == pytest.approx(math.sqrt(5))
    assert out["amplification"] == pytest.approx(math.sqrt(5) / math.hypot(0.3, 0.2))
    assert 0 <= out["proj_random"] <= out["proj_w"]


# ---------------------------------------------------------------- reading Delta W from a model

def test_delta_weight_and_base_weight_read_the_right_slices():
    """delta_weight must be exactly what merging adds to W_q / W_v / W_o, and base_weight the W0
    rows that the slice's LoRA adapts, merged or not (read through LoRALinear.slices)."""
    from experiments.studies import base_weight, delta_weight, lora_factors, lora_layer
    from lora import apply_lora, merge_lora
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    C = 16
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=C, block_size=16, vocab_size=64))
    fused = [block.attn.c_attn.weight.detach().clone() for block in m.h]
    apply_lora(m, rank=3, alpha=6, targets=("q", "v", "o"))
    for layer in m.h:  # B = 0 at init; give it values so that Delta W != 0
        for module in (layer.attn.c_attn, layer.attn.c_proj):
            for B in module.lora_B.values():
                torch.nn.init.normal_(B)
    names = [(i, n) for i in range(2) for n in "qvo"]
    before = {key: base_weight(m, *key).clone() for key in names}
    deltas = {key: delta_weight(m, *key) for key in names}
    for i in range(2):  # W_q and W_v are rows 0:C and 2C:3C of the fused c_attn
        assert torch.equal(before[(i, "q")], fused[i][:C])
        assert torch.equal(before[(i, "v")], fused[i][2 * C:])
        assert lora_layer(m, i, "o") is m.h[i].attn.c_proj
    A, B, s = lora_factors(m, 1, "v")
    assert A.shape == (3, C) and B.shape == (C, 3) and s == 2.0
    merge_lora(m)
    for (i, n), w0 in before.items():
        assert torch.equal(base_weight(m, i, n), w0), (i, n)  # W0 still, though merged
        module = lora_layer(m, i, n)
        start, stop = module.slices[n]
        added = module.weight.detach()[start:stop].double() - w0.double()
        assert torch.allclose(added, deltas[(i, n)].double(), atol=1e-5), (i, n)
    for i in range(2):  # W_k is not adapted: merging leaves its rows alone
        assert torch.equal(m.h[i].attn.c_attn.weight.detach()[C:2 * C], fused[i][C:2 * C])
    with pytest.raises(ValueError, match="no LoRA on W_k"):
        lora_factors(m, 0, "k")


# ---------------------------------------------------------------- figures and --help

def test_figures_name_the_run_and_the_weights_as_the_paper_does():
    import argparse

    from experiments.studies import TARGET_SETS, describe_run, rank_figure, types_figure

    args = argparse.Namespace(data="data/e2e", init="out/base", steps=60, batch_size=8)
    run = describe_run(args)
    assert run == "e2e, base model out/base: 60 steps x batch 8 per run"
    rec = {"val_loss": 2.0}
    rank = {"run": run, "title": "Table 6", "base": {"val_loss": 3.0},
            "full": {"val_loss": 1.5}, "lora": {name: {"1": rec, "4": rec} for name in TARGET_SETS}}
    fig = rank_figure(rank)
    assert fig.get_suptitle() == run
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["W_q", "W_q,W_v", "W_q,W_k,W_v,W_o", "base (no tuning)",
                      "full fine-tuning"]
    types = {"run": run, "title": "Table 5", "full": {"val_loss": 1.5},
             "rows": [{"targets": "q,k", "rank": 4, "val_loss": 2.0},
                      {"targets": "o", "rank": 8, "val_loss": 2.5}]}
    fig = types_figure(types)
    assert fig.get_suptitle() == run
    fig.canvas.draw()  # tick labels are filled in when drawn
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["W_q,W_k\nr=4", "W_o\nr=8"]


def test_help_has_no_none_default_and_every_option_explained():
    from experiments.studies import parser

    p = parser()
    text = p.format_help()
    assert "(default: None)" not in text  # --init is required: it has no default to show
    for action in p._actions:  # argparse keeps no public list of the options
        assert action.help, action.option_strings
        # a help that states its own default gets no second one from the formatter
        assert "default" not in action.help or action.default is None, action.option_strings
    assert "(default: 1,2,4,8,64)" in " ".join(text.split())  # as typed, not a Python list


# ---------------------------------------------------------------- the studies end to end

@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory):
    """E2E prepared from the shared CSVs into a temporary directory (nothing in data/ needed)."""
    from conftest import SHARED_DATA

    from data.e2e.prepare import prepare

    d = tmp_path_factory.mktemp("e2e")
    prepare(SHARED_DATA / "e2e", d)
    return d


# The smallest budget that still exercises every study: 3 steps per run, two ranks.
TINY = ["--quick", "--steps", "3", "--batch-size", "2", "--warmup", "1", "--eval-batches", "2",
        "--ranks", "1,4", "--budget-rank", "4", "--small-rank", "4", "--large-rank", "16",
        "--deltaw-ranks", "4", "--device", "cpu"]


def test_all_studies_end_to_end_on_a_tiny_model(tiny_base, e2e_dir, tmp_path, capsys):
    import json

    from experiments.studies import main

    out, res = tmp_path / "runs", tmp_path / "results"
    assert main(["all", "--init", str(tiny_base), "--data", str(e2e_dir), "--out", str(out),
                 "--results", str(res)] + TINY) == 0
    printed = capsys.readouterr().out
    for name in ("rank", "types", "subspace", "deltaw"):
        assert (res / f"{name}.json").exists() and f"({name}:" in printed
    for png in ("rank.png", "types.png", "subspace_ranks.png", "subspace_seeds.png"):
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rank = json.loads((res / "rank.json").read_text())
    assert rank["ranks"] == [1, 4] and set(rank["lora"]) == {"q", "qv", "qkvo"}
    losses = [rec["val_loss"] for by_r in rank["lora"].values() for rec in by_r.values()]
    assert all(math.isfinite(v) for v in losses + [rank["base"]["val_loss"]])
    # Trainable parameters are the paper's 2 x L x d x r (no biases trained): 2 layers, d = 32.
    assert rank["lora"]["qkvo"]["4"]["trainable"] == 2 * (2 * 4) * 32 * 4
    assert rank["full"]["trainable"] > 1_000_000

    types = json.loads((res / "types.json").read_text())
    assert {r["params"] for r in types["rows"]} == {types["budget"]} == {2 * 2 * 32 * 4}

    sub = json.loads((res / "subspace.json").read_text())
    for name in ("q", "v"):
        g = torch.tensor(sub["ranks"][name])
        assert g.shape == (4, 16) and 0 <= float(g.min()) and float(g.max()) <= 1 + 1e-4
        assert torch.tensor(sub["seeds"][name]).shape == (16, 16)
    assert torch.tensor(sub["seeds"]["random"]).shape == (16, 16)
    assert 0 < sub["summary"]["inputs_top1_energy_share"] <= 1
    for name in ("q", "v"):
        assert all(0 <= v <= 1 + 1e-9
                   for v in sub["summary"][name]["phi_A_top1_inputs_top1"].values())

    dw = json.loads((res / "deltaw.json").read_text())
    for name in ("q", "v"):
        for t in dw["by_rank"]["4"][name]:
            assert t["amplification"] == pytest.approx(t["norm_delta_w"] / t["proj_delta_w"])
            assert t["proj_w"] <= t["norm_w"] + 1e-9

    # A second call reuses every cached run: no training, identical numbers.
    assert main(["rank", "--init", str(tiny_base), "--data", str(e2e_dir), "--out", str(out),
                 "--results", str(res)] + TINY) == 0
    assert "run " not in capsys.readouterr().out
    assert json.loads((res / "rank.json").read_text())["lora"] == rank["lora"]


def test_initial_A_is_the_A_training_started_from(tiny_base, e2e_dir, tmp_path, monkeypatch):
    """§7.2's "how far A moved from its initialization" must compare with the A the run
    started from. On CUDA that A is drawn by the GPU's generator, which a CPU redraw with the
    same seed does not reproduce; here a model loaded for --device draws from a generator of
    its own (a seed of its own, the CPU stream untouched), as a CUDA model does."""
    from experiments import studies
    from experiments.studies import Runs, lora_factors, parser

    on_device, started = set(), {}
    real_load, real_apply, real_train = Runs.load_base, studies.apply_lora, studies.train

    def load_base(self, device):
        model = real_load(self, "cpu")
        if device != "cpu":
            on_device.add(id(model))
        return model

    def apply_lora(model, **kw):
        if id(model) not in on_device:
            return real_apply(model, **kw)
        with torch.random.fork_rng(devices=[]):  # the device's generator, not the CPU's
            torch.manual_seed(torch.initial_seed() + 12345)
            return real_apply(model, **kw)

    def train(model, *args, **kw):
        if getattr(model, "lora_config", None):
            started[model.lora_config["rank"]] = {
                n: lora_factors(model, 1, n)[0].clone() for n in ("q", "v")}
        return real_train(model, *args, **kw)

    monkeypatch.setattr(Runs, "load_base", load_base)
    monkeypatch.setattr(studies, "apply_lora", apply_lora)
    monkeypatch.setattr(studies, "train", train)
    args = parser().parse_args(["subspace", "--init", str(tiny_base), "--data", str(e2e_dir),
                                "--out", str(tmp_path)] + TINY)
    args.device = "the device"
    runs = Runs(args)
    runs.get(("q", "v"), 4, 0)
    for n in ("q", "v"):
        assert torch.equal(runs.initial_A(("q", "v"), 4, 0, 1, n), started[4][n]), n
    # and from the cache, in a later process: the trained run is not rerun
    started.clear()
    again = Runs(args)
    again.get(("q", "v"), 4, 0)
    assert not started
    assert torch.equal(again.initial_A(("q", "v"), 4, 0, 1, "q"),
                       runs.initial_A(("q", "v"), 4, 0, 1, "q"))


@pytest.mark.parametrize("case", ["missing base", "no steps"])
def test_bad_inputs_are_one_line_errors(case, tiny_base, e2e_dir, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    init, extra, want = {"missing base": (tmp_path / "nope", [], "nope"),
                         "no steps": (tiny_base, ["--steps", "0"], "--steps")}[case]
    r = subprocess.run([sys.executable, "-m", "experiments.studies", "rank", "--out", str(tmp_path),
                        "--init", str(init), "--data", str(e2e_dir)] + extra,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error:") and want in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_block_inputs_are_ln1_outputs_without_padding():
    from experiments.studies import block_inputs
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50257))
    x = torch.tensor([[5, 6, 7, 50256], [8, 9, 50256, 50256]])  # right-padded with PAD

    class Data:
        def eval_batches(self, batch_size, max_batches):
            yield x, x

    X = block_inputs(m, Data(), 1, 2, None)
    assert X.shape == (5, 16)  # 3 + 2 real tokens
    with torch.no_grad():
        h = m.drop(m.wte(x) + m.wpe(torch.arange(4)))
        h = m.h[1].ln_1(m.h[0](h))
    assert torch.allclose(X, h[x != 50256])


# ---------------------------------------------------------------- bad input, found up front

def error_line(capsys, argv) -> str:
    from experiments.studies import main
    return one_error_line(capsys, main, argv)


@pytest.mark.parametrize("flags, message", [
    (["--eval-batches", -1], "--eval-batches must be >= 0, got -1"),
    (["--lr", "inf"], "--lr must be > 0 (and finite), got inf"),
    (["--lr-full", 0], "--lr-full must be > 0"),
    (["--alpha", "nan"], "--alpha must be > 0"),
    (["--lora-dropout", 1], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--warmup", -1], "--warmup must be >= 0"),
    (["--block-size", 0], "--block-size must be >= 1, got 0"),
    (["--batch-size", 0], "--batch-size must be >= 1"),
    (["--steps", 0], "--steps must be >= 1"),
    (["--ranks", "1,0"], "--ranks must be >= 1, got 0"),
    (["--deltaw-ranks", "4,-4"], "--deltaw-ranks must be >= 1, got -4"),
    (["--small-rank", 0], "--small-rank must be >= 1"),
    (["--large-rank", 0], "--large-rank must be >= 1"),
    (["--layer", -1], "--layer must be >= 0"),
])
def test_flags_out_of_range_are_refused_before_anything_loads(capsys, tmp_path, flags, message):
    """--init names no model: the flag's error comes first, so nothing was loaded."""
    line = error_line(capsys, ["rank", "--init", tmp_path / "nope", "--out", tmp_path, *flags])
    assert message in line, line


@pytest.fixture
def no_runs(monkeypatch):
    """Any evaluation or training fails the test: settings that need the model are checked as
    soon as it is loaded, before the first run."""
    from experiments import studies
    def ran(*args, **kwargs):
        raise AssertionError("a run started before the bad input was found")

    monkeypatch.setattr(studies, "train", ran)
    monkeypatch.setattr(studies, "evaluate", ran)


@pytest.mark.parametrize("argv, message", [
    (["rank", "types", "--budget-rank", 6], "--budget-rank must be a multiple of 4 from 4 to "
                                            "n_embd = 32, got 6"),
    (["rank", "types", "--budget-rank", 64], "--budget-rank must be a multiple of 4"),
    (["rank", "deltaw", "--layer", 5], "--layer must be in 0..1, got 5"),
    (["rank", "subspace", "--small-rank", 64], "--small-rank must be at most n_embd = 32"),
    (["rank", "deltaw", "--deltaw-ranks", "4,1000"],
     "--deltaw-ranks must each be at most n_embd = 32, got 1000"),
])
def test_settings_that_need_the_model_are_checked_before_the_first_run(
        no_runs, tiny_base, e2e_dir, tmp_path, capsys, argv, message):
    line = error_line(capsys, [*argv, "--init", tiny_base, "--data", e2e_dir, "--out", tmp_path,
                               "--device", "cpu"])
    assert message in line, line


def test_unusable_out_or_results_is_found_before_the_base_loads(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    nope = tmp_path / "nope"  # no such base: an output error must come first
    line = error_line(capsys, ["rank", "--init", nope, "--out", tmp_path / "file"])
    assert line.startswith(f"error: --out {tmp_path / 'file'}: cannot write there"), line
    line = error_line(capsys, ["rank", "--init", nope, "--out", tmp_path / "o",
                               "--results", tmp_path / "file" / "r"])
    assert line.startswith(f"error: --results {tmp_path / 'file' / 'r'}: cannot write"), line
    line = error_line(capsys, ["rank", "--init", nope, "--out", tmp_path / "o"])
    assert "nope" in line and list((tmp_path / "o" / "runs").iterdir()) == []  # no probe left


def test_a_second_studies_run_on_the_same_out_is_refused(no_runs, tiny_base, e2e_dir, tmp_path,
                                                         capsys):
    """While another run holds --out (its lock), experiments/studies.py is one line, and nothing
    runs."""
    from support.runs import claim_out_dir, release_out_dir

    lock = claim_out_dir(tmp_path, resume=True, overwrite=False)
    try:
        line = error_line(capsys, ["rank", "--init", tiny_base, "--data", e2e_dir, "--out",
                                   tmp_path, "--device", "cpu"])
    finally:
        release_out_dir(lock)
    assert f"{tmp_path} is in use by another run" in line, line


def test_help_states_the_range_of_every_numeric_flag(capsys, tmp_path):
    """Every numeric flag's help names its range (common.help_with_range), and main refuses a
    value just outside it: the range --help states is the one checked. --budget-rank depends on
    the model (checked once it is loaded); its help says so."""
    from experiments import studies
    outside = {">= 1": "0", ">= 0": "-1", "> 0": "0", "[0, 1)": "1"}
    checked = set()
    for action in studies.parser()._actions:
        if action.type is None or action.dest == "budget_rank":  # typed: the numeric flags
            continue
        spec = next((s for s in outside if f"({s}" in action.help), None)
        assert spec, action.option_strings
        flag = action.option_strings[0]
        line = error_line(capsys, ["rank", "--init", tmp_path / "nope", "--out", tmp_path,
                                   flag, outside[spec]])
        assert f"{flag} must be" in line, line
        checked.add(action.dest)
    assert len(checked) == 14, checked  # block_size ... layer: all of them were reached
    helps = {a.dest: a.help for a in studies.parser()._actions}
    assert "multiple of 4" in helps["budget_rank"] and "below n_layer" in helps["layer"]
