"""The quick start's pretraining text (data/pretrain/prepare.py): E2E's training split, MRs and
descriptions (grouped by restaurant) as separate documents, and no text of any validation or
test MR."""
import numpy as np
from conftest import SHARED_DATA

from data.e2e.prepare import load_pairs
from data.pretrain.prepare import documents, prepare
from support.common import get_tokenizer


def test_the_corpus_holds_no_validation_or_test_mr_and_never_pairs_an_mr_with_its_text(tmp_path):
    folder = tmp_path / prepare(SHARED_DATA, tmp_path)["folder"]
    enc = get_tokenizer()
    docs = []
    for split in ("train", "val"):
        text = enc.decode(np.fromfile(folder / f"{split}.bin", dtype=np.uint16).tolist())
        docs += [d for d in text.split("<|endoftext|>") if d.strip()]
        assert "||" not in text  # the task's prompt format is never shown
    corpus = set(d.strip() for d in docs)
    lines = {line for d in corpus for line in d.split("\n")}
    train = load_pairs("train", SHARED_DATA / "e2e")
    train_text = {mr for mr, _ in train} | {ref for _, ref in train}
    held_out = load_pairs("val", SHARED_DATA / "e2e") + load_pairs("test", SHARED_DATA / "e2e")
    assert not {mr for mr, _ in held_out} & lines  # no validation or test MR, not even a line
    assert not ({ref for _, ref in held_out} - train_text) & lines  # nor their descriptions
    assert {mr for mr, _ in train} <= corpus and {ref for _, ref in train} <= lines
    # every document with MR syntax is exactly one training MR: never an MR with a description
    assert all(d in {mr for mr, _ in train} for d in corpus if "[" in d)
    # a document of descriptions holds one restaurant's: some MR has every one of its lines
    mrs_of = {}
    for mr, ref in train:
        mrs_of.setdefault(ref, set()).add(mr)
    grouped = [d.split("\n") for d in corpus if all(line in mrs_of for line in d.split("\n"))]
    assert len(grouped) == len({mr for mr, _ in train})
    assert all(set.intersection(*(mrs_of[line] for line in g)) for g in grouped)


def test_documents_split_and_shuffle_deterministically():
    pairs = [(f"name[{i}]", f"Place {i} is nice.") for i in range(40)]
    a, b = documents("A.\n\nB.\n\nC.", pairs, seed=3), documents("A.\n\nB.\n\nC.", pairs, seed=3)
    assert a == b and len(a["train"]) + len(a["val"]) == 3 + 40 + 40
    assert a != documents("A.\n\nB.\n\nC.", pairs, seed=4)
