"""Datasets the training loop reads: a token stream (language modelling) or prompt/completion
examples (the loss on the completion only, LoRA eq. 2), prepared by data/NAME/prepare.py or read
from a user's own .txt / .jsonl file.

Every batch is a pure function of (seed, batch number): data order needs no saved state, so a
resumed run sees exactly the batches an uninterrupted run would, and DDP ranks (which take
interleaved batch numbers) never see the same batch.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from common import EOT_TOKEN, get_tokenizer

DATA_DIR = Path(__file__).resolve().parent
IGNORE = -100  # target id of positions without loss (model.forward, F.cross_entropy)
PAD = EOT_TOKEN  # input id of padding positions (their targets are IGNORE)


class TokenStream:
    """One long array of tokens; a sample is a random window of block_size + 1 tokens."""

    def __init__(self, tokens, block_size: int, name="data"):
        if len(tokens) <= block_size:
            raise ValueError(f"{name} has {len(tokens):,} tokens, fewer than one sample of "
                             f"block_size + 1 = {block_size + 1}: use more text or a smaller "
                             f"--block-size")
        self.tokens, self.block_size, self.name = tokens, block_size, name

    def __len__(self):  # samples in one pass, without overlap
        return len(self.tokens) // (self.block_size + 1)

    def _batch(self, starts):
        T = self.block_size
        w = torch.from_numpy(np.stack([self.tokens[s:s + T + 1] for s in starts]).astype(np.int64))
        return w[:, :-1], w[:, 1:]  # (B, T) inputs, (B, T) next-token targets

    def get_batch(self, batch_size: int, index: int = 0, seed: int = 0):
        """Batch number `index`: batch_size windows at positions drawn from (seed, index)."""
        rng = np.random.default_rng((seed, index))
        return self._batch(rng.integers(0, len(self.tokens) - self.block_size, batch_size))

    def eval_batches(self, batch_size: int, max_batches=None):
        """Consecutive, non-overlapping windows from the start: the same every call."""
        starts = np.arange(0, len(self.tokens) - self.block_size, self.block_size)
        for i, b in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self._batch(starts[b:b + batch_size])


class Examples:
    """Prompt/completion examples stored back to back; index rows are (start, prompt length,
    length). Inputs are right-padded to the longest row of the batch; targets are IGNORE on the
    prompt and the padding, so only completion tokens (and the closing <|endoftext|>) are
    learned: log p(y | x) of LoRA eq. 2."""

    def __init__(self, tokens, index, block_size: int, name="data"):
        self.tokens, self.index = tokens, np.asarray(index, dtype=np.int64).reshape(-1, 3)
        self.block_size, self.name = block_size, name
        if len(self.index) == 0:
            raise ValueError(f"{name} has no examples")
        n_long = int((self.index[:, 2] > block_size + 1).sum())
        if n_long and os.environ.get("RANK", "0") == "0":  # once under torchrun
            print(f"note: {n_long} of {len(self)} examples in {name} are longer than "
                  f"block_size {block_size} and are cut")
        if (self.index[:, 1] >= block_size + 1).any():
            raise ValueError(f"{name}: a prompt is longer than block_size {block_size}, so its "
                             f"completion would be cut away entirely: raise --block-size")
        self._perm = (None, None)  # (epoch, permutation) of the last batch

    def __len__(self):
        return len(self.index)

    def _batch(self, rows):
        rows = self.index[rows]
        lengths = np.minimum(rows[:, 2], self.block_size + 1)
        T = int(lengths.max()) - 1
        x = torch.full((len(rows), T), PAD, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for i, ((start, plen, _), n) in enumerate(zip(rows, lengths)):
            seq = torch.from_numpy(self.tokens[start:start + n].astype(np.int64))
            x[i, :n - 1] = seq[:-1]
            y[i, plen - 1:n - 1] = seq[plen:]  # targets from the first completion token on
        return x, y

    def _permutation(self, epoch: int, seed: int):
        if self._perm[0] != (epoch, seed):
            rng = np.random.default_rng((seed, epoch))
            self._perm = ((epoch, seed), rng.permutation(len(self)))
        return self._perm[1]

    def get_batch(self, batch_size: int, index: int = 0, seed: int = 0):
        """Batch number `index` of a shuffled pass over the examples, epoch after epoch; every
        example is seen once per epoch (each epoch has its own permutation from the seed)."""
        rows = []
        for pos in range(index * batch_size, (index + 1) * batch_size):
            epoch, i = divmod(pos, len(self))
            rows.append(self._permutation(epoch, seed)[i])
        return self._batch(np.array(rows))

    def eval_batches(self, batch_size: int, max_batches=None):
        """The examples in order, batch_size at a time: the same every call."""
        for i, b in enumerate(range(0, len(self), batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self._batch(np.arange(b, min(b + batch_size, len(self))))


def _prepared(directory: Path, split: str, block_size: int):
    meta = json.loads((directory / "meta.json").read_text())
    tokens = np.memmap(directory / f"{split}.bin", dtype=np.uint16, mode="r")
    name = f"{directory.name}/{split}"
    if meta["kind"] == "examples":
        index = np.fromfile(directory / f"{split}.idx.bin", dtype=np.int64)
        return Examples(tokens, index, block_size, name)
    return TokenStream(tokens, block_size, name)


def tokenize_examples(pairs, enc):
    """[(prompt, completion), ...] -> (tokens, index): every example's prompt tokens, then its
    completion's and <|endoftext|>, back to back; index rows (start, prompt length, length)."""
    tokens, index = [], []
    for prompt, completion in pairs:
        p, c = enc.encode_ordinary(prompt), enc.encode_ordinary(completion) + [EOT_TOKEN]
        index.append((len(tokens), len(p), len(p) + len(c)))
        tokens += p + c
    return np.array(tokens, dtype=np.uint16), np.array(index, dtype=np.int64).reshape(-1, 3)


def _from_jsonl(path: Path, block_size: int):
    """A user's {"prompt": ..., "completion": ...} lines; every 10th line is validation."""
    pairs = []
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is allowed
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                pairs.append((ex["prompt"], ex["completion"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with 'prompt' and "
                                 f"'completion'") from None
    enc = get_tokenizer()
    parts = {"train": [p for i, p in enumerate(pairs) if i % 10 != 9], "val": pairs[9::10]}
    return tuple(Examples(*tokenize_examples(ps, enc), block_size, f"{path.name} ({s})")
                 for s, ps in parts.items())


def _from_text(path: Path, block_size: int):
    """A user's plain text: the first 90% of its tokens for training, the rest for validation."""
    ids = np.array(get_tokenizer().encode_ordinary(path.read_text(encoding="utf-8")),
                   dtype=np.uint16)
    cut = int(0.9 * len(ids))
    return (TokenStream(ids[:cut], block_size, f"{path.name} (train)"),
            TokenStream(ids[cut:], block_size, f"{path.name} (val)"))


def load_data(name_or_path: str, block_size: int):
    """-> (train, val) datasets. name_or_path: a prepared set under data/ ("e2e",
    "shakespeare"), a prepared directory, a .jsonl file of prompt/completion pairs, or a text
    file."""
    p = Path(name_or_path)
    named = DATA_DIR / name_or_path
    if (named / "prepare.py").exists() and not p.exists():
        if not (named / "meta.json").exists():
            raise FileNotFoundError(f"data '{name_or_path}' is not prepared: run "
                                    f"`python data/{name_or_path}/prepare.py` (add --raw-dir DIR "
                                    f"to use a local copy of the raw files)")
        p = named
    if p.is_dir() and (p / "meta.json").exists():
        return _prepared(p, "train", block_size), _prepared(p, "val", block_size)
    if p.is_file():
        return (_from_jsonl if p.suffix == ".jsonl" else _from_text)(p, block_size)
    known = sorted(d.name for d in DATA_DIR.iterdir() if (d / "prepare.py").exists())
    raise FileNotFoundError(f"unknown data '{name_or_path}': use a prepared set "
                            f"({', '.join(known)}), a .txt file, or a .jsonl file of "
                            f'{{"prompt": ..., "completion": ...}} lines')


def add_data_args(p, default: str):
    """--data and --block-size, for the training scripts."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default,
                   help="a prepared set (e2e, shakespeare: run data/NAME/prepare.py first), a "
                        ".txt file, or a .jsonl file of {\"prompt\", \"completion\"} lines")
    g.add_argument("--block-size", type=int, default=None,
                   help="longest sequence trained on (default: the model's n_positions; "
                        "train.py's model from scratch has 128)")


def data_from_args(args, n_positions: int):
    """(train, val) of --data, with --block-size checked against the model's n_positions."""
    block_size = args.block_size or n_positions
    if not 1 <= block_size <= n_positions:
        raise ValueError(f"--block-size {block_size} is outside 1..{n_positions}, the model's "
                         f"n_positions")
    return load_data(args.data, block_size)
