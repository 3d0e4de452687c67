"""E2E NLG (Novikova et al. 2017), the paper's GPT-2 task (LoRA §5.5, Table 3): a restaurant's
meaning representation (MR) -> a sentence about it.

    python data/e2e/prepare.py                              # download the official release
    python data/e2e/prepare.py --raw-dir ../shared/data/e2e # or use a local copy of the CSVs

Each example is the prompt `format_prompt(mr)` = "mr ||", then the completion " ref" and
<|endoftext|>. The loss is taken on the completion and <|endoftext|> only, never on the prompt:
the paper's conditional objective, eq. 2, maximises log p(y | x) of the target y given x.

Splits:
- With the official release (trainset.csv there): train = trainset, val = devset,
  test = testset_w_refs (42,061 / 4,672 / 4,693 rows).
- With only devset.csv and testset_w_refs.csv (the offline copy this repository's CI uses):
  train and val are carved out of devset by *distinct MR*: every 10th distinct MR, in file order,
  goes to val, the rest to train, so no MR is in both; test = testset_w_refs.

Writes data/e2e/{train,val,test}.bin (uint16 tokens of all examples, back to back),
{split}.idx.bin (int64 rows: start, prompt length, length), {val,test}.refs.json (each
distinct MR with all its references, what sample.py --eval scores against) and meta.json.
"""

import argparse
import csv
import json
import zipfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `data` importable from the repo root
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import atomic_write, get_tokenizer, run_main  # noqa: E402
from data.datasets import tokenize_examples  # noqa: E402
from data.files import download, write_meta, write_tokens  # noqa: E402

HERE = Path(__file__).resolve().parent
# The official release (tuetschek/e2e-dataset, v1.0.0): one ZIP with the four CSVs.
RELEASE_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
OFFICIAL = {"train": "trainset.csv", "val": "devset.csv", "test": "testset_w_refs.csv"}
SPLITS = ("train", "val", "test")


def format_prompt(mr: str) -> str:
    """The text the model is given; it then writes " " + the reference and <|endoftext|>."""
    return mr + " ||"


def format_completion(ref: str) -> str:
    return " " + ref


def read_csv(path: Path) -> list[tuple[str, str]]:
    """(mr, ref) rows of an E2E CSV (columns mr, ref)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["mr"].strip(), row["ref"].strip()) for row in csv.DictReader(f)]


def load_pairs(split: str, raw_dir=None) -> list[tuple[str, str]]:
    """(mr, ref) rows of one split, formed as the module docstring says."""
    if split not in SPLITS:
        raise ValueError(f"unknown E2E split '{split}': use one of {', '.join(SPLITS)}")
    raw = Path(raw_dir) if raw_dir is not None else HERE / "raw"
    if (raw / OFFICIAL["train"]).exists():
        return read_csv(raw / OFFICIAL[split])
    for name in ("devset.csv", "testset_w_refs.csv"):
        if not (raw / name).exists():
            raise FileNotFoundError(f"{raw / name} not found: run `python data/e2e/prepare.py` "
                                    f"(downloads it) or pass --raw-dir DIR with the E2E CSVs")
    if split == "test":
        return read_csv(raw / "testset_w_refs.csv")
    dev = read_csv(raw / "devset.csv")
    mrs = list(dict.fromkeys(mr for mr, _ in dev))  # distinct MRs in file order
    val_mrs = set(mrs[9::10])  # every 10th distinct MR
    return [(mr, ref) for mr, ref in dev if (mr in val_mrs) == (split == "val")]


def load_references(split: str, raw_dir=None, prepared=HERE) -> list[tuple[str, list[str]]]:
    """Distinct MRs of a split in file order, each with all its references (for BLEU etc.):
    from the CSVs in raw_dir if given, else from what prepare() wrote to `prepared`."""
    if raw_dir is None:
        path = Path(prepared) / f"{split}.refs.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `python data/e2e/prepare.py` (add "
                                    f"--raw-dir DIR with the E2E CSVs offline)")
        return [(mr, refs) for mr, refs in json.loads(path.read_text(encoding="utf-8"))]
    refs: dict[str, list[str]] = {}
    for mr, ref in load_pairs(split, raw_dir):
        refs.setdefault(mr, []).append(ref)
    return list(refs.items())


def tokenize_pairs(pairs, enc):
    """(mr, ref) pairs -> (tokens, index) of prompt + completion examples (tokenize_examples)."""
    return tokenize_examples([(format_prompt(mr), format_completion(ref)) for mr, ref in pairs],
                             enc)


def fetch_release(raw_dir: Path) -> Path:
    """Download the release ZIP into raw_dir and unpack its CSVs there."""
    z = download(RELEASE_URL, raw_dir / "e2e-dataset.zip")
    with zipfile.ZipFile(z) as zf:
        for info in zf.infolist():
            name = Path(info.filename).name
            if name.endswith(".csv") and not (raw_dir / name).exists():
                (raw_dir / name).write_bytes(zf.read(info))
    return raw_dir


def prepare(raw_dir=None, out_dir=HERE) -> dict:
    raw_dir = Path(raw_dir) if raw_dir is not None else fetch_release(HERE / "raw")
    out_dir = Path(out_dir)
    enc = get_tokenizer()
    meta = {"kind": "examples", "official_splits": (raw_dir / OFFICIAL["train"]).exists(),
            "splits": {}}
    for split in SPLITS:
        pairs = load_pairs(split, raw_dir)
        tokens, index = tokenize_pairs(pairs, enc)
        write_tokens(out_dir / f"{split}.bin", tokens)
        write_tokens(out_dir / f"{split}.idx.bin", index, dtype=np.int64)
        if split != "train":  # what evaluation scores against: every reference of each MR
            refs = json.dumps(load_references(split, raw_dir), ensure_ascii=False)
            atomic_write(out_dir / f"{split}.refs.json", lambda p: Path(p).write_text(refs))
        meta["splits"][split] = {"examples": len(pairs), "mrs": len({mr for mr, _ in pairs}),
                                 "tokens": len(tokens)}
        print(f"{split}: {len(pairs):,} examples, {meta['splits'][split]['mrs']:,} distinct MRs, "
              f"{len(tokens):,} tokens")
    write_meta(out_dir, meta)  # last: its presence means the arrays are complete
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-dir", default=None,
                   help="folder with the E2E CSVs (trainset/devset/testset_w_refs.csv); "
                        "default: download the official release into data/e2e/raw")
    p.add_argument("--out-dir", default=str(HERE), help="where to write the arrays")
    args = p.parse_args(argv)
    prepare(args.raw_dir, args.out_dir)


if __name__ == "__main__":
    run_main(main)
