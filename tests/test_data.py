"""Data: E2E splits and formatting (the loss on the completion only, LoRA eq. 2), prepared
arrays, batches as a pure function of (seed, batch number), a user's own files."""
import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from data.datasets import IGNORE, PAD, Examples, TokenStream, load_data
from data.e2e import prepare as e2e
from support.common import get_tokenizer

E2E_RAW = SHARED_DATA / "e2e"


def test_offline_splits_carve_train_and_val_from_devset_by_distinct_mr():
    dev, test = e2e.read_csv(E2E_RAW / "devset.csv"), e2e.read_csv(E2E_RAW / "testset_w_refs.csv")
    train, val = e2e.load_pairs("train", E2E_RAW), e2e.load_pairs("val", E2E_RAW)
    assert {mr for mr, _ in train}.isdisjoint({mr for mr, _ in val})
    assert sorted(train + val) == sorted(dev)
    mrs = list(dict.fromkeys(mr for mr, _ in dev))
    assert [mr for mr, _ in e2e.load_references("val", E2E_RAW)] == mrs[9::10]
    assert e2e.load_pairs("test", E2E_RAW) == test
    with pytest.raises(ValueError, match="unknown E2E split"):
        e2e.load_pairs("dev", E2E_RAW)


def test_load_references_groups_every_reference_of_an_mr_in_file_order():
    refs = e2e.load_references("test", E2E_RAW)
    rows = e2e.read_csv(E2E_RAW / "testset_w_refs.csv")
    assert [mr for mr, _ in refs] == list(dict.fromkeys(mr for mr, _ in rows))
    assert sum(len(r) for _, r in refs) == len(rows)
    mr, first = refs[0]
    assert first == [ref for m, ref in rows if m == mr]


def test_prepared_e2e_example_is_prompt_then_completion_and_loss_covers_completion_only(e2e_dir):
    meta = json.loads((e2e_dir / "meta.json").read_text())
    train, val = load_data(str(e2e_dir), block_size=128)
    assert len(train) == meta["splits"]["train"]["examples"]
    assert len(train) == len(e2e.load_pairs("train", E2E_RAW))
    enc = get_tokenizer()
    mr, ref = e2e.load_pairs("val", E2E_RAW)[0]
    x, y = next(val.eval_batches(batch_size=2))
    n = int((x[0] != PAD).sum())  # the first row's real tokens (the prompt has no <|endoftext|>)
    assert enc.decode(x[0, :n].tolist()) == e2e.format_prompt(mr) + " " + ref
    target = y[0][y[0] != IGNORE].tolist()
    assert enc.decode(target) == " " + ref + "<|endoftext|>"  # eq. 2: log p(y | x), y only
    # positions before the completion carry no loss; targets are the next input token
    first = int((y[0] != IGNORE).nonzero()[0])
    assert enc.decode(x[0, :first + 1].tolist()) == e2e.format_prompt(mr)
    assert torch.equal(y[0, first:n - 1], x[0, first + 1:n])


def test_a_set_an_older_prepare_wrote_beside_meta_json_loads_and_is_replaced_whole(
        e2e_dir, tmp_path):
    """Sets from before the arrays had a folder of their own (meta.json without "folder", the
    files beside it) still load; the next prepare replaces them and removes their files."""
    import shutil

    old = tmp_path / "e2e"
    meta = json.loads((e2e_dir / "meta.json").read_text())
    shutil.copytree(e2e_dir / meta.pop("folder"), old)
    (old / "meta.json").write_text(json.dumps(meta))
    (old / "notes.txt").write_text("the user's")
    train, _ = load_data(str(old), 128)
    assert np.array_equal(train.tokens, load_data(str(e2e_dir), 128)[0].tokens)
    assert e2e.load_references("test", prepared=old) == \
        e2e.load_references("test", prepared=e2e_dir)
    new = e2e.prepare(E2E_RAW, old)
    assert sorted(p.name for p in old.iterdir()) == sorted(["meta.json", new["folder"],
                                                            "notes.txt"])
    assert len(load_data(str(old), 128)[0]) == meta["splits"]["train"]["examples"]


def _toy_examples(n=10, block_size=16):
    """Example i = [i, i, i, 1000 + i] with a 2-token prompt: rows are recognisable."""
    tokens, index = [], []
    for i in range(n):
        index.append((len(tokens), 2, 4))
        tokens += [i, i, i, 1000 + i]
    return Examples(np.array(tokens, dtype=np.uint16), index, block_size, "toy")


def test_examples_each_epoch_visits_every_example_once_in_a_seeded_order():
    data = _toy_examples(n=12)
    seen = [data.get_batch(4, index=i, seed=5)[0][:, 0].tolist() for i in range(6)]
    assert sorted(sum(seen[:3], [])) == list(range(12)) == sorted(sum(seen[3:], []))
    assert seen[:3] != seen[3:]  # a new order each epoch
    again = [data.get_batch(4, index=i, seed=5)[0][:, 0].tolist() for i in range(6)]
    assert again == seen  # a pure function of (seed, index): resumes and DDP ranks agree
    other = [data.get_batch(4, index=i, seed=6)[0][:, 0].tolist() for i in range(3)]
    assert other != seen[:3]


def test_examples_longer_than_block_size_are_cut_and_a_prompt_that_fills_it_is_an_error():
    tokens = np.arange(30, dtype=np.uint16)
    x, y = Examples(tokens, [(0, 3, 30)], block_size=8, name="t").get_batch(1)
    assert x.shape == (1, 8) and y[0].tolist() == [IGNORE, IGNORE] + list(range(3, 9))
    with pytest.raises(ValueError, match="prompt is longer than block_size"):
        Examples(tokens, [(0, 9, 30)], block_size=8, name="t")


def test_token_stream_targets_are_inputs_shifted_by_one():
    s = TokenStream(np.arange(500, dtype=np.uint16), block_size=16)
    x, y = s.get_batch(4, index=3, seed=1)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(s.get_batch(4, 3, 1)[0], x)
    with pytest.raises(ValueError, match="fewer than one sample"):
        TokenStream(np.arange(16, dtype=np.uint16), block_size=16)


def test_user_jsonl_and_text_files(tmp_path):
    lines = [{"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(20)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    train, val = load_data(str(f), block_size=32)
    assert (len(train), len(val)) == (18, 2)  # every 10th line validates
    x, y = next(val.eval_batches(1))
    assert get_tokenizer().decode(y[0][y[0] != IGNORE].tolist()) == " answer 9<|endoftext|>"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object"):
        load_data(str(bad), block_size=32)
    txt = tmp_path / "book.txt"
    txt.write_text("to be or not to be, that is the question. " * 40)
    train, val = load_data(str(txt), block_size=16)
    assert isinstance(train, TokenStream) and len(train.tokens) > 8 * len(val.tokens)


def test_unknown_and_unprepared_data_name_the_way_forward(tmp_path, monkeypatch):
    import data.datasets as ds
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "prepare.py").write_text("")
    monkeypatch.setattr(ds, "DATA_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python -m data.e2e"):
        load_data("e2e", 64)
    with pytest.raises(FileNotFoundError, match="unknown data 'nope'.*e2e"):
        load_data("nope", 64)


def test_a_failed_download_names_raw_dir_and_leaves_no_file(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from data.files import download

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match="could not download .*--raw-dir DIR"):
        download("https://example.invalid/e2e.zip", tmp_path / "raw" / "e2e.zip")
    assert list((tmp_path / "raw").iterdir()) == []  # no half-written file
