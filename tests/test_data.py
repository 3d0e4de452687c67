"""Data: E2E splits and formatting (the loss on the completion only, LoRA eq. 2), prepared
arrays, batches as a pure function of (seed, batch number), a user's own files."""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED_DATA, find_raw_data, one_error_line

from data.datasets import IGNORE, PAD, Examples, TokenStream, data_from_args, load_data
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


def test_unknown_data_names_the_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="unknown data 'nope'.*e2e, pretrain, shakespeare"):
        load_data("nope", 64)


def release_zip(dest, names=("devset.csv", "testset.csv", "testset_w_refs.csv", "trainset.csv")):
    """A stand-in for E2E's release ZIP (folder e2e-dataset/ inside), from the shared CSVs;
    its trainset.csv, if named, is a copy of devset.csv."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w") as z:
        for n in names:
            z.write(E2E_RAW / ("devset.csv" if n == "trainset.csv" else n), f"e2e-dataset/{n}")
    return dest


def offline(*args, **kwargs):  # urllib.request.urlopen without a network, as Linux says it
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def test_a_named_set_not_prepared_is_downloaded_and_prepared_on_first_use_once(tmp_path,
                                                                                monkeypatch,
                                                                                capsys):
    """`finetune.py` with --data e2e on a fresh clone: the set is prepared from the release, as
    `python -m data.e2e` does, with one line saying so. Two loaders at once (as two torchrun
    processes) download and prepare it once: the other waits for it, then loads it."""
    monkeypatch.setattr(e2e, "HERE", tmp_path / "e2e")  # a checkout where e2e is not prepared
    fetched = []

    def download(url, dest):  # the release, from the shared CSVs instead of the network
        fetched.append(url)
        time.sleep(0.5)  # long enough for the other loader to arrive
        return release_zip(dest, ("devset.csv", "testset_w_refs.csv"))

    monkeypatch.setattr(e2e, "download", download)
    args = argparse.Namespace(data="e2e", block_size=None)
    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(lambda _: data_from_args(args, 128, 50257), range(2)))
    assert fetched == [e2e.RELEASE_URL]
    assert capsys.readouterr().out.count("data 'e2e' is not prepared yet: preparing it") == 1
    meta = json.loads((tmp_path / "e2e" / "meta.json").read_text())
    for train, val in loaded:
        assert (len(train), len(val)) == (meta["splits"]["train"]["examples"],
                                          meta["splits"]["val"]["examples"])
    assert load_data("e2e", 128)[0].tokens.tolist() == loaded[0][0].tokens.tolist()
    assert fetched == [e2e.RELEASE_URL]  # prepared once: the next load only reads it


def test_first_use_offline_is_one_line_naming_raw_dir_and_leaves_nothing(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setattr(e2e, "HERE", tmp_path / "e2e")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    args = argparse.Namespace(data="e2e", block_size=None)
    line = one_error_line(capsys, lambda argv: data_from_args(args, 128), [])
    assert "data 'e2e' is not prepared" in line and e2e.RELEASE_URL in line
    assert "downloaded (Temporary failure in name resolution): offline, run" in line
    assert "run `python -m data.e2e --raw-dir DIR` with DIR holding the E2E CSVs" in line
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["e2e", "e2e/.prepare.lock", "e2e/raw"]  # no set, no ZIP, no .tmp file


def test_a_failed_download_names_raw_dir_and_leaves_no_file(tmp_path, monkeypatch):
    from data.files import download

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match="could not download .*--raw-dir DIR"):
        download("https://example.invalid/e2e.zip", tmp_path / "raw" / "e2e.zip")
    assert list((tmp_path / "raw").iterdir()) == []  # no half-written file


def test_the_tests_raw_data_fill_a_cache_on_first_use_without_trainset(tmp_path, monkeypatch):
    """`python -m pytest` with no LORA_SHARED_DATA and no ../shared/data: the raw files come
    from the canonical sources into a cache, once; E2E's trainset.csv stays out of it."""
    import data.files
    from data.shakespeare.prepare import URL

    fetched = []

    def download(url, dest):  # the canonical files, from the shared copy instead
        fetched.append(url)
        if url == URL:
            dest.parent.mkdir(parents=True, exist_ok=True)
            return Path(shutil.copy(SHARED_DATA / "tinyshakespeare" / "input.txt", dest))
        return release_zip(dest)

    monkeypatch.setattr(data.files, "download", download)
    cache = tmp_path / "cache"
    for _ in range(2):
        assert find_raw_data({}, tmp_path / "no-shared", cache) == (cache, None)
    assert fetched == [URL, e2e.RELEASE_URL]  # the second time, nothing to fetch
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.*")) == [
        "e2e/devset.csv", "e2e/manifest.json", "e2e/testset.csv", "e2e/testset_w_refs.csv",
        "tinyshakespeare/input.txt"]
    assert (cache / "e2e" / "devset.csv").read_bytes() == (E2E_RAW / "devset.csv").read_bytes()


def test_the_tests_raw_data_offline_and_nowhere_is_one_line_saying_what_to_provide(
        tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    folder, line = find_raw_data({}, tmp_path / "no-shared", tmp_path / "cache")
    assert folder == tmp_path / "cache" and "\n" not in line
    assert "could not be downloaded" in line and "Temporary failure" in line
    assert "set LORA_SHARED_DATA to a folder holding e2e/devset.csv" in line
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))  # nothing half-written
    _, line = find_raw_data({"LORA_SHARED_DATA": str(tmp_path)}, SHARED_DATA, tmp_path)
    assert line.startswith(f"LORA_SHARED_DATA ({tmp_path}) lacks the tests' raw files: set")
    copy = shutil.copytree(SHARED_DATA, tmp_path / "copy")
    (copy / "e2e" / "testset.csv").unlink()
    _, line = find_raw_data({"LORA_SHARED_DATA": str(copy)}, SHARED_DATA, tmp_path)
    assert line.startswith(f"LORA_SHARED_DATA ({copy}) lacks e2e/testset.csv: set")
    shutil.copy(E2E_RAW / "testset_w_refs.csv", copy / "e2e" / "testset.csv")
    assert find_raw_data({"LORA_SHARED_DATA": str(copy)}, SHARED_DATA, tmp_path) == (copy, None)
    shutil.copy(E2E_RAW / "devset.csv", copy / "e2e" / "trainset.csv")
    _, line = find_raw_data({"LORA_SHARED_DATA": str(copy)}, SHARED_DATA, tmp_path)
    assert line.startswith(f"LORA_SHARED_DATA ({copy}) holds e2e/trainset.csv: set")


def test_a_test_that_needs_missing_raw_data_fails_with_the_one_line_not_a_skip(tmp_path):
    env = {**os.environ, "LORA_SHARED_DATA": str(tmp_path / "none")}
    test = "tests/test_data.py::test_load_references_groups_every_reference_of_an_mr_in_file_order"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "1 failed" in r.stdout and "skipped" not in r.stdout, r.stdout
    assert f"no raw data: LORA_SHARED_DATA ({tmp_path / 'none'}) lacks the tests'" in r.stdout
    assert "Traceback" not in r.stdout and "read_bytes" not in r.stdout, r.stdout
