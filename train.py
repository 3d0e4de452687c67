"""Setup shared by every script (device, base model, tokenizer, error handling) and, below it,
the one training loop used by train.py (pretraining, full fine-tuning) and finetune.py (LoRA)."""

import sys

import torch

from model import GPT


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
