"""A training run's records: its checkpoint (to resume exactly), its history, log.jsonl,
loss.png and progress bar. train.train calls these; nothing here knows what is trained.
"""

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import atomic_write, check_tensors, save_figure

CKPT = "ckpt.pt"


def save_checkpoint(out_dir, model, optimizer, scaler, step, log, save=None):
    """Everything to continue exactly, in one file written atomically (rank 0, with an out_dir):
    the trainable tensors (for LoRA only A and B), the optimizer's moments, the step, the
    history; save(model, out_dir) writes the result beside it."""
    log.saved_step = step
    if out_dir is None or (dist.is_initialized() and dist.get_rank() != 0):
        return
    if save is not None:
        save(model, out_dir)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "params": {n: p.detach().cpu() for n, p in model.named_parameters()
                        if p.requires_grad},
             "history": log.history, "pending": log.pending}
    atomic_write(Path(out_dir) / CKPT, lambda p: torch.save(state, p))
    log.rewrite()


@torch.no_grad()
def load_checkpoint(out_dir, model, optimizer, scaler, log) -> int:
    """Restore what save_checkpoint wrote into the model, optimizer and log; -> the step."""
    if out_dir is None:
        raise ValueError("resume needs an output directory")
    path = Path(out_dir) / CKPT
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_tensors({n: p.shape for n, p in ours.items()}, state["params"],
                  f"{path} was written for other trainable tensors (resume with the same "
                  f"model, rank and targets)")
    for n, t in state["params"].items():
        ours[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    log.history, log.pending, log.saved_step = state["history"], state["pending"], state["step"]
    log.rewrite()  # drops the lines written after the checkpoint
    log.bar.update(state["step"])
    return state["step"]


class RunLog:
    """The run's history (one entry per log_interval steps), log.jsonl, loss.png and the
    progress bar; files only where out_dir is given (rank 0)."""

    def __init__(self, out_dir, total: int, progress: bool):
        from tqdm import tqdm

        self.dir = Path(out_dir) if out_dir is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.history, self.pending, self.saved_step = [], {"loss": 0.0, "steps": 0}, None
        self.bar = tqdm(total=total, disable=not progress, dynamic_ncols=True)
        self.tokens, self.t_last = 0, time.perf_counter()

    def start(self, val_loss):
        if val_loss is not None:
            print(f"validation loss before training: {val_loss:.4f}")
        self.history.append({"step": 0, "train_loss": None, "lr": 0.0, "tokens_per_s": None,
                             "val_loss": val_loss})
        self.rewrite()

    def paused(self, fn, *args):
        """fn(*args), its time left out of tokens/s (validation)."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.t_last += time.perf_counter() - t0

    def step(self, step, loss, lr, tokens, val_loss, write):
        self.pending = {"loss": self.pending["loss"] + loss, "steps": self.pending["steps"] + 1}
        self.tokens += tokens
        self.bar.update(1)
        if not write:
            return
        now = time.perf_counter()
        entry = {"step": step, "train_loss": self.pending["loss"] / self.pending["steps"],
                 "lr": lr, "tokens_per_s": self.tokens / max(now - self.t_last, 1e-9),
                 "val_loss": val_loss}
        self.history.append(entry)
        self.pending, self.tokens, self.t_last = {"loss": 0.0, "steps": 0}, 0, now
        if self.dir is not None:
            with open(self.dir / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        self.bar.set_postfix(loss=f"{entry['train_loss']:.3f}", lr=f"{lr:.2e}",
                             **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))

    def rewrite(self):
        if self.dir is not None:
            text = "".join(json.dumps(h) + "\n" for h in self.history)
            atomic_write(self.dir / "log.jsonl", lambda p: Path(p).write_text(text))

    def close(self):
        self.bar.close()
        final = [h["val_loss"] for h in self.history if h.get("val_loss") is not None]
        if self.dir is not None and final:  # rank 0, writing a run
            print(f"final validation loss: {final[-1]:.4f} (log: {self.dir / 'log.jsonl'})")

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
