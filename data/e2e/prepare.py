"""E2E NLG (Novikova et al. 2017), the paper's GPT-2 task (LoRA §5.5, Table 3): a restaurant's
meaning representation (MR) -> a sentence about it.

    python -m data.e2e                              # download the official release
    python -m data.e2e --raw-dir ../shared/data/e2e # or use a local copy of the CSVs

Each example is the prompt `format_prompt(mr)` = "mr ||", then the completion " ref" and
<|endoftext|>. The loss is taken on the completion and <|endoftext|> only, never on the prompt:
the paper's conditional objective, eq. 2, maximises log p(y | x) of the target y given x.

Splits:
- With the official release (trainset.csv there): train = trainset, val = devset,
  test = testset_w_refs (42,061 / 4,672 / 4,693 rows).
- With only devset.csv and testset_w_refs.csv (the offline copy this repository's CI uses):
  train and val are carved out of devset by *distinct MR*: every 10th distinct MR, in file order,
  goes to val, the rest to train, so no MR is in both; test = testset_w_refs.

Writes {train,val,test}.bin (uint16 tokens of all examples, back to back), {split}.idx.bin
(int64 rows: start, prompt length, length) and {val,test}.refs.json (each distinct MR with all
its references, what sample.py --eval scores against) into a new folder data/e2e/prepared-XXXX,
then data/e2e/meta.json (that folder's name, each file's size), which swaps the set in with one
rename (data.files.write_prepared): every split is read and tokenized before the first file is
written, and a run stopped at any point leaves the old set whole.
"""

import argparse
import csv
import io
import json
import zipfile
from pathlib import Path

from data.datasets import tokenize_examples
from data.files import download, prepared_folder, read_meta, read_text, write_prepared
from support.common import ArgumentParser, atomic_write_set, get_tokenizer

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
    """(mr, ref) rows of an E2E CSV (columns mr, ref). A file that is not UTF-8, a missing
    column, an empty value, a row with more fields than the header, a quoted field not closed
    (a file cut short) or no rows at all is one ValueError naming the file (and line)."""
    rows = csv.DictReader(io.StringIO(read_text(path, newline=""), newline=""), strict=True)
    try:
        fieldnames = rows.fieldnames or ()
    except csv.Error as e:
        raise ValueError(f"{path}:1: {e}") from None
    for col in ("mr", "ref"):
        if col not in fieldnames:
            raise ValueError(f"{path}: no '{col}' column (its columns: "
                             f"{', '.join(fieldnames) or 'none'}); an E2E CSV with "
                             f"references has the columns mr, ref")
    pairs, end = [], rows.line_num  # end: the last line of the last whole row
    try:
        for row in rows:
            if row.get(None):  # DictReader puts the fields beyond the header's under None
                raise ValueError(f"{path}:{end + 1}: {len(row[None])} field(s) more than the "
                                 f"header's {len(fieldnames)} ({', '.join(fieldnames)})")
            mr, ref = (row["mr"] or "").strip(), (row["ref"] or "").strip()  # None: a short row
            if not mr or not ref:
                raise ValueError(f"{path}:{rows.line_num}: empty {'ref' if mr else 'mr'}")
            pairs.append((mr, ref))
            end = rows.line_num
    except csv.Error as e:  # strict: a quoted field still open at the end of the file, ...
        why = ("a quoted field is not closed: the file is cut short?"
               if "unexpected end of data" in str(e) else str(e))
        raise ValueError(f"{path}:{end + 1}: {why}") from None
    if not pairs:
        raise ValueError(f"{path}: no rows in it, only the header")
    return pairs


def load_pairs(split: str, raw_dir=None) -> list[tuple[str, str]]:
    """(mr, ref) rows of one split, formed as the module docstring says."""
    if split not in SPLITS:
        raise ValueError(f"unknown E2E split '{split}': use one of {', '.join(SPLITS)}")
    raw = Path(raw_dir) if raw_dir is not None else HERE / "raw"
    if (raw / OFFICIAL["train"]).exists():
        return read_csv(raw / OFFICIAL[split])
    for name in ("devset.csv", "testset_w_refs.csv"):
        if not (raw / name).exists():
            raise FileNotFoundError(f"{raw / name} not found: run `python -m data.e2e` "
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
        if not (Path(prepared) / "meta.json").exists():
            raise FileNotFoundError(f"{Path(prepared) / 'meta.json'} not found: run `python "
                                    f"-m data.e2e` (add --raw-dir DIR with the E2E "
                                    f"CSVs offline)")
        meta = read_meta(prepared)  # and the set is whole
        path = prepared_folder(prepared, meta) / f"{split}.refs.json"
        if path.name not in meta["files"]:
            raise ValueError(f"{path}: not listed in meta.json, from another prepare run")
        try:
            return [(mr, list(refs)) for mr, refs in json.loads(read_text(path))]
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a list of [MR, references] ({e})") from None
    refs: dict[str, list[str]] = {}
    for mr, ref in load_pairs(split, raw_dir):
        refs.setdefault(mr, []).append(ref)
    return list(refs.items())


def tokenize_pairs(pairs, enc):
    """(mr, ref) pairs -> (tokens, index) of prompt + completion examples (tokenize_examples)."""
    return tokenize_examples([(format_prompt(mr), format_completion(ref)) for mr, ref in pairs],
                             enc)


def unpack_csvs(zip_path: Path, raw_dir: Path, names=None) -> Path:
    """The release ZIP's CSVs (only those named in `names`, if given) into raw_dir, all of them
    or none; a CSV already there is kept. -> raw_dir."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            csvs = {raw_dir / Path(i.filename).name: zf.read(i) for i in zf.infolist()
                    if i.filename.endswith(".csv")
                    and (names is None or Path(i.filename).name in names)}
    except zipfile.BadZipFile as e:
        raise ValueError(f"{zip_path}: not a whole ZIP file ({e}): delete it and run "
                         f"again") from None
    raw_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_set({path: lambda p, b=b: Path(p).write_bytes(b)
                      for path, b in csvs.items() if not path.exists()})
    return raw_dir


def fetch_release(raw_dir: Path) -> Path:
    """Download the release ZIP into raw_dir and unpack its CSVs there (all of them or none)."""
    return unpack_csvs(download(RELEASE_URL, raw_dir / "e2e-dataset.zip"), raw_dir)


def prepare(raw_dir=None, out_dir=HERE) -> dict:
    """Every split read and tokenized, then all files written as one set (data.files.
    write_prepared): a bad input or a full disk leaves an earlier preparation whole. -> meta."""
    raw_dir = Path(raw_dir) if raw_dir is not None else fetch_release(HERE / "raw")
    enc = get_tokenizer()
    meta = {"kind": "examples", "official_splits": (raw_dir / OFFICIAL["train"]).exists(),
            "prompt_format": format_prompt("{prompt}"),  # support.adapters.PROMPT_SLOT
            "splits": {}}
    files = {}
    for split in SPLITS:
        pairs = load_pairs(split, raw_dir)
        if not pairs:  # the offline val split: devset.csv has fewer than 10 distinct MRs
            raise ValueError(f"{raw_dir / 'devset.csv'}: too few distinct MRs to carve a "
                             f"{split} split out of it (every 10th goes to val)")
        tokens, index = tokenize_pairs(pairs, enc)
        files |= {f"{split}.bin": tokens, f"{split}.idx.bin": index}
        if split != "train":  # what evaluation scores against: every reference of each MR
            files[f"{split}.refs.json"] = json.dumps(load_references(split, raw_dir),
                                                     ensure_ascii=False)
        meta["splits"][split] = {"examples": len(pairs), "mrs": len({mr for mr, _ in pairs}),
                                 "tokens": len(tokens)}
        print(f"{split}: {len(pairs):,} examples, {meta['splits'][split]['mrs']:,} distinct MRs, "
              f"{len(tokens):,} tokens")
    return write_prepared(out_dir, files, meta)


def main(argv=None):
    p = ArgumentParser(
        prog="python -m data.e2e", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-dir", default=None,
                   help="folder with the E2E CSVs (trainset/devset/testset_w_refs.csv); "
                        "default: download the official release into data/e2e/raw")
    p.add_argument("--out-dir", default=str(HERE), help="where to write the arrays")
    args = p.parse_args(argv)
    prepare(args.raw_dir, args.out_dir)
