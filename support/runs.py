"""A training run's bookkeeping, behind one object (RunRecords, what train.train's loop calls):
its output directory (claimed, locked), its checkpoint (to resume exactly, with the settings
that define the run), its history, log.jsonl, loss.png and progress bar, Ctrl-C honoured
between steps, and the stop when the loss or the weights stop being finite. Nothing here knows
what is trained. For the scripts: --resume with the run's settings from its checkpoint
(resume_args), and the line that says how to continue after a Ctrl-C (say_how_to_continue).
"""

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from support.common import (ADAPTER_FILE, atomic_write, check_finite, check_tensors, nonfinite,
                            resolve_amp, save_figure, short_list)

CKPT = "ckpt.pt"
LOCK = ".lock"
RESULTS = ("config.json", "model.safetensors", ADAPTER_FILE)  # what train.py, finetune.py save


class TrainingDiverged(ValueError):
    """The loss or the weights became nan or inf."""


class StoppedAtStep(KeyboardInterrupt):
    """A Ctrl-C stopped the run at a step boundary, after checkpointing that step."""

    def __init__(self, step: int, out_dir=None):
        super().__init__(f"stopped after step {step}"
                         + (f", checkpointed in {Path(out_dir) / CKPT}" if out_dir else ""))
        self.step = step


class RunRecords:
    """Everything of a run but the training, in three calls:

        with RunRecords(...) as records:  # out_dir claimed and locked; resume: checkpoint read
            records.begin()               # validation before step 1 (none when resuming)
            while records.step < max_iters:
                ...                       # one training step: records.batches is its batch
                records.end_step(loss, lr, tokens, skipped)

    end_step validates (validate(), rank 0 only), logs and checkpoints (model, optimizer and
    scaler, with save(model, out_dir)) at cfg's intervals and at the end, and stops the run:
    TrainingDiverged for a non-finite loss, validation loss or weight (the last checkpoint
    stays), StoppedAtStep (a KeyboardInterrupt) after a Ctrl-C, checkpointed first; a second
    Ctrl-C is a plain KeyboardInterrupt, mid-step. On a normal exit the log is
    closed and plotted; out_dir is released however the run ends. Files are rank 0's; every
    rank keeps the count. step: optimizer steps taken; batches: training batches drawn, the
    steps fp16's loss scaler skipped included (a skipped step is not a step).
    """

    def __init__(self, out_dir, cfg, max_iters: int, model, optimizer, scaler, validate,
                 save=None, settings=None, resume=False, overwrite=False, rank=0):
        self.dir, self.cfg, self.max_iters, self.rank = out_dir, cfg, max_iters, rank
        self.trained = (model, optimizer, scaler)
        self.validate, self.save, self.settings = validate, save, settings
        self.resume, self.overwrite, self.step = resume, overwrite, 0
        self.lock = self.log = None
        self.ctrl_c = StepBoundary()

    @property
    def batches(self) -> int:
        return self.step + self.log.skipped

    @property
    def history(self) -> list[dict]:
        """One dict per logged step (RunLog.step); train()'s result."""
        return self.log.history

    def __enter__(self):
        ours = self.dir if self.rank == 0 else None  # the files are rank 0's
        self.lock = claim_out_dir(ours, self.resume, self.overwrite)
        try:  # a checkpoint that does not fit is refused before the progress bar appears
            state = read_checkpoint(self.dir, self.trained[0], self.settings) if self.resume \
                else None
            self.log = RunLog(ours, self.max_iters, self.cfg.progress and self.rank == 0)
            if state is not None:
                self.step = restore_checkpoint(state, *self.trained, self.log)
        except BaseException:
            release_out_dir(self.lock)
            raise
        return self

    def begin(self):
        """Validate before the first step (not when resuming); from now on a Ctrl-C waits
        for the step boundary."""
        if self.step == 0:
            self.log.start(self._validate())
        self.ctrl_c.__enter__()

    def end_step(self, loss: float, lr: float, tokens: int, skipped=False):
        """After a step over `tokens` tokens at learning rate lr, of mean loss `loss`."""
        if not math.isfinite(loss):  # stop; the last checkpoint stays as it is
            raise TrainingDiverged(f"the loss is {loss} at step {self.step + 1}: stopping"
                                   f"{self.log.kept(self.dir)}. Try a lower --lr, or --amp off")
        if skipped:  # by fp16's loss scaler: nothing was updated, not a step
            self.log.skip()
        else:
            self.step += 1
            cfg, step, end = self.cfg, self.step, self.step == self.max_iters
            val = self._validate() if step % cfg.eval_interval == 0 or end else None
            self.log.step(step, loss, lr, tokens, val,
                          write=step % cfg.log_interval == 0 or val is not None or end)
            if end or step % (cfg.ckpt_interval or cfg.eval_interval) == 0:
                self._checkpoint()
        if self.step < self.max_iters and self.ctrl_c.stop():  # Ctrl-C: checkpointed
            self.log.close(report=False)  # the scripts say what was saved: say_how_to_continue
            self._checkpoint()
            raise StoppedAtStep(self.step, self.dir)

    def __exit__(self, exc_type, *exc):
        try:
            self.ctrl_c.__exit__()
            if exc_type is None:
                self.log.close()
                self.log.plot(self.cfg.label_smoothing)
        finally:
            release_out_dir(self.lock)

    def _validate(self):  # on rank 0, its time left out of tokens/s
        return self.log.paused(self.validate) if self.rank == 0 else None

    def _checkpoint(self):
        save_checkpoint(self.dir, *self.trained, self.step, self.log, self.save, self.settings,
                        dataclasses.asdict(self.cfg))


def claim_out_dir(out_dir, resume: bool, overwrite: bool):
    """Make out_dir this run's: refused while another process runs in it (a lock held until
    release_out_dir), and refused if it holds another run's outputs unless resume (continue it)
    or overwrite (its ckpt.pt, log.jsonl, loss.png and results are removed first: RESULTS, of
    train.py and finetune.py alike). -> the lock (an open file), or None without out_dir."""
    if out_dir is None:
        return None
    d = Path(out_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        lock = open(d / LOCK, "w")
    except OSError as e:
        raise OSError(f"--out {d}: cannot write there ({e.strerror or e})") from None
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no fcntl (Windows): no lock
        pass
    except OSError:
        lock.close()
        raise ValueError(f"{d} is in use by another run (it holds {d / LOCK}): wait for it, or "
                         f"use another --out") from None
    ours = [d / n for n in (CKPT, "log.jsonl", "loss.png", *RESULTS)]
    if not resume and any(f.exists() for f in ours):
        if not overwrite:
            lock.close()
            raise ValueError(f"{d} holds another run's outputs: continue it with --resume, "
                             f"replace them with --overwrite, or use another --out")
        for f in ours:
            f.unlink(missing_ok=True)
    return lock


def release_out_dir(lock):
    if lock is not None:
        lock.close()


def run_settings(cfg, run: dict, device) -> dict:
    """What defines a run, for --resume to compare: the script's `run` (model, data, LoRA),
    every TrainConfig setting that changes the weights it ends with, amp as the precision it
    resolves to on device ("fp32", "bf16" or "fp16", common.resolve_amp: auto is bf16 on one
    GPU, fp16 on another, fp32 on a CPU), and the device's type ("cpu", "cuda"; not its
    index)."""
    keep = ("lr", "weight_decay", "batch_size", "grad_accum", "epochs", "max_iters", "warmup",
            "decay", "label_smoothing", "grad_clip", "seed")
    return {**(run or {}), **{k: getattr(cfg, k) for k in keep},
            "amp": resolve_amp(cfg.amp, device), "device": torch.device(device).type}


def save_checkpoint(out_dir, model, optimizer, scaler, step, log, save=None, settings=None,
                    config=None):
    """Everything to continue exactly, in one file written atomically (rank 0, with an out_dir):
    the trainable tensors (for LoRA only A and B), the optimizer's moments, the step, the
    history, the run's settings (run_settings: compared on resume) and its whole config (the
    TrainConfig as a dict: resume_args takes it); save(model, out_dir) writes the result beside it.
    Non-finite weights are never saved: TrainingDiverged, and the last checkpoint stays."""
    params = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    bad = nonfinite(params)
    if bad:
        raise TrainingDiverged(f"weights {short_list(bad, 3)} are not finite after step {step}: "
                               f"nothing saved{log.kept(out_dir)}. Try a lower --lr")
    log.saved_step = step
    if out_dir is None or (dist.is_initialized() and dist.get_rank() != 0):
        return
    if save is not None:
        save(model, out_dir)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "params": params, "history": log.history, "pending": log.pending,
             "skipped": log.skipped, "settings": settings, "config": config}
    atomic_write(Path(out_dir) / CKPT, lambda p: torch.save(state, p))
    log.rewrite()


def _read(path, mmap=False) -> dict:
    """ckpt.pt's dict (tensors on the CPU; mmap: read only when used), or one ValueError."""
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the checkpoint, the file is truncated or corrupt "
                         f"({type(e).__name__})") from None
    if not isinstance(state, dict) or not {"step", "params", "optimizer", "scaler", "history",
                                           "pending"} <= set(state):
        raise ValueError(f"{path}: not a checkpoint written by train.py or finetune.py")
    return state


def read_checkpoint(out_dir, model, settings=None) -> dict:
    """What save_checkpoint wrote in out_dir, checked against this run: its settings must be
    the checkpoint's (a difference is one ValueError naming it) and its trainable tensors the
    model's, finite. -> the state, for restore_checkpoint."""
    if out_dir is None:
        raise ValueError("resume needs an output directory")
    path = Path(out_dir) / CKPT
    state = _read(path)
    theirs = state.get("settings") or {}
    diff = [k for k in settings or {} if k in theirs and theirs[k] != settings[k]]
    if diff:
        raise ValueError(f"{path}: --resume with other settings than the run had: "
                         + ", ".join(f"{k} {settings[k]} (the run: {theirs[k]})" for k in diff)
                         + "; resume with the run's settings, or start afresh with --overwrite "
                           "or another --out")
    check_tensors({n: p.shape for n, p in model.named_parameters() if p.requires_grad},
                  state["params"], f"{path} was written for other trainable tensors (resume "
                                   f"with the same model, rank and targets)")
    check_finite(state["params"], path)
    return state


@torch.no_grad()
def restore_checkpoint(state, model, optimizer, scaler, log) -> int:
    """read_checkpoint's state into the model, optimizer, scaler and log; -> the step."""
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for n, t in state["params"].items():
        ours[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    log.history, log.pending, log.saved_step = state["history"], state["pending"], state["step"]
    log.skipped = state.get("skipped", 0)
    log.rewrite()  # drops the lines written after the checkpoint
    log.bar.update(state["step"])
    return state["step"]


# ---------------------------------------------------------------- the scripts' --resume, Ctrl-C

THIS_PROCESS = ("out", "resume", "overwrite", "device", "compile", "progress")  # not the run's


def given_flags(parser: argparse.ArgumentParser, argv=None) -> set:
    """The dests of the flags given on the command line argv (None: sys.argv[1:]), whatever
    their spelling (--lr=1e-3, an abbreviation) or value. argparse fills in a default only
    where the namespace has no value yet, so a namespace that holds a marker for every dest
    keeps the marker exactly where no flag was given."""
    unset = object()
    dests = vars(parser.parse_args(argv))
    marked = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {k for k, v in vars(marked).items() if v is not unset}


def resume_args(args, given: set):
    """--resume: every setting of the run in args.out/ckpt.pt that was not given on the command
    line (given: given_flags) is taken from it into args (the script's settings of the run,
    run_settings, and its TrainConfig), all but this process's own (THIS_PROCESS: --device,
    --compile, --no-progress, ...). A run setting given with another value than the run's is
    one ValueError naming each such flag, before anything loads; a setting that only changes
    what is logged (--eval-interval, --log-interval, ...) may change. --amp and the device
    are compared as they resolve, by RunRecords. Prints where it resumes. -> args."""
    path = Path(args.out) / CKPT
    state = _read(path, mmap=True)  # the settings without reading the tensors
    theirs = {k: v for k, v in (state.get("settings") or {}).items() if k not in ("amp", "device")}
    taken = {**theirs, **(state.get("config") or {})}
    diff = [k for k in theirs if k in given and hasattr(args, k) and getattr(args, k) != theirs[k]]
    if diff:
        def show(v):
            return ",".join(map(str, v)) if isinstance(v, list) else "not set" if v is None else v
        raise ValueError(f"{path}: --resume continues the run with its own settings: "
                         + ", ".join(f"--{k.replace('_', '-')} {show(getattr(args, k))} (the run: "
                                     f"{show(theirs[k])})" for k in diff)
                         + "; leave the flag out, or start afresh with --overwrite or another "
                           "--out")
    for k, v in taken.items():
        if hasattr(args, k) and k not in given and k not in THIS_PROCESS:
            setattr(args, k, v)
    if os.environ.get("RANK", "0") == "0":  # torchrun's process group is not joined yet
        print(f"resuming {path} at step {state['step']}, with the run's settings")
    return args


def say_how_to_continue(interrupt: KeyboardInterrupt, out_dir, script: str):
    """After a Ctrl-C ended a run of `script` (finetune.py, train.py) into out_dir: one line on
    stderr (rank 0) saying what it stopped at, which step out_dir/ckpt.pt holds (read from the
    file) and the whole command that continues the run (--resume takes the rest from it)."""
    if dist.is_initialized() and dist.get_rank() != 0 or out_dir is None:
        return
    d = Path(out_dir)
    try:
        step = _read(d / CKPT, mmap=True)["step"]
    except (OSError, ValueError):
        step = None
    world = dist.get_world_size() if dist.is_initialized() else 1
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
    how = (f"stopped after step {interrupt.step}" if isinstance(interrupt, StoppedAtStep)
           else "aborted by Ctrl-C")  # a second press, or one before the first step
    if step is None:
        outputs = any((d / n).exists() for n in (CKPT, "log.jsonl", "loss.png", *RESULTS))
        line = (f"{how} before the first checkpoint: nothing to resume; start again"
                + (" with --overwrite" if outputs else ""))
    else:
        last = "" if isinstance(interrupt, StoppedAtStep) else ", the last checkpoint"
        line = (f"{how}: {d / CKPT} holds step {step}{last}; continue with: {launcher} {script} "
                f"--out {shlex.quote(str(out_dir))} --resume")
    print(line, file=sys.stderr)


class RunLog:
    """The run's history (one entry per log_interval steps), log.jsonl, loss.png and the
    progress bar; files only where out_dir is given (rank 0)."""

    def __init__(self, out_dir, total: int, progress: bool):
        from tqdm import tqdm

        self.dir = Path(out_dir) if out_dir is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.history, self.pending, self.saved_step = [], {"loss": 0.0, "steps": 0}, None
        self.skipped = 0  # optimizer steps fp16's loss scaler skipped (inf gradients)
        self.bar = tqdm(total=total, disable=not progress, dynamic_ncols=True)
        self.tokens, self.t_last = 0, time.perf_counter()

    def start(self, val_loss):
        if val_loss is not None:
            print(f"validation loss before training: {val_loss:.4f}")
        self.history.append({"step": 0, "train_loss": None, "lr": 0.0, "tokens_per_s": None,
                             "train_s": 0.0, "val_loss": val_loss, "skipped_steps": 0})
        self.rewrite()

    def kept(self, out_dir) -> str:
        """What a stopped run leaves, for its message."""
        if out_dir is None or self.saved_step is None:
            return ""
        return f"; {out_dir} keeps the last checkpoint (step {self.saved_step})"

    def paused(self, fn, *args):
        """fn(*args), its time left out of tokens/s (validation)."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.t_last += time.perf_counter() - t0

    def step(self, step, loss, lr, tokens, val_loss, write):
        """Record step `step`; a non-finite validation loss stops the run (TrainingDiverged)
        before its weights can be checkpointed as good."""
        if val_loss is not None and not math.isfinite(val_loss):
            raise TrainingDiverged(f"the validation loss is {val_loss} after step {step}: "
                                   f"stopping{self.kept(self.dir)}. Try a lower --lr")
        self.pending = {"loss": self.pending["loss"] + loss, "steps": self.pending["steps"] + 1}
        self.tokens += tokens
        self.bar.update(1)
        if not write:
            return
        now = time.perf_counter()
        seconds = max(now - self.t_last, 1e-9)  # since the last entry, validation left out
        entry = {"step": step, "train_loss": self.pending["loss"] / self.pending["steps"],
                 "lr": lr, "tokens_per_s": self.tokens / seconds,
                 "train_s": (self.history[-1].get("train_s") or 0.0) + seconds,
                 "val_loss": val_loss, "skipped_steps": self.skipped}
        self.history.append(entry)
        self.pending, self.tokens, self.t_last = {"loss": 0.0, "steps": 0}, 0, now
        self.rewrite()
        self.bar.set_postfix(loss=f"{entry['train_loss']:.3f}", lr=f"{lr:.2e}",
                             **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}),
                             **({"skipped": self.skipped} if self.skipped else {}))

    def skip(self):
        """Count a step fp16's loss scaler skipped (it is not a step: nothing was updated)."""
        self.skipped += 1
        self.bar.set_postfix(skipped=self.skipped)

    def rewrite(self):
        """log.jsonl as the history: written whole and atomically (never a half line), and
        strict JSON (a non-finite number is written as null)."""
        if self.dir is not None:
            text = "".join(json.dumps({k: _finite_or_none(v) for k, v in h.items()},
                                      allow_nan=False) + "\n" for h in self.history)
            atomic_write(self.dir / "log.jsonl", lambda p: Path(p).write_text(text))

    def close(self, report=True):
        """Close the bar; report: print the last validation loss (the run's end)."""
        self.bar.close()
        last = [h for h in self.history if h.get("val_loss") is not None]
        if report and self.dir is not None and last:  # rank 0, writing a run
            print(f"validation loss at step {last[-1]['step']}: {last[-1]['val_loss']:.4f} "
                  f"(log: {self.dir / 'log.jsonl'})")

    def plot(self, label_smoothing=0.0):
        if self.dir is not None and self.history:
            plot_history(self.history, self.dir / "loss.png", str(self.dir), label_smoothing)


def plot_history(history: list[dict], path, title="", label_smoothing=0.0):
    """Train and validation loss against step, as a PNG. With label smoothing the training loss
    includes its term (so it sits above the validation loss, which has none)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    tr = [h for h in history if h.get("train_loss") is not None]
    ax.plot([h["step"] for h in tr], [h["train_loss"] for h in tr],
            label=f"train (label smoothing {label_smoothing}: sits above)" if label_smoothing
            else "train")
    val = [h for h in history if h.get("val_loss") is not None]
    ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats / target token)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=100)


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


class StepBoundary:
    """Ctrl-C (SIGINT) during training, honoured between two steps: the first press only asks
    to stop (the step in progress, its validation and its log entry complete, then the run is
    checkpointed); a second press aborts at once, saving nothing (the last checkpoint stays).
    Under torchrun every process stops at the same step. Used as a context manager."""

    def __init__(self):
        self.asked, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:  # entered: Python's handler back
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def _handler(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nstopping after this step (Ctrl-C again to abort now)", file=sys.stderr)

    def stop(self) -> bool:
        """Whether to stop now, at a step boundary (the same answer on every process)."""
        if not dist.is_initialized():
            return self.asked
        flag = torch.tensor(float(self.asked), device=_device_for_collectives())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _device_for_collectives():
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
