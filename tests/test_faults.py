"""Bad inputs and failures while writing (issue 12): nothing lost, nothing poisoned, one clear
line for every bad input.

Sets of files are committed together: a model directory (config.json + model.safetensors), a
prepared data directory (arrays, refs, meta.json), an evaluation (.json, .hyp.txt, .ref.txt).
A failure halfway (a full disk on the second file, a bad input file) leaves the old set whole
and no temporary file; a directory that mixes two runs anyway is refused when read.
Every bad input is one ValueError naming the file (and line or field), through the public
function and, for a few, through the command line (exit 1, one line on stderr).
"""
import csv
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED_DATA, tiny_gpt
from safetensors.torch import save_file

import data.files
import model as model_module
from data.datasets import Examples, data_from_args, load_data
from data.e2e import prepare as e2e
from data.shakespeare import prepare as shakespeare
from model import GPT, GPTConfig
from support import common, metrics

REDO = "prepare it again (python -m data.NAME --out-dir DIR)"


def _second_write_hits_a_full_disk(seen):
    """support.common.atomic_write_set, except that the second file's write stops halfway with
    ENOSPC (its path goes to `seen`)."""
    def write_set(writes):
        items = list(writes.items())
        path, write = items[1]

        def disk_full(tmp):
            Path(tmp).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        seen.append(Path(path))
        items[1] = (path, disk_full)
        return common.atomic_write_set(dict(items))
    return write_set


def _second_file_hits_a_full_disk(seen):
    """support.common.write_synced (as data.files uses it), except that the second file's write
    stops halfway with ENOSPC (its path goes to `seen`)."""
    def write_synced(path, write, shown=None):
        if len(seen) == 1:
            seen.append(Path(path))

            def write(tmp):
                Path(tmp).write_bytes(b"half a file")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif not seen:
            seen.append(None)
        return common.write_synced(path, write, shown)
    return write_synced


def _snapshot(directory):
    """{path under directory: bytes} of every file in it, in its folders too."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _folder(directory) -> Path:
    """The folder of a prepared directory's files, as its meta.json names it."""
    return Path(directory) / json.loads((Path(directory) / "meta.json").read_text())["folder"]


def _one_line(cmd, cwd=ROOT):
    r = subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    return r.stderr


def _error(fn, *args, **kw):
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    return str(e.value)


def _error_os(fn, *args, **kw):
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    return str(e.value)


def _small_e2e_raw(directory, n_dev=200, n_test=60):
    """The first rows of the shared E2E CSVs: a quick prepare, different from the full one."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("devset.csv", n_dev), ("testset_w_refs.csv", n_test)):
        rows = e2e.read_csv(SHARED_DATA / "e2e" / name)[:n]
        with open(directory / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("mr", "ref"), *rows])
    return directory


# ---------------------------------------------------------------- sets of files


def test_save_pretrained_failing_on_its_second_file_keeps_the_old_pair(tmp_path, monkeypatch):
    old = tiny_gpt(seed=1)
    old.save_pretrained(tmp_path)
    before = _snapshot(tmp_path)
    seen = []
    monkeypatch.setattr(model_module, "atomic_write_set", _second_write_hits_a_full_disk(seen))
    new = tiny_gpt(seed=2, n_layer=1, n_head=2)  # another config.json, other weights
    assert _error_os(new.save_pretrained, tmp_path) == \
        f"{tmp_path / 'model.safetensors'}: cannot write it (No space left on device)"
    assert seen == [tmp_path / "model.safetensors"]
    assert _snapshot(tmp_path) == before  # the old pair, no temporary file
    loaded = GPT.from_pretrained(tmp_path)
    assert torch.equal(loaded.wte.weight, old.wte.weight)



def test_e2e_prepare_failing_on_its_second_file_keeps_the_old_set(e2e_dir, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "e2e"
    shutil.copytree(e2e_dir, out)
    before = _snapshot(out)
    seen = []
    monkeypatch.setattr(data.files, "write_synced", _second_file_hits_a_full_disk(seen))
    raw = _small_e2e_raw(tmp_path / "raw")
    assert _error_os(e2e.prepare, raw, out) == \
        f"{seen[1]}: cannot write it (No space left on device)"
    assert seen[1].name == "train.idx.bin" and seen[1].parent.parent == out
    assert _snapshot(out) == before  # not even the new set's folder is left
    train, _ = load_data(str(out), 128)  # still the full set, and whole
    assert len(train) == json.loads(before["meta.json"])["splits"]["train"]["examples"]


def test_shakespeare_prepare_failing_on_its_second_file_keeps_the_old_set(
        shakespeare_dir, tmp_path, monkeypatch):
    out = tmp_path / "shakespeare"
    shutil.copytree(shakespeare_dir, out)
    before = _snapshot(out)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "input.txt").write_text("A much shorter play. " * 500)
    seen = []
    monkeypatch.setattr(data.files, "write_synced", _second_file_hits_a_full_disk(seen))
    assert _error_os(shakespeare.prepare, raw, out) == \
        f"{seen[1]}: cannot write it (No space left on device)"
    assert seen[1].name == "val.bin"
    assert _snapshot(out) == before


def test_e2e_prepare_with_a_bad_input_file_halfway_writes_nothing(e2e_dir, tmp_path):
    """The test split's CSV is read last; before any file of the new set is written."""
    out = tmp_path / "e2e"
    shutil.copytree(e2e_dir, out)
    before = _snapshot(out)
    raw = _small_e2e_raw(tmp_path / "raw")
    test_csv = raw / "testset_w_refs.csv"
    lines = test_csv.read_text(encoding="utf-8").splitlines(keepends=True)
    test_csv.write_text("".join(lines[:30]) + '"name[Bad Row]",\n' + "".join(lines[30:]),
                        encoding="utf-8")
    assert _error(e2e.prepare, raw, out) == f"{test_csv}:31: empty ref"
    assert _snapshot(out) == before


def test_write_eval_failing_on_its_second_file_keeps_the_old_three(tmp_path, monkeypatch):
    def result(text):
        return {"metrics": {"BLEU": 1.0}, "outputs": [{"mr": "m", "output": text,
                                                        "references": [text + " ref"]}]}

    path = tmp_path / "eval" / "test.json"
    metrics.write_eval(result("old"), path)
    before = _snapshot(path.parent)
    seen = []
    monkeypatch.setattr(metrics, "atomic_write_set", _second_write_hits_a_full_disk(seen))
    assert _error_os(metrics.write_eval, result("new"), path) == \
        f"{path.with_suffix('.ref.txt')}: cannot write it (No space left on device)"
    assert sorted(before) == [common.MANIFEST, "test.hyp.txt", "test.json", "test.ref.txt"]
    assert _snapshot(path.parent) == before


def test_a_prepared_directory_mixing_two_runs_is_refused_in_one_line(e2e_dir, tmp_path):
    """prepare never leaves a mix (test_prepare_killed_while_writing_leaves_the_old_set_whole);
    files copied in by hand can."""
    mixed, small = tmp_path / "mixed", tmp_path / "small"
    shutil.copytree(e2e_dir, mixed)
    e2e.prepare(_small_e2e_raw(tmp_path / "raw"), small)
    arrays, other = _folder(mixed), _folder(small)
    shutil.copy(other / "train.bin", arrays / "train.bin")  # arrays from another run
    got = (arrays / "train.bin").stat().st_size
    said = (_folder(e2e_dir) / "train.bin").stat().st_size
    expected = (f"{arrays / 'train.bin'}: {got:,} bytes, but meta.json says {said:,}: the "
                f"directory mixes two prepare runs or lost a file; {REDO}")
    assert _error(load_data, str(mixed), 128) == expected
    assert _one_line(["train.py", "--data", str(mixed), "--out", str(tmp_path / "out")]) == \
        f"error: {expected}\n"
    shutil.copy(_folder(e2e_dir) / "train.bin", arrays / "train.bin")
    (arrays / "val.idx.bin").unlink()
    assert _error(load_data, str(mixed), 128).startswith(
        f"{arrays / 'val.idx.bin'}: missing, but meta.json says ")
    shutil.copy(_folder(e2e_dir) / "val.idx.bin", arrays / "val.idx.bin")
    shutil.copy(other / "test.refs.json", arrays / "test.refs.json")  # what evaluation reads
    assert _error(e2e.load_references, "test", prepared=mixed).startswith(
        f"{arrays / 'test.refs.json'}: ")
    meta = json.loads((mixed / "meta.json").read_text())
    (mixed / "meta.json").write_text(json.dumps({**meta, "folder": "../small"}))
    assert _error(load_data, str(mixed), 128) == (
        f"{mixed / 'meta.json'}: folder '../small' is not the name of a folder beside it: "
        f"{REDO}")


def test_an_index_that_does_not_fit_its_tokens_is_refused():
    tokens = np.arange(20, dtype=np.uint16)
    assert _error(Examples, tokens, [(0, 2, 5), (5, 3, 30)], 16, "toy") == (
        "toy: example 1 (start 5, prompt 3, length 30 tokens) does not fit its 20 tokens with "
        "a prompt and a completion")
    assert _error(Examples, tokens, [(0, 0, 5)], 16, "toy").startswith("toy: example 0 ")


def test_a_prepared_directory_is_whole_after_prepare(e2e_dir):
    meta = json.loads((e2e_dir / "meta.json").read_text())
    assert set(meta["files"]) == {f"{s}{ext}" for s in e2e.SPLITS
                                  for ext in (".bin", ".idx.bin")} | {"val.refs.json",
                                                                      "test.refs.json"}
    assert all((_folder(e2e_dir) / f).stat().st_size == n for f, n in meta["files"].items())
    assert sorted(p.name for p in e2e_dir.iterdir()) == sorted(["meta.json", meta["folder"]])
    assert sorted(p.name for p in _folder(e2e_dir).iterdir()) == sorted(meta["files"])


def test_release_zip_is_unpacked_all_or_nothing(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    z = raw / "e2e-dataset.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("e2e-dataset/devset.csv", "mr,ref\na,b\n")
        zf.writestr("e2e-dataset/testset_w_refs.csv", "mr,ref\nc,d\n")
    monkeypatch.setattr(e2e, "download", lambda url, dest: z)
    with monkeypatch.context() as m:
        m.setattr(e2e, "atomic_write_set", _second_write_hits_a_full_disk([]))
        with pytest.raises(OSError, match="No space left on device"):
            e2e.fetch_release(raw)
    assert sorted(p.name for p in raw.iterdir()) == ["e2e-dataset.zip"]  # no CSV, no half one
    e2e.fetch_release(raw)
    assert (raw / "testset_w_refs.csv").read_text() == "mr,ref\nc,d\n"
    z.write_bytes(z.read_bytes()[:40])
    assert _error(e2e.fetch_release, raw) == \
        f"{z}: not a whole ZIP file (File is not a zip file): delete it and run again"


# ---------------------------------------------------------------- a writer killed halfway

# A writer stopped dead (os._exit: no finally, no cleanup, as SIGKILL or a power cut) at a chosen
# point, in a process of its own. KILL_AT: "after-replace:NAME" (just after a file named NAME is
# renamed into place), "before-replace:NAME", or "after-fsync:N" (after the N-th fsync).
KILLED = 137
KILLING_WRITER = """
import os, sys
sys.path.insert(0, {root!r})
how, at = os.environ["KILL_AT"].split(":")
real_replace, real_fsync, fsyncs = os.replace, os.fsync, []

def replace(src, dst):
    if how == "before-replace" and os.path.basename(dst) == at:
        os._exit({killed})
    real_replace(src, dst)
    if how == "after-replace" and os.path.basename(dst) == at:
        os._exit({killed})

def fsync(fd):
    real_fsync(fd)
    fsyncs.append(fd)
    if how == "after-fsync" and len(fsyncs) == int(at):
        os._exit({killed})

os.replace, os.fsync = replace, fsync
exec(sys.argv[1])
"""


def _killed_while_writing(tmp_path, kill_at, code):
    """Run `code` (Python, with ROOT importable) in a new process killed at kill_at."""
    helper = tmp_path / "killing_writer.py"
    helper.write_text(KILLING_WRITER.format(root=str(ROOT), killed=KILLED))
    r = subprocess.run([sys.executable, str(helper), code], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "KILL_AT": kill_at})
    assert r.returncode == KILLED, f"not killed at {kill_at}: {r.returncode} {r.stderr[-2000:]}"


@pytest.mark.parametrize("written_by", ["save_pretrained", "transformers"])
def test_a_model_directory_torn_by_a_crash_between_two_renames_is_refused(
        written_by, tiny_base, tmp_path):
    """config.json and model.safetensors share their folder with ckpt.pt and the log, so they
    are renamed in one at a time; a crash between the two leaves the new config.json with the
    old weights. Loading that is refused, naming the file, whoever wrote the old pair."""
    d = tmp_path / "model"
    if written_by == "transformers":
        shutil.copytree(tiny_base, d)
        assert GPT.from_pretrained(d) is not None and not (d / common.MANIFEST).exists()
    else:
        tiny_gpt(seed=1).save_pretrained(d)
    old = GPT.from_pretrained(d)
    shutil.copytree(d, tmp_path / "old")
    # the same shapes (so nothing else would notice), another config.json, other weights
    new = ("import torch; from model import GPT; m = GPT.from_pretrained({old!r}); "
           "m.config.layer_norm_epsilon = 1e-3; torch.manual_seed(7); "
           "[p.data.normal_() for p in m.parameters()]; m.save_pretrained({d!r})"
           ).format(old=str(tmp_path / "old"), d=str(d))
    _killed_while_writing(tmp_path, "after-replace:config.json", new)
    assert json.loads((d / "config.json").read_text())["layer_norm_epsilon"] == 1e-3  # torn
    err = _error(GPT.from_pretrained, d)
    assert err.startswith(f"{d / 'config.json'}: not as {d / common.MANIFEST} records it"), err
    assert len(err.splitlines()) == 1
    # Writing the set again (uninterrupted) makes it whole, and it loads.
    exec(new)
    loaded = GPT.from_pretrained(d)
    assert loaded.config.layer_norm_epsilon == 1e-3
    assert not torch.equal(loaded.wte.weight, old.wte.weight)
    recorded = json.loads((d / common.MANIFEST).read_text())["sha256"]
    for name in ("config.json", "model.safetensors"):
        assert recorded[name] == hashlib.sha256((d / name).read_bytes()).hexdigest()


def test_an_evaluation_torn_by_a_crash_between_two_renames_is_refused_by_compare(tmp_path,
                                                                                 capsys):
    from conftest import one_error_line

    from experiments.compare import main

    def result(text):
        return {"metrics": {"BLEU": 1.0}, "init": "base", "adapter": "a.safetensors",
                "outputs": [{"mr": "m", "output": text, "references": [text + " ref"]}]}

    path = tmp_path / "eval" / "lora.json"
    metrics.write_eval(result("old"), path)
    _killed_while_writing(tmp_path, "after-replace:lora.hyp.txt",
                          f"from support import metrics; metrics.write_eval({result('new')!r}, {str(path)!r})")
    log = "".join(json.dumps({"step": s, "val_loss": 3.0 - s / 10}) + "\n" for s in (0, 1))
    for run in ("lora", "full"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "log.jsonl").write_text(log)
    err = one_error_line(capsys, main, ["--lora", tmp_path / "lora", "--full", tmp_path / "full",
                                        "--lora-eval", path, "--full-eval", path])
    assert err.startswith(f"error: {path.with_suffix('.hyp.txt')}: not as "), err


@pytest.mark.parametrize("kill_at", ["after-fsync:2", "before-replace:meta.json"])
def test_prepare_killed_while_writing_leaves_the_old_set_whole(kill_at, e2e_dir, tmp_path):
    """The arrays go into a folder of their own; one rename of meta.json swaps it in. Killed
    after two of the new files, or with all of them written but before that rename, the old
    set is still what loads, whole; the next prepare replaces it and clears what was left."""
    out = tmp_path / "e2e"
    shutil.copytree(e2e_dir, out)
    old_train, old_val = load_data(str(out), 128)
    old_refs = e2e.load_references("test", prepared=out)
    raw = _small_e2e_raw(tmp_path / "raw")
    _killed_while_writing(tmp_path, kill_at, "from data.e2e.prepare import prepare; "
                                             f"prepare({str(raw)!r}, {str(out)!r})")
    train, val = load_data(str(out), 128)
    assert np.array_equal(train.tokens, old_train.tokens)
    assert np.array_equal(val.index, old_val.index)
    assert e2e.load_references("test", prepared=out) == old_refs
    e2e.prepare(raw, out)
    train, _ = load_data(str(out), 128)
    assert len(train) == e2e.prepare(raw, tmp_path / "again")["splits"]["train"]["examples"]
    assert len(train) < len(old_train)
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json", meta["folder"]])
    assert sorted(p.name for p in (out / meta["folder"]).iterdir()) == sorted(meta["files"])


# ---------------------------------------------------------------- bad inputs, one line each


def _saved_to_be_edited_by_hand(directory):
    """A model directory whose config.json is then edited by hand: without the manifest, which
    would refuse the edit first (test_a_hand_edited_config_json_is_refused_by_the_manifest)."""
    tiny_gpt().save_pretrained(directory)
    (Path(directory) / common.MANIFEST).unlink()


def test_a_hand_edited_config_json_is_refused_by_the_manifest(tmp_path):
    tiny_gpt().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": 1e-3}))
    assert _error(GPT.from_pretrained, tmp_path) == (
        f"{tmp_path / 'config.json'}: not as {tmp_path / common.MANIFEST} records it (other "
        f"bytes): the set was torn by a crash while written, or changed by another tool; write "
        f"it again (or delete {common.MANIFEST} if another tool wrote it)")
    (tmp_path / common.MANIFEST).unlink()  # as the line says: then nothing is checked
    assert GPT.from_pretrained(tmp_path).config.layer_norm_epsilon == 1e-3


@pytest.mark.parametrize("field, value, message", [
    ("n_layer", "2", "n_layer must be of type int, got '2'"),
    ("n_head", 0, "n_head must be >= 1, got 0"),
    ("n_embd", 30, "n_embd 30 is not a multiple of n_head 4"),
    ("vocab_size", 12.0, "vocab_size must be of type int, got 12.0"),
    ("n_positions", True, "block_size must be of type int, got True"),
    ("layer_norm_epsilon", -1e-5, "layer_norm_epsilon must be > 0 (and finite), got -1e-05"),
])
def test_config_json_with_a_bad_field_is_one_line_naming_file_and_field(tmp_path, field,
                                                                         value, message):
    _saved_to_be_edited_by_hand(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    assert _error(GPT.from_pretrained, tmp_path) == f"{tmp_path / 'config.json'}: {message}"


@pytest.mark.parametrize("content, why", [
    (b"{not json", "JSONDecodeError: Expecting property name enclosed in double quotes: "
                   "line 1 column 2 (char 1)"),
    (b"[1, 2]", "TypeError: list indices must be integers or slices, not str"),
    (b'{"n_layer": 2}', "KeyError: 'n_head'"),
    (b'{"n_layer": "\xff"}', "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in "
                            "position 13: invalid start byte"),
])
def test_config_json_that_is_not_a_config_is_one_line(tmp_path, content, why):
    _saved_to_be_edited_by_hand(tmp_path)
    (tmp_path / "config.json").write_bytes(content)
    assert _error(GPT.from_pretrained, tmp_path) == \
        f"{tmp_path / 'config.json'}: not a GPT-2 config.json ({why})"


def test_gpt_config_checks_its_fields():
    with pytest.raises(ValueError, match=r"^dropout must be (in )?\[0, 1\), got 1.5$"):
        GPTConfig(dropout=1.5)
    with pytest.raises(ValueError, match="^bias must be of type bool, got 1$"):
        GPTConfig(bias=1)
    GPTConfig(dropout=0, layer_norm_epsilon=1)  # ints where floats are asked: JSON writes 0


def test_a_bad_config_json_through_the_command_line(tmp_path):
    _saved_to_be_edited_by_hand(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_head": 0}))
    assert _one_line(["sample.py", "--init", str(tmp_path), "--no-adapter"]) == \
        f"error: {tmp_path / 'config.json'}: n_head must be >= 1, got 0\n"


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("keep", [0, 8, 100, 0.5])
def test_a_truncated_checkpoint_names_the_file(tmp_path, fmt, keep):
    sd = {k: v.contiguous() for k, v in tiny_gpt().state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[:int(keep * len(data)) if isinstance(keep, float) else keep])
    message = _error(GPT.from_pretrained, path)
    assert message.startswith(f"{path}: cannot read weights, the file is truncated or corrupt ("), \
        message


def _jsonl(path, rows, bom=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8-sig" if bom else "utf-8")
    return path


GOOD = [{"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(12)]


@pytest.mark.parametrize("row, message", [
    ({"prompt": 5, "completion": "x"}, "'prompt' and 'completion' must be strings, got int and "
                                       "str"),
    ({"prompt": "Q:", "completion": None}, "'prompt' and 'completion' must be strings, got str "
                                           "and NoneType"),
    ({"prompt": "", "completion": " x"}, "empty 'prompt': the completion's first token needs a "
                                         "prompt token to be predicted from"),
    ('["Q:", " x"]', "expected a JSON object with 'prompt' and 'completion'"),
])
def test_a_bad_jsonl_line_is_refused_at_load_naming_file_and_line(tmp_path, row, message):
    f = _jsonl(tmp_path / "pairs.jsonl", GOOD[:4] + [row] + GOOD[4:])
    assert _error(load_data, str(f), 32) == f"{f}:5: {message}"


def test_jsonl_with_a_byte_order_mark_and_windows_line_ends_is_valid(tmp_path):
    f = _jsonl(tmp_path / "pairs.jsonl", GOOD, bom=True)
    f.write_bytes(f.read_bytes().replace(b"\n", b"\r\n"))
    assert f.read_bytes().startswith(b"\xef\xbb\xbf{")
    train, val = load_data(str(f), 32)
    assert (len(train), len(val)) == (11, 1)  # every 10th validates
    start, plen, n = train.index[0]
    text = common.get_tokenizer().decode(train.tokens[start:start + n].tolist())
    assert text == "Q0: answer 0<|endoftext|>"  # no byte-order mark, no carriage return


def test_jsonl_with_fewer_than_ten_examples_says_why(tmp_path):
    f = _jsonl(tmp_path / "pairs.jsonl", GOOD[:9])
    assert _error(load_data, str(f), 32) == \
        f"{f}: 9 examples; at least 10 are needed (every 10th is held out for validation)"


@pytest.mark.parametrize("script", ["train.py", "finetune.py"])
def test_a_bad_jsonl_through_the_command_line(tmp_path, tiny_base, script):
    f = _jsonl(tmp_path / "pairs.jsonl", GOOD[:6] + [{"prompt": "", "completion": " x"}])
    init = ["--init", str(tiny_base)] if script == "finetune.py" else []
    assert _one_line([script, *init, "--data", str(f), "--out", str(tmp_path / "out")]) == (
        f"error: {f}:7: empty 'prompt': the completion's first token needs a prompt token to "
        f"be predicted from\n")
    assert not (tmp_path / "out").exists()  # nothing written, nothing to resume into


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_file_that_is_not_utf8_is_one_line_naming_file_and_line(tmp_path, suffix):
    f = tmp_path / f"latin1{suffix}"
    lines = [json.dumps(GOOD[0])] * 2 + ['{"prompt": "café", "completion": " x"}']
    f.write_bytes("\n".join(lines).encode("latin-1"))  # é is the one byte 0xe9 in Latin-1
    assert _error(load_data, str(f), 16) == \
        f"{f}:3: not UTF-8 text (byte 0xe9): save the file as UTF-8"
    if suffix == ".txt":
        assert _one_line(["train.py", "--data", str(f), "--out", str(tmp_path / "out")]) == \
            f"error: {f}:3: not UTF-8 text (byte 0xe9): save the file as UTF-8\n"


def test_raw_files_that_are_not_utf8_are_one_line(tmp_path):
    raw = _small_e2e_raw(tmp_path / "raw")
    dev = raw / "devset.csv"
    dev.write_bytes(dev.read_bytes().replace(b"city centre", "cité".encode("latin-1"), 1))
    assert _error(e2e.prepare, raw, tmp_path / "out").startswith(f"{dev}:")
    assert "not UTF-8 text (byte 0xe9)" in _error(e2e.read_csv, dev)
    (tmp_path / "sh").mkdir()
    (tmp_path / "sh" / "input.txt").write_bytes(b"To be\nor not \xff to be\n")
    assert _error(shakespeare.prepare, tmp_path / "sh", tmp_path / "out") == \
        f"{tmp_path / 'sh' / 'input.txt'}:2: not UTF-8 text (byte 0xff): save the file as UTF-8"
    assert not (tmp_path / "out").exists()


def test_an_e2e_csv_without_its_ref_column_is_one_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(SHARED_DATA / "e2e" / "testset.csv", raw / "testset_w_refs.csv")  # MRs only
    (raw / "devset.csv").write_text("mr\nname[A]\n", encoding="utf-8")
    assert _error(e2e.read_csv, raw / "devset.csv") == (
        f"{raw / 'devset.csv'}: no 'ref' column (its columns: mr); an E2E CSV with references "
        f"has the columns mr, ref")
    expected = (f"{raw / 'testset_w_refs.csv'}: no 'mr' column (its columns: MR); an E2E CSV "
                f"with references has the columns mr, ref")
    assert _error(e2e.load_pairs, "test", raw) == expected
    assert _one_line(["-m", "data.e2e", "--raw-dir", str(raw), "--out-dir",
                      str(tmp_path / "out")]) == f"error: {raw / 'devset.csv'}: no 'ref' " \
        f"column (its columns: mr); an E2E CSV with references has the columns mr, ref\n"


def test_an_empty_shakespeare_input_is_refused_at_prepare_naming_it(tmp_path):
    """It wrote 0-token arrays, and training then said "cannot mmap an empty file"."""
    (tmp_path / "sh").mkdir()
    raw = tmp_path / "sh" / "input.txt"
    raw.write_text("\n  \n", encoding="utf-8")
    assert _error(shakespeare.prepare, tmp_path / "sh", tmp_path / "out") == \
        f"{raw}: no text in it"
    raw.write_text("T", encoding="utf-8")  # its first 90% is no text
    assert _error(shakespeare.prepare, tmp_path / "sh", tmp_path / "out") == \
        f"{raw}: too little text: its train split has no tokens"
    raw.write_text("", encoding="utf-8")
    assert _one_line(["-m", "data.shakespeare", "--raw-dir", str(tmp_path / "sh"),
                      "--out-dir", str(tmp_path / "out")]) == f"error: {raw}: no text in it\n"
    assert not (tmp_path / "out").exists()


def test_an_empty_pretrain_text_is_refused_at_prepare_naming_it(tmp_path):
    from data.pretrain import prepare as pretrain

    (tmp_path / "raw" / "tinyshakespeare").mkdir(parents=True)
    raw = tmp_path / "raw" / "tinyshakespeare" / "input.txt"
    raw.write_bytes(b"")
    _small_e2e_raw(tmp_path / "raw" / "e2e")
    assert _error(pretrain.prepare, tmp_path / "raw", tmp_path / "out") == f"{raw}: no text in it"
    assert not (tmp_path / "out").exists()


def test_an_empty_split_array_is_refused_at_load_naming_it(shakespeare_dir, tmp_path):
    """A prepared set whose val.bin is empty (an older prepare.py wrote such sets)."""
    d = tmp_path / "prepared"
    shutil.copytree(shakespeare_dir, d)
    meta = json.loads((d / "meta.json").read_text())
    meta["files"]["val.bin"] = 0
    (_folder(d) / "val.bin").write_bytes(b"")
    (d / "meta.json").write_text(json.dumps(meta))
    assert _error(load_data, str(d), 64) == \
        f"{_folder(d) / 'val.bin'}: empty (0 bytes): a split with nothing in it; give more raw " \
        f"text and {REDO}"


def test_an_e2e_csv_cut_inside_a_quoted_field_is_one_line(tmp_path):
    """It gave one training example whose ref swallowed the rest of the file."""
    raw = _small_e2e_raw(tmp_path / "raw")
    dev = raw / "devset.csv"
    text = dev.read_text(encoding="utf-8")
    n = text.count("\n")
    dev.write_text(text + 'name[Cut],"The Cut is a\npub', encoding="utf-8")
    assert _error(e2e.read_csv, dev) == \
        f"{dev}:{n + 1}: a quoted field is not closed: the file is cut short?"
    dev.write_text('mr,ref\n"name[Cut],The Cut is a\npub\n', encoding="utf-8")
    assert _error(e2e.read_csv, dev) == \
        f"{dev}:2: a quoted field is not closed: the file is cut short?"
    assert _one_line(["-m", "data.e2e", "--raw-dir", str(raw), "--out-dir",
                      str(tmp_path / "out")]) == \
        f"error: {dev}:2: a quoted field is not closed: the file is cut short?\n"


def test_an_e2e_csv_row_with_an_extra_field_is_one_line_naming_the_line(tmp_path):
    """The extra field was dropped without a word."""
    raw = _small_e2e_raw(tmp_path / "raw")
    dev = raw / "devset.csv"
    lines = dev.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[4] = lines[4].rstrip("\r\n") + ",extra\r\n"
    dev.write_text("".join(lines), encoding="utf-8", newline="")
    assert _error(e2e.read_csv, dev) == \
        f"{dev}:5: 1 field(s) more than the header's 2 (mr, ref)"
    assert _one_line(["-m", "data.e2e", "--raw-dir", str(raw), "--out-dir",
                      str(tmp_path / "out")]) == \
        f"error: {dev}:5: 1 field(s) more than the header's 2 (mr, ref)\n"


def test_an_e2e_csv_with_no_rows_or_too_few_mrs_is_one_line(tmp_path):
    raw = _small_e2e_raw(tmp_path / "raw")
    dev = raw / "devset.csv"
    dev.write_text("mr,ref\n", encoding="utf-8")
    assert _error(e2e.read_csv, dev) == f"{dev}: no rows in it, only the header"
    dev.write_text("mr,ref\nname[A],A is a pub.\n", encoding="utf-8")  # one MR: no val
    assert _error(e2e.prepare, raw, tmp_path / "out") == \
        f"{dev}: too few distinct MRs to carve a val split out of it (every 10th goes to val)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not a prepared set's meta.json (Expecting property name enclosed in double "
                   "quotes: line 1 column 2 (char 1))"),
    (b'{"kind": "examples", "splits": {}}', "no 'files' key"),  # an older prepare.py's
    (b'{"files": {}}', "no 'kind' key"),
    (b'{"kind": "pictures", "files": {}}', "not a prepared set's meta.json (kind 'pictures' is "
                                           "neither 'examples' nor 'stream')"),
    (b'["kind", "files"]', "not a prepared set's meta.json (list indices must be integers or "
                           "slices, not str)"),
    (b'{"kind": "stream", "files": {"val.bin": 8}}', "lists no train.bin"),
])
def test_a_prepared_directory_with_a_bad_meta_json_is_one_line(shakespeare_dir, tmp_path,
                                                                content, message):
    d = tmp_path / "prepared"
    shutil.copytree(shakespeare_dir, d)
    (d / "meta.json").write_bytes(content)
    if message == "lists no train.bin":
        (d / "val.bin").write_bytes(b"\0" * 8)
        message += ": prepare it again"
    else:
        message += f": {REDO}"
    assert _error(load_data, str(d), 64) == f"{d / 'meta.json'}: {message}"


class _Args:
    data, block_size = None, None


def test_a_vocabulary_smaller_than_the_data_is_refused_at_load(tmp_path, e2e_dir):
    f = _jsonl(tmp_path / "pairs.jsonl", GOOD)
    args = _Args()
    args.data = str(f)
    train, _ = data_from_args(args, 32, vocab_size=50257)  # GPT-2's: every id fits
    assert _error(data_from_args, args, 32, vocab_size=1000) == (
        f"pairs.jsonl (train): token id {int(train.tokens.max())} is outside the model's "
        f"vocabulary (vocab_size 1000): this data needs a model with GPT-2's 50,257 tokens")
    assert _error(load_data, str(e2e_dir), 64, vocab_size=50256) == (
        f"{e2e_dir.name}/train: token id 50256 is outside the model's vocabulary (vocab_size "
        f"50256): this data needs a model with GPT-2's 50,257 tokens")


def test_a_small_vocabulary_through_the_command_line(tmp_path):
    f = _jsonl(tmp_path / "pairs.jsonl", GOOD)
    tiny_gpt(vocab_size=128, block_size=64).save_pretrained(tmp_path / "m")
    err = _one_line(["finetune.py", "--init", str(tmp_path / "m"), "--data", str(f),
                     "--out", str(tmp_path / "out")])
    assert err.startswith("error: pairs.jsonl (train): token id ") and "(vocab_size 128)" in err
