"""Tiny Shakespeare (Karpathy's char-rnn corpus, 1 MB of plays) for language modelling: what
`python train.py` pretrains a small GPT on.

    python -m data.shakespeare                                         # download
    python -m data.shakespeare --raw-dir ../shared/data/tinyshakespeare  # local input.txt

GPT-2 BPE tokens of the first 90% of the text -> train.bin, the last 10% -> val.bin (uint16),
in data/shakespeare/prepared-XXXX, with meta.json beside it, as one set
(data.files.write_prepared).
"""

from pathlib import Path

import numpy as np

from data.files import download, read_text, write_prepared
from support.common import ArgumentParser, get_tokenizer

HERE = Path(__file__).resolve().parent
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def prepare(raw_dir=None, out_dir=HERE) -> dict:
    if raw_dir is None:
        path = download(URL, HERE / "raw" / "input.txt")
    else:
        path = Path(raw_dir) / "input.txt"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (--raw-dir must hold input.txt)")
    text = read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: no text in it")
    cut = int(0.9 * len(text))
    enc = get_tokenizer()
    meta, files = {"kind": "stream", "splits": {}}, {}
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        ids = files[f"{split}.bin"] = np.array(enc.encode_ordinary(part), dtype=np.uint16)
        if not len(ids):
            raise ValueError(f"{path}: too little text: its {split} split has no tokens")
        meta["splits"][split] = {"tokens": len(ids)}
        print(f"{split}: {len(ids):,} tokens")
    return write_prepared(out_dir, files, meta)


def main(argv=None):
    p = ArgumentParser(
        prog="python -m data.shakespeare", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw-dir", default=None,
                   help="folder with input.txt; default: download it into data/shakespeare/raw")
    p.add_argument("--out-dir", default=str(HERE), help="where to write the arrays")
    args = p.parse_args(argv)
    prepare(args.raw_dir, args.out_dir)
