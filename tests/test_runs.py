"""A run's guards (support/runs.py, train.train): nothing non-finite saved as good, Ctrl-C honoured
at a step boundary whatever it interrupts (resume then exact), output directories claimed and locked,
--resume refused with other settings, log.jsonl strict JSON."""
import json
import os
import signal

import pytest
import torch
from conftest import tiny_gpt, toy_examples

import train
from data.datasets import Examples
from lora import apply_lora, lora_state_dict
from support.runs import TrainingDiverged, claim_out_dir, release_out_dir


def _model():
    return apply_lora(tiny_gpt(n_layer=1, n_head=2, n_embd=16, block_size=32).train(), rank=2)


CFG = dict(lr=1e-2, warmup=2, max_iters=6, eval_interval=3, ckpt_interval=2, log_interval=1,
           batch_size=4, eval_batches=2, progress=False, label_smoothing=0.1)


def _run(out, data=None, model=None, val=None, **kw):
    """A LoRA run into `out`; -> (history, the adapter's tensors)."""
    model = model or _model()
    saved = {}
    history = train.train(model, data or toy_examples(), val or toy_examples(4, seed=1),
                          train.TrainConfig(**{**CFG, **kw.pop("cfg", {})}), out,
                          save=lambda m, d: saved.update(lora_state_dict(m)), **kw)
    return history, {k: v.clone() for k, v in lora_state_dict(model).items()}


def _log(out):
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in log.jsonl"))
            for line in (out / "log.jsonl").read_text().splitlines()]


def _strip(log):
    return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "train_s")} for h in log]


def test_weights_that_became_nonfinite_are_never_saved(tmp_path):
    """A huge learning rate (1e39: finite as a Python float, inf in fp32) makes the weights
    non-finite in the first update: the run stops at its first checkpoint, saving nothing. (An
    infinite --lr is refused up front.)"""
    saved = []
    with pytest.raises(TrainingDiverged, match=r"after step 1"):  # weights or validation
        train.train(_model(), toy_examples(), toy_examples(4), train.TrainConfig(
            **{**CFG, "lr": 1e39, "warmup": 0, "max_iters": 1}), tmp_path,
            save=lambda m, d: saved.append(1))
    assert not saved and not (tmp_path / "ckpt.pt").exists()


class _SigintAt:
    """Sends this process a real SIGINT (a Ctrl-C) once, from inside one phase of step 3."""

    def __init__(self, phase):
        self.phase, self.fired = phase, False

    def fire(self, phase, step):
        if phase == self.phase and step == 3 and not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("phase", ["data", "forward", "backward", "optimizer", "validation"])
def test_ctrl_c_in_any_phase_stops_at_the_step_boundary_and_resume_is_exact(tmp_path, phase,
                                                                            monkeypatch):
    whole_history, whole = _run(tmp_path / "whole")
    ctrl_c, step = _SigintAt(phase), {"n": 0}

    class Data(Examples):
        def get_batch(self, batch_size, index=0, seed=0):
            step["n"] = index + 1  # batch size x 1 accum x 1 process: batch number = step
            ctrl_c.fire("data", step["n"])
            return super().get_batch(batch_size, index, seed)

        def eval_batches(self, batch_size, max_batches=None):
            for b in super().eval_batches(batch_size, max_batches):
                ctrl_c.fire("validation", step["n"])
                yield b

    base, v = toy_examples(), toy_examples(4, seed=1)
    data = Data(base.tokens, base.index, base.block_size, base.name)
    val = Data(v.tokens, v.index, v.block_size, v.name)
    optimizer_step = torch.optim.AdamW.step

    def step_with_sigint(self, *a, **k):  # inside the optimizer step, between two parameters
        ctrl_c.fire("optimizer", step["n"])
        return optimizer_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_with_sigint)
    model = _model()
    model.h[0].register_forward_hook(lambda *a: ctrl_c.fire("forward", step["n"]))
    model.h[0].attn.c_attn.lora_B["q"].register_hook(lambda g: ctrl_c.fire("backward", step["n"]))
    parts = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt, match="stopped after step 3"):
        _run(parts, data=data, model=model, val=val)
    assert ctrl_c.fired
    assert torch.load(parts / "ckpt.pt", weights_only=True)["step"] == 3  # the step completed
    assert _log(parts)[-1]["step"] == 3  # with its log entry (validation at step 3 included)
    monkeypatch.undo()
    history, resumed = _run(parts, resume=True)
    assert _strip(_log(parts)) == _strip(_log(tmp_path / "whole"))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_second_ctrl_c_aborts_at_once_and_saves_nothing(tmp_path, monkeypatch):
    class Data(Examples):
        def get_batch(self, batch_size, index=0, seed=0):
            if index == 3:  # step 4: two presses in a row
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return super().get_batch(batch_size, index, seed)

    base = toy_examples()
    with pytest.raises(KeyboardInterrupt) as e:
        _run(tmp_path, data=Data(base.tokens, base.index, base.block_size, base.name))
    assert "stopped after step" not in str(e.value)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2  # the last one


def test_an_output_directory_is_claimed_and_locked(tmp_path):
    out = tmp_path / "run"
    _run(out)
    with pytest.raises(ValueError, match="holds another run's outputs: continue it with "
                                         "--resume, replace them with --overwrite"):
        _run(out)
    lock = claim_out_dir(out, resume=True, overwrite=False)  # another run, still going
    try:
        with pytest.raises(ValueError, match="in use by another run"):
            _run(out, overwrite=True)
    finally:
        release_out_dir(lock)
    history, _ = _run(out, overwrite=True)
    assert _log(out) == json.loads(json.dumps(history))  # only the new run's lines


@pytest.mark.parametrize("change, message", [
    ({"lr": 1e-3}, r"lr 0.001 \(the run: 0.01\)"),
    ({"seed": 7}, r"seed 7 \(the run: 1337\)"),
    ({"max_iters": 8}, r"max_iters 8 \(the run: 6\)"),
])
def test_resume_with_other_settings_is_refused(tmp_path, change, message):
    out = tmp_path / "run"
    _run(out, cfg={"max_iters": 6, "ckpt_interval": 2})
    with pytest.raises(ValueError, match=message + ".*--overwrite"):
        _run(out, resume=True, cfg=change)


def test_resume_with_other_data_is_refused(tmp_path):
    out = tmp_path / "run"
    _run(out, run={"data": "toy"})
    with pytest.raises(ValueError, match=r"data e2e \(the run: toy\)"):
        _run(out, resume=True, run={"data": "e2e"})


def test_an_infinite_learning_rate_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"--lr must be > 0 \(and finite\), got inf"):
        _run(tmp_path, cfg={"lr": float("inf")})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_nonfinite_validation_loss_stops_before_the_step_is_checkpointed(tmp_path):
    """Finite weights can still give nan outputs (huge weights): a nan validation loss stops the
    run before its checkpoint, and the last good one stays."""
    class Poisoned(type(toy_examples())):
        def eval_batches(self, batch_size, max_batches=None):
            for x, y in super().eval_batches(batch_size, max_batches):
                if step["n"] >= 3:
                    model.h[0].ln_1.weight.data.fill_(float("inf"))  # frozen: not checkpointed
                yield x, y

    step, model = {"n": 0}, _model()

    class Counting(type(toy_examples())):
        def get_batch(self, batch_size, index=0, seed=0):
            step["n"] = index + 1
            return super().get_batch(batch_size, index, seed)

    base, v = toy_examples(), toy_examples(4, seed=1)
    with pytest.raises(TrainingDiverged, match=r"validation loss is nan after step 3.*\(step 2\)"):
        _run(tmp_path, data=Counting(base.tokens, base.index, base.block_size, base.name),
             val=Poisoned(v.tokens, v.index, v.block_size, v.name), model=model)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_overwrite_removes_the_results_of_either_script(tmp_path):
    (tmp_path / "model.safetensors").write_text("a train.py result")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds another run's outputs"):
        _run(tmp_path)
    _run(tmp_path, overwrite=True)
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "config.json").exists()


def test_resume_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    torch.save({"step": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by train.py or finetune.py"):
        _run(tmp_path, resume=True)


@pytest.mark.parametrize("argv, message", [
    (["--device", "banana"], "--device banana: not a device"),
    (["--seed", "-5"], r"--seed must be in [0, 2**32), got -5"),
    (["--seed", "99999999999999999999"], "--seed must be in [0, 2**32)"),
    (["--out", "{tmp}/a_file/x"], "a_file/x: cannot write there"),
])
def test_bad_system_flags_are_one_line(argv, message, capsys, shakespeare_dir, tmp_path):
    from support.common import run_main
    (tmp_path / "a_file").write_text("")
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train.main(["--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                                     "--max-iters", "1", "--warmup", "0",
                                     "--data", str(shakespeare_dir), "--block-size", "16",
                                     "--out", str(tmp_path / "o"), *argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and message in err[0], err


def test_a_refused_resume_prints_no_progress_bar(tmp_path, capsys):
    """The checkpoint is read and checked before the progress bar exists: a refusal is all
    that is printed (no stray 0% bar above it)."""
    out = tmp_path / "run"
    _run(out)
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"lr 0.001 \(the run: 0.01\)"):
        _run(out, resume=True, cfg={"lr": 1e-3, "progress": True})
    assert capsys.readouterr().err == ""


def _train_argv(data, out):
    """train.py from scratch, tiny: 6 steps, checkpointed at steps 2, 4 and 6."""
    return ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
            "--batch-size", "4", "--max-iters", "6", "--warmup", "1", "--eval-interval", "2",
            "--eval-batches", "1", "--data", str(data), "--no-progress", "--out", str(out)]


def sigint_while_drawing(batch, presses):
    """A stand-in for data_from_args whose training data presses Ctrl-C `presses` times (real
    SIGINTs) when batch number `batch` is drawn."""
    from data.datasets import data_from_args

    def load(*args):
        train_data, val_data = data_from_args(*args)

        class Interrupting(type(train_data)):
            def get_batch(self, batch_size, index=0, seed=0):
                if index == batch:
                    for _ in range(presses):
                        os.kill(os.getpid(), signal.SIGINT)
                return super().get_batch(batch_size, index, seed)
        train_data.__class__ = Interrupting
        return train_data, val_data
    return load


@pytest.mark.parametrize("batch, presses, saved, first_words", [
    (2, 1, 3, "stopped after step 3"),  # one press while step 3 runs: it completes, is saved
    (3, 2, 2, "aborted by Ctrl-C"),  # two during step 4: the checkpoint of step 2 stays
])
def test_ctrl_c_says_which_step_the_checkpoint_holds_and_the_command_that_continues(
        shakespeare_dir, tmp_path, monkeypatch, capsys, batch, presses, saved, first_words):
    import shlex

    from support.common import run_main
    out = tmp_path / "out dir"  # a space: the command quotes it
    with monkeypatch.context() as m:
        m.setattr(train, "data_from_args", sigint_while_drawing(batch, presses))
        with pytest.raises(SystemExit) as e:
            run_main(lambda: train.main(_train_argv(shakespeare_dir, out)))
    captured = capsys.readouterr()
    assert e.value.code == 130 and "validation loss at step" not in captured.out
    command = f"python train.py --out {shlex.quote(str(out))} --resume"
    line = [s for s in captured.err.splitlines() if s.startswith(first_words)]
    assert line and f"{out / 'ckpt.pt'} holds step {saved}" in line[0], captured.err
    assert line[0].endswith(f"continue with: {command}"), line[0]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == saved
    python, script, *argv = shlex.split(command)  # the command as printed continues the run
    train.main(argv)
    assert _log(out)[-1]["step"] == 6


def test_a_second_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(
        shakespeare_dir, tmp_path, monkeypatch, capsys):
    from support.common import run_main
    out = tmp_path / "o"
    monkeypatch.setattr(train, "data_from_args", sigint_while_drawing(1, 2))
    with pytest.raises(SystemExit):
        run_main(lambda: train.main(_train_argv(shakespeare_dir, out)))
    err = capsys.readouterr().err
    assert "aborted by Ctrl-C before the first checkpoint: nothing to resume; " \
           "start again with --overwrite" in err, err
