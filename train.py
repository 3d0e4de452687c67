"""The one training loop, and the script that pretrains a small GPT or fine-tunes every weight.

    python train.py                  # from scratch on data/pretrain: the quick start's base
    python train.py --init gpt2      # full fine-tuning on E2E: the baseline LoRA is compared to

finetune.py calls the same `train()` on a model whose only trainable parameters are LoRA's A
and B: a LoRA step is an ordinary step over the parameters with requires_grad (`train_step`).
The loss is eq. 2 of the LoRA paper as one big batch would compute it: the sum of the token
losses over every target token of the effective batch (--batch-size x --grad-accum x torchrun
processes) divided by their number, so accumulation and DDP never change the gradient.

Reading order: TrainConfig -> lr_at, make_optimizer -> train_step -> evaluate -> train ->
torchrun (DDP: all that is distributed) -> main. The run's bookkeeping (checkpoints for
--resume, log.jsonl, loss.png, Ctrl-C, the stop on a non-finite loss) is runs.RunRecords'.
"""

import argparse
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from data.datasets import IGNORE, add_data_args, data_from_args
from model import GPT, GPTConfig
from support.common import (ArgumentParser, HelpFormatter, add_dataclass_args, check_dataclass,
                            file_size, resolve_amp, run_main, setup_distributed)
from support.runs import (RunRecords, given_flags, resume_args, run_settings,
                          say_how_to_continue)


def setting(default, help, range=None, choices=None):
    """A TrainConfig field with its --help text, range and choices (common.add_dataclass_args)."""
    return field(default=default, metadata={"help": help, "range": range, "choices": choices})


@dataclass
class TrainConfig:
    """Every setting of the loop, with its --help. The defaults are the paper's GPT-2 recipe on
    E2E (LoRA Table 11): AdamW, lr 2e-4, weight decay 0.01, batch 8, 5 epochs, 500 warmup steps
    then linear decay, label smoothing 0.1."""

    lr: float = setting(2e-4, "peak learning rate (AdamW)", "> 0")
    weight_decay: float = setting(0.01, "AdamW weight decay, on matrices (A and B too)", ">= 0")
    batch_size: int = setting(8, "sequences per process per micro-step", ">= 1")
    grad_accum: int = setting(1, "micro-steps per optimizer step", ">= 1")
    epochs: float = setting(5.0, "passes over the training set (unless --max-iters)", "> 0")
    max_iters: int = setting(None, "optimizer steps (overrides --epochs)", ">= 1")
    warmup: int = setting(500, "steps of linear warmup from 0 to --lr (no more than the run's)",
                          ">= 0")
    decay: str = setting("linear", "after warmup: linear or cosine to 0 at the end, or constant",
                         choices=("linear", "cosine", "constant"))
    label_smoothing: float = setting(0.1, "of the training loss (validation has none)", "[0, 1)")
    grad_clip: float = setting(1.0, "max global gradient norm; 0: no clipping", ">= 0")
    seed: int = setting(1337, "initialisation, data order and dropout", "[0, 2**32)")
    eval_interval: int = setting(500, "steps between validation runs (and one at the end)", ">= 1")
    eval_batches: int = setting(100, "validation batches per run (0: the whole split)", ">= 0")
    log_interval: int = setting(10, "steps per line of log.jsonl", ">= 1")
    ckpt_interval: int = setting(None, "steps between checkpoints (default: at each validation)",
                                 range=">= 1")
    amp: str = setting("auto", "autocast: auto = bf16 on GPUs with native bf16 (compute "
                               "capability >= 8.0), else fp16 + loss scaling; fp32 on CPU",
                       choices=("auto", "off", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile the model")
    progress: bool = setting(True, "progress bar")


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
    memory saving of LoRA §4.2). No weight decay on vectors (biases, LayerNorms). Fused kernels
    when available (the step is a large share of a small model's CPU time)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, lr=cfg.lr)


def amp_setup(amp: str, device):
    """--amp (or the precision it resolved to) on device (a torch.device or its name; "cuda"
    is the current GPU), as common.resolve_amp decides -> (autocast context factory,
    GradScaler). Weights and optimizer stay fp32; only the forward runs in bf16/fp16. fp16
    needs loss scaling (its range is narrow), bf16 does not."""
    amp, kind = resolve_amp(amp, device), torch.device(device).type
    scaling = amp == "fp16"
    scaler = torch.amp.GradScaler(kind, enabled=scaling) if hasattr(torch.amp, "GradScaler") \
        else torch.cuda.amp.GradScaler(enabled=scaling)  # torch < 2.3 has only this one
    if amp == "fp32":
        return nullcontext, scaler
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return (lambda: torch.autocast(kind, dtype=dtype)), scaler


# ---------------------------------------------------------------- one step, one evaluation

def token_loss_sum(fwd, x, y, label_smoothing=0.0, target_index=None):
    """Σ over the target tokens of -log p(y_t | x_<t) (with label smoothing): eq. 2's sum, not a
    mean, so that micro-batches and processes can be weighted by their token counts."""
    return fwd(x, y, label_smoothing=label_smoothing, reduction="sum",  # GPT.forward
               target_index=target_index)


def to_device(x, y, device):
    """A CPU batch -> (x, y, target_index) on device, target_index found on the CPU (a nonzero
    on a GPU waits for it: GPT.forward). On CUDA the copies are pinned and do not block."""
    index = (y.flatten() != IGNORE).nonzero().squeeze(1)  # (N,) flat positions of the targets
    pin = device.type == "cuda"
    return tuple((t.pin_memory() if pin else t).to(device, non_blocking=pin) for t in (x, y, index))


def train_step(fwd, model, optimizer, scaler, batches, cfg: TrainConfig, autocast):
    """One optimizer step over this process's micro-batches [(x, y), ...] -> (the mean loss per
    target token of the whole effective batch, skipped). A non-finite loss updates nothing (the
    caller stops); skipped: fp16's loss scaler found inf or nan gradients and updated nothing.

    Normalized as one big batch: each micro-batch's summed loss is divided by N, the number of
    target tokens (y != -100) of all micro-batches of all W processes, counted on the CPU before
    the backward passes; DDP averages over processes, hence the factor W. Only requires_grad
    parameters get gradients (for LoRA: A and B), so nothing here knows LoRA."""
    device, world = next(model.parameters()).device, processes()[1]
    n = float(sum(int((y != IGNORE).sum()) for _, y in batches))  # this process's, no sync
    n = max(n, 1.0) if world == 1 else all_sum(torch.tensor(n, device=device)).clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        x, y, index = to_device(x, y, device)
        with accumulating(fwd, last=i == len(batches) - 1):
            with autocast():
                loss = token_loss_sum(fwd, x, y, cfg.label_smoothing, index)
            scaler.scale(loss * world / n).backward()
        loss_sum += loss.detach()
    train_loss = float(all_sum(loss_sum) / n)  # the step's one wait for the device
    scale = scaler.get_scale()  # 1.0 when disabled (no fp16)
    if math.isfinite(train_loss):
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return train_loss, scaler.get_scale() < scale  # skipped: only a skip lowers the scale


@torch.no_grad()
def evaluate(model, data, batch_size: int = 8, max_batches=None) -> float:
    """Mean loss per target token (targets -100 excluded) over data's first max_batches
    evaluation batches (None or 0: all), without label smoothing, in one precision whatever the
    run's --amp: the weights' dtype (fp32 unless loaded in half precision), autocast off even
    inside an autocast region, so validation losses compare (a bf16 run's, studies' base)."""
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    total, count = 0.0, 0
    with torch.autocast(device.type, enabled=False):
        for x, y in data.eval_batches(batch_size, max_batches or None):
            count += int((y != IGNORE).sum())
            x, y, index = to_device(x, y, device)
            total += float(token_loss_sum(model, x, y, target_index=index))
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------- the loop

def train(model, train_data, val_data, cfg: TrainConfig, out_dir=None, save=None,
          resume=False, overwrite=False, run: dict = None) -> list[dict]:
    """Train the parameters of `model` that have requires_grad; -> history, one dict per
    log_interval steps: step, train_loss, lr, tokens_per_s, train_s (seconds of training so far,
    validation left out), val_loss where evaluated, skipped_steps (by fp16's loss scaler so far;
    a skipped step is no step: max_iters and the schedule count the optimizer steps taken).

    save(model, out_dir) writes the result (full model or LoRA adapter) at each checkpoint and
    at the end; out_dir also gets ckpt.pt (for resume=True), log.jsonl and loss.png (the run's
    bookkeeping: runs.RunRecords). run: what else defines the run (model, data, LoRA settings),
    checked on resume. Ctrl-C stops at the next step boundary, checkpointed. Under torchrun rank
    0 evaluates, logs and saves; all that is distributed is in the section "torchrun" below."""
    rank, world = processes()
    B, accum = check_dataclass(cfg).batch_size, cfg.grad_accum  # settings in range, or an error
    device = next(model.parameters()).device
    settings = run_settings(cfg, run, device)  # --amp auto resolved for this device
    max_iters = run_length(cfg, train_data, world, settings["amp"])
    optimizer = make_optimizer(model, cfg)
    autocast, scaler = amp_setup(settings["amp"], device)
    fwd = wrap_model(model, cfg, world)
    with RunRecords(out_dir, cfg, max_iters, model, optimizer, scaler, save=save,
                    validate=lambda: evaluate(model, val_data, B, cfg.eval_batches),
                    settings=settings, resume=resume, overwrite=overwrite,
                    rank=rank) as records:
        records.begin()
        model.train()
        while records.step < max_iters:
            lr = lr_at(records.step, cfg, max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Dropout (LoRA's too) draws from a seed fixed by (seed, batch, rank): a resumed
            # run repeats the uninterrupted one exactly, with no RNG state to save.
            b = records.batches  # batches drawn so far
            torch.manual_seed(cfg.seed + 1_000_003 * b + 7919 * rank)
            batches = [train_data.get_batch(B, (b * accum + m) * world + rank, cfg.seed)
                       for m in range(accum)]
            loss, skipped = train_step(fwd, model, optimizer, scaler, batches, cfg, autocast)
            records.end_step(loss, lr, sum(x.numel() for x, _ in batches) * world, skipped)
    return records.history


def run_length(cfg: TrainConfig, train_data, world: int, precision: str) -> int:
    """The run's optimizer steps: --max-iters, or --epochs of train_data (printed on rank 0).
    ValueError for data smaller than one batch, or a warmup longer than the run."""
    B = cfg.batch_size
    if len(train_data) < B * world:
        raise ValueError(f"{train_data.name} has {len(train_data):,} samples, fewer than one "
                         f"batch ({B} x {world} processes): use more data or a smaller batch")
    per_epoch = math.ceil(len(train_data) / (B * cfg.grad_accum * world))
    max_iters = cfg.max_iters or max(1, round(cfg.epochs * per_epoch))
    if cfg.warmup > max_iters:  # the learning rate would never reach --lr, nor decay
        raise ValueError(f"--warmup {cfg.warmup} is longer than the run (" + (
            f"--max-iters {max_iters}" if cfg.max_iters else f"--epochs {cfg.epochs:g}: "
            f"{max_iters:,} steps") + f"): pass a --warmup of at most {max_iters}, or train longer")
    if processes()[0] == 0:
        print(f"training {max_iters:,} steps in {precision} ({per_epoch:,} per epoch of "
              f"{len(train_data):,} samples; batch {B} x {cfg.grad_accum} accum x {world} "
              f"processes)")
    return max_iters


# ---------------------------------------------------------------- torchrun: all that is distributed

def processes() -> tuple[int, int]:
    """(rank, world size): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def wrap_model(model, cfg: TrainConfig, world: int):
    """What the loop calls forward on: the model, in DDP under torchrun (it all-reduces the
    gradients of the requires_grad parameters only: for LoRA, A and B), compiled if asked."""
    fwd = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        device = next(model.parameters()).device
        fwd = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(fwd) if cfg.compile else fwd


def accumulating(fwd, last: bool):
    """Around a micro-step: DDP all-reduces the gradients in the last one's backward only."""
    return fwd.no_sync() if processes()[1] > 1 and not last else nullcontext()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the processes, in place (t itself without torchrun)."""
    if processes()[1] > 1:
        dist.all_reduce(t)
    return t


# ================================================================ command line (finetune.py too)

_GROUPS = {"lr": "training (defaults: the paper's GPT-2 E2E recipe, LoRA Table 11)",
           "eval_interval": "evaluation and output", "amp": "system"}  # first field: heading


def add_train_args(p: argparse.ArgumentParser, out: str, heading=None):
    """TrainConfig's fields as --flags (help and defaults from TrainConfig), and --out,
    --resume, --overwrite, --device."""
    groups = add_dataclass_args(p, TrainConfig, {**_GROUPS, **({"lr": heading} if heading
                                                               else {})})
    g = groups["eval_interval"]
    g.add_argument("--out", default=out, help="output directory")
    g.add_argument("--resume", action="store_true",
                   help="continue the run checkpointed in --out, with its settings (a flag "
                        "given with another value is refused)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out")
    groups["amp"].add_argument("--device", default="auto",
                               help="auto (cuda if present), cpu, cuda:1, ...")


def config_from_args(args) -> TrainConfig:
    return check_dataclass(TrainConfig(**{f.name: getattr(args, f.name)
                                          for f in fields(TrainConfig)}))


# From scratch: the quick start's base, 7.2M parameters (6.4M: GPT-2's token embedding, whose
# projection is most of the compute), 200 x 16 x 128 tokens of data/pretrain: ~8 min on 2 cores.
SCRATCH = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
SCRATCH_TRAIN = dict(lr=2e-3, weight_decay=0.1, max_iters=200, warmup=20, decay="cosine",
                     label_smoothing=0.0, eval_interval=50, eval_batches=20, batch_size=16)


def main(argv=None):
    p = ArgumentParser(
        description="Pretrain a small GPT from scratch (default: the quick start's base on "
                    "data/pretrain, about 8 minutes on a quiet 2-core CPU), or fine-tune every "
                    "weight of a pretrained one (--init; default data: e2e): the full "
                    "fine-tuning baseline LoRA is compared against. The result is a model "
                    "directory that finetune.py --init accepts.",
        formatter_class=HelpFormatter, epilog="With --init the training defaults are the "
        "paper's GPT-2 recipe (see `python train.py --init gpt2 --help`).")
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--init")
    scratch = pre.parse_known_args(argv)[0].init is None  # the defaults depend on it
    g = p.add_argument_group("model")
    g.add_argument("--init", default=None,
                   help="fine-tune this model fully (gpt2, gpt2-medium, ..., a directory or "
                        "weights file); default: a new model from scratch")
    for k, v in SCRATCH.items():
        if k != "block_size":
            g.add_argument(f"--{k.replace('_', '-')}", type=int, default=v,
                           help="(from scratch)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the model")
    add_data_args(p, default="pretrain" if scratch else "e2e")
    add_train_args(p, "out/train", heading=scratch and "training (defaults: from scratch)")
    if scratch:  # the small-model defaults, unless given
        p.set_defaults(**SCRATCH_TRAIN, block_size=SCRATCH["block_size"])
    args = p.parse_args(argv)
    if args.resume:  # the run's settings (--init included) from its checkpoint
        resume_args(args, given_flags(p, argv))
    cfg = config_from_args(args)

    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(cfg.seed)
    if args.init is not None:
        model = GPT.from_pretrained(args.init, device=device, dropout=args.dropout)
    else:
        config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                           block_size=args.block_size, dropout=args.dropout)
        model = GPT(config).to(device)
    train_data, val_data = data_from_args(args, model.config.block_size, model.config.vocab_size)
    if rank == 0:
        print(f"{'fine-tuning ' + args.init if args.init else 'new model'}: "
              f"{model.num_params():,} parameters, all trained")
    run = {k: getattr(args, k) for k in ("init", "data", "block_size", "dropout", *SCRATCH)}
    try:
        train(model, train_data, val_data, cfg, args.out, save=lambda m, d: m.save_pretrained(d),
              resume=args.resume, overwrite=args.overwrite, run=run)
    except KeyboardInterrupt as e:  # Ctrl-C: say which step is saved, and how to go on
        say_how_to_continue(e, args.out, "train.py")
        raise
    if rank == 0:
        print(f"saved {args.out}/model.safetensors "
              f"({file_size(Path(args.out) / 'model.safetensors')})")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
