"""Setup shared by every script (device, base model, tokenizer, error handling) and, below it,
the one training loop used by train.py (pretraining, full fine-tuning) and finetune.py (LoRA).

The training loss is eq. 2 of the LoRA paper as one big batch would compute it: the sum of the
per-token losses (with label smoothing) over every target token of the effective batch
(--batch-size x --grad-accum micro-batches x torchrun processes), divided by the number of
those target tokens. Accumulation and DDP therefore change nothing but memory and speed.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.datasets import IGNORE, load_data  # noqa: F401  (load_data is part of this API)
from model import GPT, GPTConfig, _atomic_write


def get_device(name: str = "auto") -> str:
    """'auto' -> cuda when there is a GPU, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base(init: str, device: str = "cpu", dtype: str = "float32", **overrides) -> GPT:
    """The base model: a released GPT-2 size, a directory or a weights file (GPT.from_pretrained)."""
    model = GPT.from_pretrained(init, **overrides)
    return model.to(device=device, dtype=DTYPES[dtype])


def get_tokenizer():
    """GPT-2's BPE (tiktoken 'gpt2'). Offline: TIKTOKEN_CACHE_DIR must hold its files."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise OSError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}); offline, set "
                      f"TIKTOKEN_CACHE_DIR to a folder with its files (see README)") from None


def run_main(main):
    """Run a script's main(): a bad input (ValueError, OSError) ends in one line on stderr and
    exit code 1, not a traceback; Ctrl-C exits with 130."""
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ================================================================ the training loop


@dataclass
class TrainConfig:
    """Every knob of the loop. Defaults are the paper's GPT-2 recipe on E2E (LoRA Table 11):
    AdamW, lr 2e-4, weight decay 0.01, batch 8, 5 epochs, 500 warmup steps then linear decay,
    label smoothing 0.1."""

    # optimisation
    lr: float = 2e-4
    weight_decay: float = 0.01  # on matrices (LoRA's A and B included), not biases/LayerNorms
    betas: tuple = (0.9, 0.999)
    batch_size: int = 8  # sequences per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    epochs: float = 5.0
    max_iters: int | None = None  # optimizer steps; None: epochs over the training set
    warmup: int = 500  # steps of linear warmup from 0 to lr
    decay: str = "linear"  # after warmup: "linear" (the paper's) or "cosine" to 0, or "constant"
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # evaluation, logging, checkpoints
    eval_interval: int = 500  # steps between validation runs (and one at the end)
    eval_batches: int | None = 100  # validation batches per run; None: the whole split
    log_interval: int = 10  # steps per history entry / log line
    ckpt_interval: int | None = None  # steps between checkpoints; None: at each evaluation
    # system
    seed: int = 1337
    amp: str = "auto"  # auto: bf16 (fp16 + GradScaler without it) on CUDA, fp32 on CPU; off,
    #                    bf16, fp16
    compile: bool = False
    progress: bool = True  # tqdm bar (rank 0 only)
    stop_at: int | None = None  # testing: behave as if Ctrl-C came right after this step


class TrainingDiverged(ValueError):
    """The loss became nan or inf."""


# ---------------------------------------------------------------- pieces of the loop

def lr_at(step: int, cfg: TrainConfig, max_iters: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to cfg.lr over cfg.warmup
    steps, then cfg.decay to 0 at max_iters."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.decay == "constant":
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, max_iters - cfg.warmup)  # 0 -> 1
    if cfg.decay == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)


def make_optimizer(model, cfg: TrainConfig):
    """AdamW over the parameters with requires_grad, and only those: for LoRA that is A and B,
    so freezing W0 needs no special case here and the optimizer holds no state for it (the
    memory saving of LoRA §4.2). Fused kernels when available (the step is a large share of a
    small model's CPU time)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def amp_setup(amp: str, device_type: str):
    """-> (autocast context factory, GradScaler). Weights and optimizer stay fp32; only the
    forward runs in bf16/fp16. fp16 needs loss scaling (its range is narrow), bf16 does not."""
    if amp == "auto":
        if device_type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "off"
    if amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"unknown --amp '{amp}': use auto, off, bf16 or fp16")
    if amp == "fp16" and device_type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16 or off")
    scaler = torch.amp.GradScaler(device_type, enabled=amp == "fp16")
    if amp == "off":
        return nullcontext, scaler
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return (lambda: torch.autocast(device_type, dtype=dtype)), scaler


@torch.no_grad()
def evaluate(model, data, batch_size: int = 8, max_batches=None, amp: str = "off") -> float:
    """Mean loss per target token (positions with target -100 excluded) over data's
    evaluation batches, without label smoothing."""
    device = next(model.parameters()).device
    autocast, _ = amp_setup(amp, device.type)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data.eval_batches(batch_size, max_batches):
        n = int((y != IGNORE).sum())
        if n == 0:
            continue
        with autocast():
            loss = model(x.to(device), y.to(device))
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def setup_distributed(device: str = "auto"):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU.
    -> (rank, world_size, device of this process)."""
    device = get_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return dist.get_rank(), world, device


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def plot_history(history: list[dict], path):
    """Train and validation loss against step, as a PNG (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [h for h in history if h.get("train_loss") is not None]
    ax.plot([h["step"] for h in tr], [h["train_loss"] for h in tr], label="train")
    val = [h for h in history if h.get("val_loss") is not None]
    ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def _write_log(path: Path, history: list[dict]):
    text = "".join(json.dumps(h) + "\n" for h in history)
    _atomic_write(path, lambda p: Path(p).write_text(text))


def token_loss_sum(fwd, x, y, label_smoothing=0.0):
    """Σ over the target tokens of x of -log p(y_t | x_<t) (with label smoothing): eq. 2's sum,
    not a mean, so that micro-batches and processes can be weighted by their token counts."""
    logits = fwd(x).float()  # (B, T, vocab); the loss in fp32 under autocast
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                           label_smoothing=label_smoothing, reduction="sum")


def train_step(fwd, model, optimizer, scaler, batches, cfg: TrainConfig, autocast) -> float:
    """One optimizer step over the micro-batches [(x, y), ...] of this process; -> the mean
    training loss per target token of the whole effective batch.

    The loss is normalized as one big batch would be: the sum of the token losses of every
    micro-batch on every process, divided by the number N of target tokens (targets != -100)
    in all of them. So a micro-batch with 2 target tokens weighs 2/N, not as much as one with
    40, and --grad-accum or torchrun give the gradient of --batch-size × both. N is counted
    before the backward passes (and summed over processes); DDP averages the gradients of its
    W processes, hence the factor W. Only requires_grad parameters get gradients (for LoRA,
    A and B: §4.2's memory saving), so nothing here knows about LoRA.
    """
    device = next(model.parameters()).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
               for x, y in batches]
    count = torch.tensor(float(sum(int((y != IGNORE).sum()) for _, y in batches)), device=device)
    loss_sum = torch.zeros((), device=device)
    if world > 1:
        dist.all_reduce(count)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if (world == 1 or last) else fwd.no_sync():  # one all-reduce a step
            with autocast():
                loss = token_loss_sum(fwd, x, y, cfg.label_smoothing)
            scaler.scale(loss * world / count.clamp(min=1)).backward()
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum)
    train_loss = float(loss_sum / count.clamp(min=1))
    if not math.isfinite(train_loss):  # no update from it: the caller stops the run
        optimizer.zero_grad(set_to_none=True)
        return train_loss
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return train_loss


# ---------------------------------------------------------------- checkpoints

CKPT = "ckpt.pt"


def save_checkpoint(path, model, optimizer, scaler, step, history, pending):
    """Everything to continue exactly: the trainable tensors (for LoRA only A and B), the
    optimizer's moments, the step, and the history; one file, written atomically."""
    state = {
        "step": step,
        "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "history": history,
        "pending": pending,
    }
    _atomic_write(Path(path), lambda p: torch.save(state, p))


@torch.no_grad()
def load_checkpoint(path, model, optimizer, scaler):
    """Restore what save_checkpoint wrote; the model must have the same trainable tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(ours) != set(state["params"]) or any(
            ours[n].shape != t.shape for n, t in state["params"].items()):
        raise ValueError(f"{path} was written for other trainable tensors (different model, "
                         f"rank or targets?): resume with the same settings")
    for n, t in state["params"].items():
        ours[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["step"], state["history"], state["pending"]


# ---------------------------------------------------------------- the loop

def train(model, train_data, val_data, cfg: TrainConfig, out_dir=None, save=None,
          resume: bool = False) -> list[dict]:
    """Train the parameters of `model` that have requires_grad; -> history, one dict per
    log_interval steps: step, train_loss, lr, tokens_per_s, and val_loss where evaluated.

    save(model, out_dir) writes the result (full model or LoRA adapter) at each checkpoint
    and at the end; out_dir also gets ckpt.pt (for resume=True), log.jsonl and loss.png.
    Under torchrun the gradients are averaged over processes (only the trainable ones: DDP
    hooks only parameters with requires_grad); rank 0 evaluates, logs and saves.
    """
    rank, world = _dist_info()
    main_proc = rank == 0
    device = next(model.parameters()).device
    B, accum = cfg.batch_size, cfg.grad_accum
    if B < 1 or accum < 1:
        raise ValueError("batch_size and grad_accum must be at least 1")
    if len(train_data) < B * world:
        raise ValueError(f"{train_data.name} has {len(train_data):,} samples, fewer than one "
                         f"batch ({B} x {world} processes): use more data or a smaller batch")
    steps_per_epoch = math.ceil(len(train_data) / (B * accum * world))
    max_iters = cfg.max_iters or max(1, round(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_interval
    ckpt_every = cfg.ckpt_interval or eval_every
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None and main_proc:
        out_dir.mkdir(parents=True, exist_ok=True)

    optimizer = make_optimizer(model, cfg)
    autocast, scaler = amp_setup(cfg.amp, device.type)
    step, history, pending = 0, [], {"loss": 0.0, "steps": 0}
    if resume:
        if out_dir is None:
            raise ValueError("resume needs an output directory")
        step, history, pending = load_checkpoint(out_dir / CKPT, model, optimizer, scaler)
    if main_proc and out_dir is not None:
        _write_log(out_dir / "log.jsonl", history)  # drops lines past the checkpoint

    fwd = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)

    saved_step = step if resume else None

    def checkpoint():
        nonlocal saved_step
        saved_step = step
        if out_dir is not None and main_proc:
            if save is not None:
                save(model, out_dir)
            save_checkpoint(out_dir / CKPT, model, optimizer, scaler, step, history, pending)
            _write_log(out_dir / "log.jsonl", history)

    if main_proc:
        print(f"training {max_iters:,} steps ({steps_per_epoch:,} per epoch of "
              f"{len(train_data):,} samples; batch {B} x {accum} accum x {world} processes)")
    if step == 0 and main_proc:  # where training starts from
        val0 = evaluate(model, val_data, B, cfg.eval_batches, cfg.amp)
        history.append({"step": 0, "train_loss": None, "lr": 0.0, "tokens_per_s": None,
                        "val_loss": val0})
        print(f"validation loss before training: {val0:.4f}")
        if out_dir is not None:
            _write_log(out_dir / "log.jsonl", history)
    from tqdm import tqdm
    bar = tqdm(total=max_iters, initial=step, disable=not (main_proc and cfg.progress),
               dynamic_ncols=True)
    tokens, t_last = 0, time.perf_counter()
    model.train()
    try:
        while step < max_iters:
            lr = lr_at(step, cfg, max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Dropout (LoRA's included) draws from a seed fixed by (seed, step, rank): a resumed
            # run repeats the uninterrupted one exactly, with no RNG state to save.
            torch.manual_seed(cfg.seed + 1_000_003 * step + 7919 * rank)
            batches = [train_data.get_batch(B, (step * accum + micro) * world + rank, cfg.seed)
                       for micro in range(accum)]
            train_loss = train_step(fwd, model, optimizer, scaler, batches, cfg, autocast)
            tokens += sum(x.numel() for x, _ in batches) * world
            if not math.isfinite(train_loss):  # stop; the last checkpoint stays as it is
                kept = (f"; {out_dir} keeps the last checkpoint (step {saved_step})"
                        if out_dir is not None and saved_step is not None else "")
                raise TrainingDiverged(f"the loss is {train_loss} at step {step + 1}: stopping"
                                       f"{kept}. Try a lower --lr, or --amp off")
            step += 1
            pending["loss"] += train_loss
            pending["steps"] += 1

            val_loss = None
            if step % eval_every == 0 or step == max_iters:
                if main_proc:
                    t_eval = time.perf_counter()
                    val_loss = evaluate(model, val_data, B, cfg.eval_batches, cfg.amp)
                    t_last += time.perf_counter() - t_eval  # tokens/s counts training only
                model.train()
            if step % cfg.log_interval == 0 or val_loss is not None or step == max_iters:
                now = time.perf_counter()
                entry = {"step": step, "train_loss": pending["loss"] / pending["steps"], "lr": lr,
                         "tokens_per_s": tokens / max(now - t_last, 1e-9), "val_loss": val_loss}
                history.append(entry)
                pending = {"loss": 0.0, "steps": 0}
                tokens, t_last = 0, now
                if main_proc and out_dir is not None:
                    with open(out_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps(entry) + "\n")
                bar.set_postfix(loss=f"{entry['train_loss']:.3f}", lr=f"{lr:.2e}",
                                tok_s=f"{entry['tokens_per_s']:.0f}",
                                **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
            bar.update(1)
            if step % ckpt_every == 0 and step < max_iters:
                checkpoint()
            if cfg.stop_at is not None and step == cfg.stop_at:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        if main_proc and out_dir is not None:
            print(f"stopped at step {step}; saved to {out_dir}, continue with --resume",
                  file=sys.stderr)
        raise
    bar.close()
    checkpoint()
    if main_proc and out_dir is not None and history:
        plot_history(history, out_dir / "loss.png")
    return history


# ================================================================ command line (finetune.py too)

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except None and flags' (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or \
                action.help is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def add_train_args(p: argparse.ArgumentParser, out: str):
    """The loop's options (TrainConfig) as argument groups; defaults from TrainConfig."""
    d = TrainConfig()
    g = p.add_argument_group("training (defaults: the paper's GPT-2 E2E recipe, LoRA Table 11)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay on matrices")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per process per micro-step")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-steps per optimizer step")
    g.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training set")
    g.add_argument("--max-iters", type=int, default=d.max_iters,
                   help="optimizer steps (overrides --epochs)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    g.add_argument("--decay", choices=("linear", "cosine", "constant"), default=d.decay,
                   help="learning-rate schedule after warmup")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="of the training loss (validation has none)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="max gradient norm; 0: no clipping")
    g.add_argument("--seed", type=int, default=d.seed, help="initialisation, data order, dropout")
    g.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)  # tests
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval,
                   help="steps between validation runs")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="validation batches per run (0: the whole split)")
    g.add_argument("--log-interval", type=int, default=d.log_interval,
                   help="steps per line of log.jsonl")
    g.add_argument("--ckpt-interval", type=int, default=d.ckpt_interval,
                   help="steps between checkpoints (default: at each evaluation)")
    g.add_argument("--out", default=out, help="output directory")
    g.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (same settings)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default=d.amp, choices=("auto", "off", "bf16", "fp16"),
                   help="autocast: auto = bf16 on CUDA (fp16 + loss scaling without bf16), "
                        "fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")


def add_data_args(p: argparse.ArgumentParser, default: str):
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default,
                   help="a prepared set (e2e, shakespeare: run data/NAME/prepare.py first), a "
                        ".txt file, or a .jsonl file of {\"prompt\", \"completion\"} lines")
    g.add_argument("--block-size", type=int, default=None,
                   help="longest sequence trained on (default: the model's n_positions)")


def config_from_args(args) -> TrainConfig:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                         if hasattr(args, f.name)})
    if cfg.eval_batches == 0:
        cfg.eval_batches = None
    return cfg


def prepare_data(args, model):
    """Check --block-size against the model, then load --data."""
    n_positions = model.config.block_size
    block_size = args.block_size or n_positions
    if not 1 <= block_size <= n_positions:
        raise ValueError(f"--block-size {block_size} is outside 1..{n_positions}, the model's "
                         f"n_positions")
    return load_data(args.data, block_size)


def file_size(path) -> str:
    n = os.path.getsize(path)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


# From scratch: a small GPT that learns Tiny Shakespeare in a few minutes on a laptop CPU.
SCRATCH = dict(n_layer=4, n_head=4, n_embd=64, block_size=128)
SCRATCH_TRAIN = dict(lr=2e-3, weight_decay=0.1, max_iters=300, warmup=30, decay="cosine",
                     label_smoothing=0.0, eval_interval=50, eval_batches=10, batch_size=8)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Pretrain a small GPT from scratch (default: Tiny Shakespeare, minutes on a "
                    "CPU), or fine-tune every weight of a pretrained one (--init): the full "
                    "fine-tuning baseline LoRA is compared against. The result is a model "
                    "directory that finetune.py --init accepts.",
        formatter_class=HelpFormatter,
        epilog="From scratch the training defaults change to: " +
               ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SCRATCH_TRAIN.items()) +
               f", --block-size {SCRATCH['block_size']}")
    g = p.add_argument_group("model")
    g.add_argument("--init", default=None,
                   help="fine-tune this model fully (gpt2, gpt2-medium, ..., a directory or "
                        "weights file); default: a new model from scratch")
    for k, v in SCRATCH.items():
        if k != "block_size":
            g.add_argument(f"--{k.replace('_', '-')}", type=int, default=v,
                           help="(from scratch)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the model")
    add_data_args(p, default="shakespeare")
    add_train_args(p, out="out/train")
    args = p.parse_args(argv)
    if args.init is None:  # from scratch: the small-model defaults, unless given
        p.set_defaults(**SCRATCH_TRAIN, block_size=SCRATCH["block_size"])
        args = p.parse_args(argv)
    cfg = config_from_args(args)

    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(cfg.seed)
    if args.init is not None:
        model = load_base(args.init, device, dropout=args.dropout)
    else:
        config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                           block_size=args.block_size, dropout=args.dropout)
        model = GPT(config).to(device)
    train_data, val_data = prepare_data(args, model)
    if rank == 0:
        print(f"{'fine-tuning ' + args.init if args.init else 'new model'}: "
              f"{model.num_params():,} parameters, all trained")
    train(model, train_data, val_data, cfg, args.out,
          save=lambda m, d: m.save_pretrained(d), resume=args.resume)
    if rank == 0:
        print(f"saved {args.out}/model.safetensors "
              f"({file_size(Path(args.out) / 'model.safetensors')})")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
