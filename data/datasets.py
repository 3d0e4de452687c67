"""Datasets the training loop reads: a token stream (language modelling) or prompt/completion
examples (the loss on the completion only, LoRA eq. 2), prepared by data/NAME/prepare.py or read
from a user's own .txt / .jsonl file.

Every batch is a pure function of (seed, batch number): data order needs no saved state, so a
resumed run sees exactly the batches an uninterrupted run would, and DDP ranks (which take
interleaved batch numbers) never see the same batch.
"""

import importlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock  # a dependency of torch's

from data.files import DownloadError, prepared_folder, read_meta, read_text
from support.common import EOT_TOKEN, get_tokenizer

# The named sets, each prepared by data/NAME/prepare.py into data/NAME, and what the folder
# its --raw-dir takes must hold.
SETS = {"e2e": "the E2E CSVs (devset.csv and testset_w_refs.csv; with trainset.csv too, "
               "the official splits)",
        "pretrain": "tinyshakespeare/input.txt and e2e/ with the E2E CSVs",
        "shakespeare": "input.txt"}
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
        start, plen, n = self.index.T
        bad = np.flatnonzero((start < 0) | (plen < 1) | (plen >= n) | (start + n > len(tokens)))
        if len(bad):  # an index from another run, say: refused, not read out of bounds
            raise ValueError(f"{name}: example {bad[0]} (start {start[bad[0]]}, prompt "
                             f"{plen[bad[0]]}, length {n[bad[0]]} tokens) does not fit its "
                             f"{len(tokens):,} tokens with a prompt and a completion")
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


def _prepared(directory: Path, meta: dict, split: str, block_size: int):
    """One split of a prepared directory; meta: its meta.json, checked by data.files.read_meta."""
    arrays = [f"{split}.bin"] + ([f"{split}.idx.bin"] if meta["kind"] == "examples" else [])
    for a in arrays:
        if a not in meta["files"]:
            raise ValueError(f"{directory / 'meta.json'}: lists no {a}: prepare it again")
    folder = prepared_folder(directory, meta)  # the one meta.json names
    tokens = np.memmap(folder / arrays[0], dtype=np.uint16, mode="r")
    name = f"{directory.name}/{split}"
    if meta["kind"] == "examples":
        index = np.fromfile(folder / arrays[1], dtype=np.int64)
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
    """A user's {"prompt": ..., "completion": ...} lines, both strings, the prompt not empty;
    every 10th example is validation. Checked before anything trains: a bad line is one
    ValueError naming file:line (a byte-order mark is allowed)."""
    pairs = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            prompt, completion = ex["prompt"], ex["completion"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: expected a JSON object with 'prompt' and "
                             f"'completion'") from None
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"{path}:{n}: 'prompt' and 'completion' must be strings, got "
                             f"{type(prompt).__name__} and {type(completion).__name__}")
        if not prompt:
            raise ValueError(f"{path}:{n}: empty 'prompt': the completion's first token needs "
                             f"a prompt token to be predicted from")
        pairs.append((prompt, completion))
    if len(pairs) < 10:
        raise ValueError(f"{path}: {len(pairs)} examples; at least 10 are needed (every 10th "
                         f"is held out for validation)")
    enc = get_tokenizer()
    parts = {"train": [p for i, p in enumerate(pairs) if i % 10 != 9], "val": pairs[9::10]}
    return tuple(Examples(*tokenize_examples(ps, enc), block_size, f"{path.name} ({s})")
                 for s, ps in parts.items())


def _from_text(path: Path, block_size: int):
    """A user's plain text: the first 90% of its tokens for training, the rest for validation."""
    ids = np.array(get_tokenizer().encode_ordinary(read_text(path)), dtype=np.uint16)
    cut = int(0.9 * len(ids))
    return (TokenStream(ids[:cut], block_size, f"{path.name} (train)"),
            TokenStream(ids[cut:], block_size, f"{path.name} (val)"))


def prepared_set(name: str) -> Path:
    """The directory of the named set (one of SETS: the HERE of data/NAME/prepare.py), prepared
    first if it is not yet: raw files downloaded from their canonical source, as `python -m
    data.NAME` does, with one line saying so. Under torchrun every process calls this: a file
    lock lets one of them prepare while the others wait, then find the set prepared. Offline,
    an OSError whose one line names the command that prepares from a local copy; the download
    and the set are each written whole or not at all (data.files)."""
    module = importlib.import_module(f"data.{name}.prepare")
    home = Path(module.HERE)
    if (home / "meta.json").exists():
        return home
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / ".prepare.lock"):
        if (home / "meta.json").exists():  # another process prepared it while this one waited
            return home
        print(f"data '{name}' is not prepared yet: preparing it now, as python -m data.{name} "
              f"does")
        try:
            module.prepare(None, home)
        except DownloadError as e:
            raise OSError(f"data '{name}' is not prepared, and {e.url} could not be downloaded "
                          f"({e.reason}): offline, run `python -m data.{name} --raw-dir DIR` "
                          f"with DIR holding {SETS[name]}") from None
    return home


def load_data(name_or_path: str, block_size: int, vocab_size=None):
    """-> (train, val) datasets. name_or_path: a set under data/ (one of SETS, prepared on first
    use: prepared_set), a prepared directory, a .jsonl file of prompt/completion pairs, or a
    text file. vocab_size: the model's; a token id outside it is a ValueError naming the data,
    here, not an index error in the middle of training."""
    p = Path(name_or_path)
    if name_or_path in SETS and not p.exists():
        p = prepared_set(name_or_path)
    if p.is_dir() and (p / "meta.json").exists():
        meta = read_meta(p)  # every file of the size meta.json records: one prepare run's
        data = tuple(_prepared(p, meta, split, block_size) for split in ("train", "val"))
    elif p.is_file():
        data = (_from_jsonl if p.suffix == ".jsonl" else _from_text)(p, block_size)
    else:
        raise FileNotFoundError(f"unknown data '{name_or_path}': use a named set "
                                f"({', '.join(SETS)}), a .txt file, or a .jsonl file of "
                                f'{{"prompt": ..., "completion": ...}} lines')
    if vocab_size is not None:
        for d in data:
            top = int(d.tokens.max())
            if top >= vocab_size:
                raise ValueError(f"{d.name}: token id {top} is outside the model's vocabulary "
                                 f"(vocab_size {vocab_size}): this data needs a model with "
                                 f"GPT-2's {EOT_TOKEN + 1:,} tokens")
    return data


def add_data_args(p, default: str):
    """--data and --block-size, for the training scripts."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default,
                   help="a named set (e2e, pretrain, shakespeare: prepared on first use, "
                        "or by python -m data.NAME), a prepared directory, a .txt file, or a "
                        ".jsonl file of {\"prompt\", \"completion\"} lines")
    g.add_argument("--block-size", type=int, default=None,
                   help="longest sequence trained on (>= 1; default: the model's n_positions; "
                        "train.py's model from scratch has 128)")


def data_from_args(args, n_positions: int, vocab_size=None):
    """(train, val) of --data, with --block-size checked against the model's n_positions and
    every token id against its vocab_size."""
    block_size = n_positions if args.block_size is None else args.block_size
    if not 1 <= block_size <= n_positions:
        raise ValueError(f"--block-size {block_size} is outside 1..{n_positions}, the model's "
                         f"n_positions")
    return load_data(args.data, block_size, vocab_size)
