"""finetune.py end to end on tiny models: only A and B train, the base stays bit-identical,
the adapter has the paper's |Θ| parameters, resume is exact, DDP ranks agree, bad input fails
in one line."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, one_error_line
from safetensors.torch import load_file

import finetune
import train
from data.datasets import data_from_args
from lora import lora_state_dict, paper_num_params
from model import GPT
from support.adapters import load_adapter
from support.common import tensors_digest

FAST = ["--eval-batches", "2", "--batch-size", "4", "--lr", "2e-3", "--warmup", "2",
        "--no-progress"]


@pytest.fixture(scope="module")
def scratch_base(tmp_path_factory, e2e_dir):
    """A tiny GPT written by train.py (here pretrained briefly on E2E text)."""
    out = tmp_path_factory.mktemp("scratch_base")
    train.main(["--data", str(e2e_dir), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                "--block-size", "128", "--batch-size", "4", "--max-iters", "3", "--warmup", "1",
                "--eval-batches", "1", "--out", str(out), "--no-progress"])
    return out


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_finetune_trains_only_a_and_b_and_leaves_the_base_bit_identical(tiny_base, e2e_dir,
                                                                       tmp_path):
    base_file = tiny_base / "model.safetensors"
    sha = _sha(base_file)
    out = tmp_path / "ft"
    finetune.main(["--init", str(tiny_base), "--data", str(e2e_dir), "--rank", "4",
                   "--max-iters", "8", "--eval-interval", "4", "--out", str(out), *FAST])
    log = _log(out)
    assert log[0]["step"] == 0 and log[-1]["step"] == 8
    assert log[-1]["val_loss"] < log[0]["val_loss"]  # on the target text only (eq. 2)
    assert _sha(base_file) == sha

    base = GPT.from_pretrained(tiny_base)
    tensors = load_file(out / "adapter.safetensors")
    assert all(".lora_" in k for k in tensors)
    n = sum(t.numel() for t in tensors.values())
    assert n == paper_num_params(base.config, 4, ("q", "v")) == 2 * 2 * 2 * 32 * 4  # 2·L̂·d·r
    assert n * 4 < (out / "adapter.safetensors").stat().st_size < n * 4 + 8192

    W0 = {k: v.clone() for k, v in base.state_dict().items()}
    load_adapter(base, out / "adapter.safetensors")
    for k, v in base.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, W0[k]), k  # the base weights are untouched, bit for bit
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # B moved from 0
    assert (out / "loss.png").exists()


def _interrupt_at(batch, train_data, val_data):
    """The data, except that drawing training batch number `batch` is a Ctrl-C."""
    class Interrupting(type(train_data)):
        def get_batch(self, batch_size, index=0, seed=0):
            if index == batch:
                raise KeyboardInterrupt
            return super().get_batch(batch_size, index, seed)
    train_data.__class__ = Interrupting
    return train_data, val_data


def test_resume_after_an_interrupt_repeats_no_step_and_loses_none(scratch_base, e2e_dir,
                                                                  tmp_path, monkeypatch):
    """`--out DIR --resume` and nothing else: the base, the data, LoRA's settings and the
    training settings (none of them the defaults here) come from the checkpoint."""
    args = ["--init", str(scratch_base), "--data", str(e2e_dir), "--max-iters", "6",
            "--ckpt-interval", "2", "--eval-interval", "3", "--log-interval", "1", "--rank", "2",
            "--alpha", "8", "--targets", "v,k", "--dropout", "0.1", "--bias", "lora_only",
            "--rslora", "--block-size", "96", "--label-smoothing", "0", *FAST]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    finetune.main(args + ["--out", str(whole)])
    with pytest.raises(KeyboardInterrupt):  # as Ctrl-C before step 5: saves, then exits
        with monkeypatch.context() as m:
            m.setattr(finetune, "data_from_args", lambda *a: _interrupt_at(4, *data_from_args(*a)))
            finetune.main(args + ["--out", str(parts)])
    assert torch.load(parts / "ckpt.pt", weights_only=True)["step"] == 4
    with open(parts / "log.jsonl", "a") as f:  # a hard kill may leave lines past the checkpoint
        f.write(json.dumps({"step": 5, "train_loss": 0.0}) + "\n")
    finetune.main(["--out", str(parts), "--resume", "--no-progress"])

    def strip(log):
        return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "train_s")} for h in log]
    assert [h["step"] for h in _log(parts)] == [0, 1, 2, 3, 4, 5, 6]
    assert strip(_log(parts)) == strip(_log(whole))  # the same losses, bit for bit
    a, b = load_file(whole / "adapter.safetensors"), load_file(parts / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stopped_run(scratch_base, e2e_dir, tmp_path_factory):
    """A finetune.py run of 4 steps stopped by a Ctrl-C after its checkpoint at step 2."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    argv = ["--init", str(scratch_base), "--data", str(e2e_dir), "--max-iters", "4",
            "--eval-interval", "2", "--rank", "2", "--targets", "q,v", "--out", str(out), *FAST]
    real = finetune.data_from_args
    finetune.data_from_args = lambda *a: _interrupt_at(2, *real(*a))
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune.main(argv)
    finally:
        finetune.data_from_args = real
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    return out


@pytest.mark.parametrize("flags, named", [
    (["--lr", "1e-3"], "--lr 0.001 (the run: 0.002)"),
    (["--rank=8"], "--rank 8 (the run: 2)"),
    (["--targets", "q,k,v"], "--targets q,k,v (the run: q,v)"),
    (["--init", "gpt2-xl"], "--init gpt2-xl (the run: "),  # refused before any download
    (["--max-iters", "5", "--seed", "1"], "--max-iters 5 (the run: 4), --seed 1 (the run: 1337)"),
])
def test_resume_refuses_an_explicit_flag_with_another_value_naming_it(stopped_run, capsys,
                                                                      flags, named):
    sha = _sha(stopped_run / "ckpt.pt")
    line = _error_line(capsys, ["--out", stopped_run, "--resume", *flags])  # no progress bar
    assert named in line and "--overwrite" in line, line
    assert _sha(stopped_run / "ckpt.pt") == sha


def test_resume_accepts_explicit_flags_equal_to_the_runs(stopped_run, e2e_dir, tmp_path):
    """Equal values are accepted, whatever their spelling (--targets v,q is q,v); a flag that
    only changes what is logged (--log-interval) may change."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    finetune.main(["--out", str(out), "--resume", "--lr", "0.002", "--rank", "2", "--targets",
                   "v,q", "--data", str(e2e_dir), "--max-iters", "4", "--log-interval", "1",
                   "--no-progress"])
    assert [h["step"] for h in _log(out)][-3:] == [2, 3, 4]


_RANKS_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
import finetune
from lora import lora_state_dict
model = finetune.finetune(finetune.parser().parse_args({argv!r}))
rank = torch.distributed.get_rank()
torch.save(lora_state_dict(model), {out!r} + f"/rank{{rank}}.pt")
torch.distributed.destroy_process_group()
"""


def test_torchrun_two_cpu_processes_end_with_identical_adapters(tiny_base, e2e_dir, tmp_path):
    """Under torchrun both processes hold the same adapter at the end (DDP all-reduces A and
    B's gradients), and rank 0 saved it."""
    out = tmp_path / "ddp"
    argv = ["--init", str(tiny_base), "--data", str(e2e_dir), "--max-iters", "3",
            "--eval-interval", "3", "--out", str(out), *FAST]
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT.format(root=str(ROOT), argv=argv, out=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    model = GPT.from_pretrained(tiny_base)
    load_adapter(model, out / "adapter.safetensors")
    assert tensors_digest(ranks[0]) == tensors_digest(ranks[1])
    assert tensors_digest(lora_state_dict(model)) == tensors_digest(ranks[0])  # what 0 saved
    assert _log(out)[-1]["step"] == 3


def _error_line(capsys, argv):
    return one_error_line(capsys, finetune.main, argv)


@pytest.mark.parametrize("extra, message", [
    (["--rank", "0"], "--rank must be >= 1, got 0"),
    (["--rank", "33"], "rank 33 is larger than"),
    (["--targets", "q,x"], "unknown LoRA targets"),
    (["--block-size", "256"], "outside 1..128, the model's n_positions"),
])
def test_bad_settings_end_in_one_line(tiny_base, e2e_dir, tmp_path, capsys, extra, message):
    argv = ["--init", str(tiny_base), "--data", str(e2e_dir), "--out", str(tmp_path), *extra]
    assert message in _error_line(capsys, argv)
    assert not (tmp_path / "adapter.safetensors").exists()


@pytest.mark.parametrize("flags, message", [
    (["--rank", "-2"], "--rank must be >= 1, got -2"),
    (["--alpha", "inf"], "--alpha must be > 0 (and finite), got inf"),
    (["--alpha", "nan"], "--alpha must be > 0"),
    (["--alpha", "0"], "--alpha must be > 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    (["--block-size", "0"], "--block-size must be >= 1, got 0"),  # not 'the maximum'
    (["--block-size", "-3"], "--block-size must be >= 1, got -3"),
    (["--max-iters", "0"], "--max-iters must be >= 1, got 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
])
def test_flags_out_of_range_are_refused_before_anything_loads(tmp_path, capsys, flags, message):
    """--init names no model: the flag's error comes first, so nothing was loaded."""
    line = _error_line(capsys, ["--init", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                                *flags])
    assert message in line, line
    assert not (tmp_path / "o").exists()


def test_a_warmup_longer_than_the_run_is_refused_naming_both_flags(tiny_base, e2e_dir, tmp_path,
                                                                   capsys):
    """--max-iters 200 with the paper's default warmup of 500 would never reach --lr."""
    out = tmp_path / "o"
    line = _error_line(capsys, ["--init", tiny_base, "--data", e2e_dir, "--max-iters", "200",
                                "--out", out])
    assert "--warmup 500" in line and "--max-iters 200" in line, line
    assert not out.exists()
    line = _error_line(capsys, ["--init", tiny_base, "--data", e2e_dir, "--epochs", "0.01",
                                "--out", out])  # a run of a few steps, from --epochs
    assert "--warmup 500" in line and "--epochs 0.01" in line, line


def test_help_states_the_range_of_every_numeric_lora_flag():
    helps = {a.dest: a.help for a in finetune.parser()._actions}
    for name, spec in finetune._FLAG_RANGES.items():
        if name != "block_size":  # data.datasets.add_data_args' flag
            assert f"({spec})" in helps[name], name


def test_bad_data_ends_in_one_line(tiny_base, tmp_path, capsys, monkeypatch):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"prompt": f"{i} ||", "completion": " x"}) + "\n"
                             for i in range(10)))
    base = ["--init", str(tiny_base), "--out", str(tmp_path / "o")]
    assert "fewer than one batch" in _error_line(capsys, base + ["--data", str(small),
                                                                 "--batch-size", "16"])
    import urllib.error
    import urllib.request

    from data.e2e import prepare as e2e

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(e2e, "HERE", tmp_path / "e2e")  # a checkout where e2e is not prepared,
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # and no network
    line = _error_line(capsys, base + ["--data", "e2e"])
    assert "run `python -m data.e2e --raw-dir DIR`" in line


def test_the_command_line_exits_non_zero_with_one_line(tiny_base, tmp_path):
    r = subprocess.run([sys.executable, "finetune.py", "--init", str(tmp_path / "missing")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such file" in r.stderr
