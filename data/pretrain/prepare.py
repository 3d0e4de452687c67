"""The pretraining text of the quick start's base model: general text (Tiny Shakespeare) plus the
text of E2E's *training* split: its meaning representations (MRs), and its descriptions grouped
by restaurant, as separate documents in a shuffled order, never an MR beside its own description.

    python -m data.pretrain --raw-dir ../shared/data   # tinyshakespeare/ and e2e/ in it

Why: LoRA adapts a model that already knows the language of the task (GPT-2 has read restaurant
reviews) to the task itself (§4: "adapting large-scale pretrained models"). A base trained on
Shakespeare alone has never seen "coffee shop" or "riverside", and only full fine-tuning could
train those embeddings; a base trained on MRs paired with descriptions would already know the
task. So the base reads both kinds of E2E text, but never the mapping from one to the other,
and never any text of a validation or test MR (the E2E splits share no MR; tests check it).
The descriptions of one restaurant make one document, as a web page of reviews of one place
would: text in which the same name, food and area recur, the kind GPT-2 learned to copy from
context in; the MR that the descriptions were written from is never beside them.

Writes {train,val}.bin (uint16 GPT-2 tokens, documents separated by <|endoftext|>) into
data/pretrain/prepared-XXXX and meta.json beside it, as one set (data.files.write_prepared).
Validation: the last 10% of Tiny Shakespeare and 5% of
the E2E documents.
"""

import random
from pathlib import Path

import numpy as np

from data.e2e.prepare import fetch_release, load_pairs
from data.files import read_text, write_prepared
from data.shakespeare.prepare import URL as SHAKESPEARE_URL
from support.common import EOT_TOKEN, ArgumentParser, get_tokenizer

HERE = Path(__file__).resolve().parent


def documents(shakespeare: str, pairs, seed: int = 0):
    """-> {split: [document, ...]}: Shakespeare in paragraphs (90% train, the rest val), and from
    the training split, each distinct MR as a document and, as another, all the descriptions of
    one restaurant (one MR's references, a line each: a page of reviews of one place, as the web
    has them), shuffled together (95% train, 5% val). An MR and its descriptions are never in
    one document."""
    paragraphs = [p.strip() + "\n" for p in shakespeare.split("\n\n") if p.strip()]
    cut = int(0.9 * len(paragraphs))
    by_mr = {}
    for mr, ref in pairs:
        by_mr.setdefault(mr, []).append(ref)
    e2e = list(by_mr) + ["\n".join(refs) + "\n" for refs in by_mr.values()]
    random.Random(seed).shuffle(e2e)
    e2e_cut = int(0.95 * len(e2e))
    train = paragraphs[:cut] + e2e[:e2e_cut]
    random.Random(seed + 1).shuffle(train)  # Shakespeare and E2E interleaved, not in two halves
    return {"train": train, "val": paragraphs[cut:] + e2e[e2e_cut:]}


def prepare(raw_dir=None, out_dir=HERE, seed: int = 0) -> dict:
    """raw_dir: a folder with tinyshakespeare/input.txt and e2e/ (the E2E CSVs); None: download."""
    if raw_dir is None:
        from data.files import download
        text_path = download(SHAKESPEARE_URL, HERE.parent / "shakespeare" / "raw" / "input.txt")
        e2e_dir = fetch_release(Path(__file__).resolve().parents[1] / "e2e" / "raw")
    else:
        text_path = Path(raw_dir) / "tinyshakespeare" / "input.txt"
        e2e_dir = Path(raw_dir) / "e2e"
        if not text_path.exists():
            raise FileNotFoundError(f"{text_path} not found (--raw-dir must hold "
                                    f"tinyshakespeare/input.txt and e2e/)")
    text = read_text(text_path)
    if not text.strip():
        raise ValueError(f"{text_path}: no text in it")
    docs = documents(text, load_pairs("train", e2e_dir), seed)
    enc = get_tokenizer()
    meta, files = {"kind": "stream", "splits": {}}, {}
    for split, part in docs.items():
        ids = []
        for d in part:
            ids += enc.encode_ordinary(d) + [EOT_TOKEN]
        files[f"{split}.bin"] = np.array(ids, dtype=np.uint16)
        meta["splits"][split] = {"documents": len(part), "tokens": len(ids)}
        print(f"{split}: {len(part):,} documents, {len(ids):,} tokens")
    return write_prepared(out_dir, files, meta)


def main(argv=None):
    p = ArgumentParser(
        prog="python -m data.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw-dir", default=None,
                   help="folder with tinyshakespeare/input.txt and e2e/*.csv; default: "
                        "download both")
    p.add_argument("--out-dir", default=str(HERE), help="where to write the arrays")
    args = p.parse_args(argv)
    prepare(args.raw_dir, args.out_dir)
