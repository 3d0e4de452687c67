"""Fine-tune GPT-2 with LoRA: load a base model, add low-rank adapters, train only A and B.

    python finetune.py --rank 4                         # GPT-2 on E2E, the paper's recipe
    python finetune.py --init out/train --max-iters 300 --warmup 30 --lr 1e-2  # train.py's base

Each adapted weight W0 becomes W0 + (α/r) B A with W0 frozen (LoRA §4.1): the optimizer holds
state for A and B only, the gradients of W0 are never computed, and what is saved is the adapter,
a few hundred KB against the base model's hundreds of MB. The loop is train.train, the same one
full fine-tuning (python train.py --init gpt2) uses. Output (--out): adapter.safetensors (for
sample.py, or adapters.load_adapter), ckpt.pt (for --resume), log.jsonl, loss.png.
"""

import argparse
import inspect
from pathlib import Path

import torch
import torch.distributed as dist

from data.datasets import DATA_DIR, add_data_args, data_from_args
from data.files import read_meta
from lora import BIAS_OPTIONS, TARGETS, apply_lora, describe_trainable
from model import GPT
from support.adapters import save_adapter
from support.common import (ADAPTER_FILE, FINETUNE_OUT, ArgumentParser, HelpFormatter,
                            check_flags, file_size, run_main, setup_distributed)
from train import add_train_args, config_from_args, train

LORA_DEFAULTS = inspect.signature(apply_lora).parameters  # apply_lora's: Table 11
RANGES = {"rank": ">= 1", "alpha": "> 0", "dropout": "[0, 1)", "block_size": ">= 1"}  # in --help


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                       epilog="Run `python -m data.e2e` once first (add "
                              "--raw-dir DIR to use local CSVs).")
    g = p.add_argument_group("base model")
    g.add_argument("--init", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                   "(Hugging Face cache or download), a directory with config.json + "
                   "model.safetensors (e.g. what train.py wrote), or a weights file")
    g = p.add_argument_group("LoRA (defaults: the paper's GPT-2 setting, Table 11)")
    g.add_argument("--rank", type=int, default=LORA_DEFAULTS["rank"].default,
                   help=f"r, the rank of B A ({RANGES['rank']})")
    g.add_argument("--alpha", type=float, default=LORA_DEFAULTS["alpha"].default,
                   help=f"α; the update is scaled by α/r ({RANGES['alpha']})")
    g.add_argument("--targets", default=",".join(LORA_DEFAULTS["targets"].default),
                   help=f"comma-separated weights to adapt: {', '.join(TARGETS)}")
    g.add_argument("--dropout", type=float, default=LORA_DEFAULTS["dropout"].default,
                   help=f"dropout on LoRA's input ({RANGES['dropout']})")
    g.add_argument("--bias", default="none", choices=BIAS_OPTIONS, help="biases that train too")
    g.add_argument("--rslora", action="store_true", help="scale by α/√r instead of α/r")
    add_data_args(p, default="e2e")
    add_train_args(p, out=FINETUNE_OUT)
    return p


def finetune(args):
    """Base model + apply_lora + train.train; the adapter goes to args.out. -> the model."""
    cfg = config_from_args(args)  # every setting in range before anything loads
    check_flags(args, RANGES)
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(cfg.seed)  # the same A on every process
    model = GPT.from_pretrained(args.init, device=device)
    train_data, val_data = data_from_args(args, model.config.block_size, model.config.vocab_size)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    apply_lora(model, rank=args.rank, alpha=args.alpha, targets=targets, dropout=args.dropout,
               bias=args.bias, rslora=args.rslora)
    if rank == 0:
        print(describe_trainable(model))
    adapter = Path(args.out) / ADAPTER_FILE
    run = {"init": args.init, "data": args.data, "block_size": args.block_size,
           **model.lora_config}
    data = Path(args.data) if Path(args.data).exists() else DATA_DIR / args.data
    form = read_meta(data).get("prompt_format") if (data / "meta.json").is_file() else None
    train(model, train_data, val_data, cfg, args.out, resume=args.resume,
          overwrite=args.overwrite, run=run,  # the adapter records the task's prompt format
          save=lambda m, d: save_adapter(m, Path(d) / ADAPTER_FILE, base_name=args.init,
                                         prompt_format=form))  # for sample.py
    if rank == 0:
        base_mb = sum(p.nbytes for n, p in model.named_parameters() if ".lora_" not in n) / 2**20
        print(f"adapter: {adapter} ({file_size(adapter)}); base weights: {base_mb:.1f} MB")
    return model


def main(argv=None):
    finetune(parser().parse_args(argv))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
