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

from data.datasets import add_data_args, data_from_args, prepared_set
from data.files import read_meta
from lora import BIAS_OPTIONS, TARGETS, apply_lora, describe_trainable
from model import GPT
from support.adapters import save_adapter
from support.common import (ADAPTER_FILE, FINETUNE_OUT, ArgumentParser, HelpFormatter,
                            check_flags, file_size, run_main, setup_distributed)
from support.runs import given_flags, resume_args, say_how_to_continue
from train import add_train_args, config_from_args, train

LORA_DEFAULTS = inspect.signature(apply_lora).parameters  # apply_lora's: Table 11
# The allowed values of the numeric flags (common.RANGES): in --help, checked before anything loads.
_FLAG_RANGES = {"rank": ">= 1", "alpha": "> 0", "dropout": "[0, 1)", "block_size": ">= 1"}


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                       epilog="A named --data set not yet prepared is downloaded and "
                              "prepared on first use; offline, run `python -m data.e2e "
                              "--raw-dir DIR` first.")
    g = p.add_argument_group("base model")
    g.add_argument("--init", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                   "(Hugging Face cache or download), a directory with config.json + "
                   "model.safetensors (e.g. what train.py wrote), or a weights file")
    g = p.add_argument_group("LoRA (defaults: the paper's GPT-2 setting, Table 11)")
    g.add_argument("--rank", type=int, default=LORA_DEFAULTS["rank"].default,
                   help=f"r, the rank of B A ({_FLAG_RANGES['rank']})")
    g.add_argument("--alpha", type=float, default=LORA_DEFAULTS["alpha"].default,
                   help=f"α; the update is scaled by α/r ({_FLAG_RANGES['alpha']})")
    g.add_argument("--targets", default=",".join(LORA_DEFAULTS["targets"].default),
                   type=target_list, help=f"comma-separated weights to adapt: {', '.join(TARGETS)}")
    g.add_argument("--dropout", type=float, default=LORA_DEFAULTS["dropout"].default,
                   help=f"dropout on LoRA's input ({_FLAG_RANGES['dropout']})")
    g.add_argument("--bias", default="none", choices=BIAS_OPTIONS, help="biases that train too")
    g.add_argument("--rslora", action="store_true", help="scale by α/√r instead of α/r")
    add_data_args(p, default="e2e")
    add_train_args(p, out=FINETUNE_OUT)
    return p


def target_list(text: str) -> list:
    """--targets "v, q" -> ["q", "v"]: in TARGETS' order, as model.lora_config records them (so
    --resume compares like with like); unknown names kept last, for apply_lora to refuse."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    return [t for t in TARGETS if t in names] + [t for t in names if t not in TARGETS]


def finetune(args):
    """Base model + apply_lora + train.train; the adapter goes to args.out. -> the model."""
    cfg = config_from_args(args)  # every setting in range before anything loads
    check_flags(args, _FLAG_RANGES)
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(cfg.seed)  # the same A on every process
    model = GPT.from_pretrained(args.init, device=device)
    train_data, val_data = data_from_args(args, model.config.block_size, model.config.vocab_size)
    apply_lora(model, rank=args.rank, alpha=args.alpha, targets=args.targets, dropout=args.dropout,
               bias=args.bias, rslora=args.rslora)
    if rank == 0:
        print(describe_trainable(model))
    adapter = Path(args.out) / ADAPTER_FILE
    run = {"init": args.init, "data": args.data, "block_size": args.block_size,
           **model.lora_config}
    data = Path(args.data) if Path(args.data).exists() else prepared_set(args.data)
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
    p = parser()
    args = p.parse_args(argv)
    if args.resume:  # the run's settings from its checkpoint, but those given here
        resume_args(args, given_flags(p, argv))
    try:
        finetune(args)
    except KeyboardInterrupt as e:  # Ctrl-C: say which step is saved, and how to go on
        say_how_to_continue(e, args.out, "finetune.py")
        raise
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
