"""The card's two commands need nothing but themselves (issue 20): `python finetune.py --rank 4`
on a fresh clone gets GPT-2 from the hub and E2E from its release, and offline says so in one
line. The other command, `python -m pytest -q`, fetches or builds its raw files on first use;
its offline line is tested in test_data.py
(test_the_tests_raw_data_offline_and_nowhere_is_one_line_saying_what_to_provide).
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from safetensors import safe_open

import finetune
from conftest import ROOT, SHARED_DATA
from data.e2e import prepare as e2e
from support.common import ADAPTER_FILE

# Only the budget shrinks: model, data, rank and every other setting are the command's defaults.
TINY_BUDGET = ["--max-iters", "2", "--warmup", "1", "--eval-interval", "2", "--eval-batches", "1",
               "--batch-size", "2", "--no-progress"]


def test_finetune_rank_4_on_a_fresh_clone_needs_only_the_hub_and_the_e2e_release(
        tmp_path, monkeypatch, capsys, tiny_base):
    """The hub stands in as a tiny GPT-2 checkpoint (transformers' save_pretrained: the hub's
    config.json + model.safetensors), the network as the E2E release ZIP built from the shared
    CSVs; data/e2e is a fresh folder. The command's own flags are --rank 4 (and --out)."""
    import huggingface_hub

    asked = []

    def hf_hub_download(repo_id, filename, **kwargs):  # the hub, from a local checkpoint
        asked.append((repo_id, filename))
        return str(tiny_base / filename)

    fetched = []

    def download(url, dest):  # the release, from the shared CSVs instead of the network
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest, "w") as z:
            for n in ("devset.csv", "testset_w_refs.csv"):
                z.write(SHARED_DATA / "e2e" / n, f"e2e-dataset/{n}")
        return dest

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(e2e, "download", download)
    monkeypatch.setattr(e2e, "HERE", tmp_path / "data" / "e2e")  # e2e not prepared, as cloned
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out = tmp_path / "out"
    finetune.main(["--rank", "4", *TINY_BUDGET, "--out", str(out)])
    assert asked == [("gpt2", "config.json"), ("gpt2", "model.safetensors")]
    assert fetched == [e2e.RELEASE_URL]  # prepared once, though finetune.py looks it up twice
    assert capsys.readouterr().out.count("data 'e2e' is not prepared yet: preparing it") == 1
    assert (tmp_path / "data" / "e2e" / "meta.json").is_file()
    with safe_open(out / ADAPTER_FILE, "pt") as f:
        meta = f.metadata()
    assert meta["base_name"] == "gpt2" and '"rank": 4' in meta["lora_config"]
    assert meta["prompt_format"] == "{prompt} ||"  # E2E's, from the set prepared on first use


def test_finetune_rank_4_offline_without_gpt2_cached_is_one_line_naming_init(tmp_path):
    """The command as typed, in a copy of the repository without prepared data, offline with an
    empty Hugging Face cache: exit 1 and one line on stderr saying how to go on."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "out", "results", "docs", "prepared-*", "meta.json", "raw",
        "__pycache__", ".pytest_cache"))
    assert not list((repo / "data").rglob("meta.json"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "finetune.py", "--rank", "4"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1, r.stderr
    assert err[0].startswith("error: could not get 'gpt2' from the Hugging Face hub"), err
    assert "(HF_HUB_OFFLINE is set)" in err[0] and "--init DIR or FILE" in err[0]
    assert not (repo / "out").exists()  # nothing written before the refusal
