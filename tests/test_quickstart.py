"""The README's quick start, run as written (its bash block, line by line) in a copy of the
repository, at tiny sizes: flags appended to each command shrink the model and the budgets
(argparse keeps the last value of a flag), nothing else changes. So the sequence a reader
copies is the sequence tested, and each step must print where its output went."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_DATA

# What each step gets appended: the same commands, tiny models and budgets.
TINY_TRAIN = ["--max-iters", "3", "--warmup", "1", "--lr", "1e-3", "--eval-interval", "2",
              "--eval-batches", "2", "--batch-size", "4", "--no-progress"]
SHRINK = {
    "train.py": TINY_TRAIN + ["--n-layer", "1", "--n-head", "2", "--n-embd", "16"],
    "train.py --init": TINY_TRAIN,
    "finetune.py": TINY_TRAIN,
    "sample.py": ["--eval-limit", "3", "--max-new-tokens", "6"],
    "experiments.compare": ["--examples", "2"],
}


def quick_start_commands() -> list[str]:
    """The `python ...` lines of the README's first bash block under "## Quick start"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    block = re.sub(r"\\ *(#[^\n]*)?\n", " ", block)  # continued lines joined
    return [line.split("#")[0].strip() for line in block.splitlines()
            if line.strip().startswith("python ")]


def script(argv) -> str:
    """What a `python ...` command runs: the file, or the module after -m."""
    return argv[2] if argv[1] == "-m" else argv[1]


def test_the_quick_start_runs_end_to_end_as_written(tmp_path):
    commands = quick_start_commands()
    scripts = [script(shlex.split(c)) for c in commands]
    # the sequence the issue asks for: prepare -> pretrain -> LoRA -> full -> evaluate -> compare
    assert scripts[:2] == ["data.pretrain", "data.e2e"]
    assert scripts[2:] == ["train.py", "finetune.py", "train.py", "sample.py", "sample.py",
                           "experiments.compare"]
    repo = tmp_path / "repo"  # a fresh copy: the steps write data/ and out/ inside it
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "out", "__pycache__", "*.bin", "*.json", "*.png", "raw", "results",
        "tests", "docs"))
    env = dict(os.environ, PYTHONPATH="")
    for command in commands:
        argv = shlex.split(command.replace("DIR", str(SHARED_DATA)))
        name = script(argv)
        key = name + (" --init" if name == "train.py" and "--init" in argv else "")
        argv = [sys.executable] + argv[1:] + SHRINK.get(key, [])
        r = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, f"{command}\n{r.stdout}\n{r.stderr}"
        if name.startswith("data."):  # where the arrays went
            assert re.search(r"wrote data/\w+/: .*meta\.json", r.stdout), r.stdout
        if name in ("train.py", "finetune.py"):  # each training step: its loss and its files
            assert re.search(r"validation loss at step 3: \d+\.\d{4}", r.stdout), r.stdout
            assert re.search(r"(saved|adapter:) \S+\.safetensors", r.stdout), r.stdout
        if name == "sample.py":
            assert re.search(r"BLEU \d+\.\d\d, ROUGE-L \d+\.\d\d .* -> out/eval/\w+\.json",
                             r.stdout), r.stdout
    out = repo / "out" / "compare"
    report = (out / "report.md").read_text()
    assert re.search(r"LoRA recovers -?\d+% of full fine-tuning's drop", report), report
    assert report.count("- base: ") == 2 and report.count("- LoRA: ") == 2
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "report.md" in r.stdout  # the last step says where its output went


@pytest.mark.parametrize("base, lora, full, share", [(3.0, 2.5, 2.0, 0.5), (3.0, 2.0, 2.0, 1.0),
                                                      (3.0, 3.2, 2.0, -0.2)])
def test_share_of_drop(base, lora, full, share):
    from experiments.compare import share_of_drop

    assert share_of_drop(base, lora, full) == pytest.approx(share)


def test_share_of_drop_is_undefined_when_full_finetuning_did_not_lower_the_loss():
    from experiments.compare import share_of_drop

    assert share_of_drop(3.0, 2.5, 3.0) is None


def test_token_kinds_on_a_constructed_example():
    """Two examples in one right-padded batch, each with its own MR: a value is "in the MR" only
    for the example whose MR has it (" Loch Fyne" is not in the first)."""
    import torch

    from support.metrics import KINDS, token_kinds
    from support.common import EOT_TOKEN, get_tokenizer

    enc = get_tokenizer()
    rows = [(enc.encode_ordinary("eatType[pub] ||"), enc.encode_ordinary(" A pub by Loch Fyne")),
            (enc.encode_ordinary("name[Loch Fyne], eatType[pub] ||"),
             enc.encode_ordinary(" pub Loch Fyne"))]
    assert [len(c) for _, c in rows] == [6, 4]  # " Loch" is " L", "och"
    T = max(len(p) + len(c) for p, c in rows)
    x = torch.full((2, T), EOT_TOKEN)
    y = torch.full((2, T), -100)
    for b, (p, c) in enumerate(rows):
        seq = p + c + [EOT_TOKEN]
        x[b, :len(seq) - 1] = torch.tensor(seq[:-1])
        y[b, len(p) - 1:len(seq) - 1] = torch.tensor(seq[len(p):])
    kinds = token_kinds(x, y)
    assert [[k for k in row if k >= 0] for row in kinds.tolist()] == [[0, 1, 2, 2, 2, 2, 3],
                                                                   [0, 1, 1, 1, 3]]
    assert KINDS == ("first token", "in the MR", "other", "<|endoftext|>")


def test_in_the_mr_counts_slot_values_not_slot_keys():
    """Of a real E2E example, "in the MR" is a token of a slot value as a description would
    write it (" Burger", " King", " riverside"), not a slot key that a description happens to
    share (" near", " area") nor the prompt's "||"."""
    import torch

    from data.e2e.prepare import format_completion, format_prompt
    from support.metrics import token_kinds
    from support.common import EOT_TOKEN, get_tokenizer

    enc = get_tokenizer()
    prompt = enc.encode_ordinary(format_prompt(
        "name[The Eagle], area[riverside], near[Burger King]"))
    first, mr, other, eot = range(4)
    words = [(" The", first), (" Eagle", mr), (" is", other), (" near", other), (" Burger", mr),
             (" King", mr), (" in", other), (" the", other), (" riverside", mr), (" area", other),
             (" ||", other)]
    completion = [t for w, _ in words for t in enc.encode_ordinary(w)]
    want = [k for w, k in words for _ in enc.encode_ordinary(w)] + [eot]  # " rivers", "ide"
    assert completion == enc.encode_ordinary(format_completion(
        "The Eagle is near Burger King in the riverside area ||"))
    seq = prompt + completion + [EOT_TOKEN]
    x, y = torch.tensor([seq[:-1]]), torch.tensor([[-100] * (len(prompt) - 1) + seq[len(prompt):]])
    assert token_kinds(x, y)[0, len(prompt) - 1:].tolist() == want


def test_compare_refuses_missing_or_foreign_files_in_one_line(tmp_path, capsys):
    import json

    from conftest import one_error_line

    from experiments.compare import main

    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "log.jsonl").write_text("not json\n")
    err = one_error_line(capsys, main, ["--lora", tmp_path / "lora"])
    assert "log.jsonl: not a log.jsonl of train.py or finetune.py" in err
    log = "".join(json.dumps({"step": s, "val_loss": 3.0 - s / 10}) + "\n" for s in (0, 1))
    for run in ("lora", "full"):
        (tmp_path / run).mkdir(exist_ok=True)
        (tmp_path / run / "log.jsonl").write_text(log)
    argv = ["--lora", tmp_path / "lora", "--full", tmp_path / "full",
            "--lora-eval", tmp_path / "none.json", "--full-eval", tmp_path / "none.json"]
    assert "none.json not found: run sample.py --eval e2e" in one_error_line(capsys, main, argv)
    (tmp_path / "e.json").write_text('{"outputs": []}')
    argv[5] = argv[7] = tmp_path / "e.json"
    assert "e.json: not a result of sample.py --eval e2e" in one_error_line(capsys, main, argv)
