"""What the tests share: the raw data files (SHARED_DATA), the tiny-model factories (ours:
tiny_gpt; transformers': make_hf_gpt2, and tiny_base, its checkpoint in the hub's HF layout) and
the prepared data sets (e2e_dir, shakespeare_dir), each made once per session.

Everything runs offline on a 2-core CPU, so the models are tiny but keep GPT-2's real
vocabulary (tiktoken ids up to 50256) where a test feeds real text.
"""
import os
import tempfile
from pathlib import Path

# Tiny models are fastest on one thread, and the CLI tests' subprocesses (two of them under
# torchrun) then do not oversubscribe a 2-core machine. Set before torch starts its thread pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "lora-from-scratch"
# The raw files the tests read: E2E's dev and test CSVs (never trainset.csv: the tests check
# the offline splits carved out of devset.csv) and Tiny Shakespeare.
E2E_TEST_CSVS = ("devset.csv", "testset.csv", "testset_w_refs.csv")
TEST_RAW_FILES = [f"e2e/{n}" for n in E2E_TEST_CSVS] + ["tinyshakespeare/input.txt"]


def fill_cache(cache: Path) -> None:
    """Download into cache whichever TEST_RAW_FILES it lacks, from the canonical sources the
    prepare scripts use (the E2E release ZIP, through a temporary folder; Karpathy's input.txt)."""
    from data import files
    from data.e2e.prepare import RELEASE_URL, unpack_csvs
    from data.shakespeare.prepare import URL

    if not (cache / "tinyshakespeare" / "input.txt").exists():
        files.download(URL, cache / "tinyshakespeare" / "input.txt")
    if not all((cache / "e2e" / n).exists() for n in E2E_TEST_CSVS):
        with tempfile.TemporaryDirectory() as tmp:
            release = files.download(RELEASE_URL, Path(tmp) / "e2e-dataset.zip")
            unpack_csvs(release, cache / "e2e", names=E2E_TEST_CSVS)


def find_raw_data(environ, shared: Path, cache: Path):
    """-> (folder, None), or (folder, the one line saying what to provide) where it lacks a
    file. The folder: $LORA_SHARED_DATA if set; else `shared` (../shared/data) if there; else
    `cache`, filled on first use (fill_cache)."""
    provide = (f"set LORA_SHARED_DATA to a folder holding {', '.join(TEST_RAW_FILES)} (and "
               f"no e2e/trainset.csv)")
    if environ.get("LORA_SHARED_DATA"):
        folder, source = Path(environ["LORA_SHARED_DATA"]), "LORA_SHARED_DATA"
    elif shared.is_dir():
        folder, source = shared, "../shared/data"
    else:
        folder, source = cache, "the cache"
        try:
            fill_cache(cache)
        except (OSError, ValueError) as e:
            return folder, (f"the tests' raw data files are not here and could not be "
                            f"downloaded into {cache} ({getattr(e, 'reason', e)}): "
                            f"{provide}, or run the tests once with network")
    missing = [f for f in TEST_RAW_FILES if not (folder / f).exists()]
    if missing:
        which = ("the tests' raw files" if len(missing) == len(TEST_RAW_FILES)
                 else ", ".join(missing))
        return folder, f"{source} ({folder}) lacks {which}: {provide}"
    if (folder / "e2e" / "trainset.csv").exists():
        return folder, f"{source} ({folder}) holds e2e/trainset.csv: {provide}"
    return folder, None


SHARED_DATA, RAW_DATA_MISSING = find_raw_data(os.environ, ROOT.parent / "shared" / "data",
                                              CACHE / "data")
if "TIKTOKEN_CACHE_DIR" not in os.environ:  # where tiktoken finds, or else keeps, GPT-2's BPE
    shared_bpe = ROOT.parent / "shared" / "tiktoken-cache"
    os.environ["TIKTOKEN_CACHE_DIR"] = str(shared_bpe if shared_bpe.is_dir()
                                           else CACHE / "tiktoken")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Without the raw data, a test that fails reading it reports the one line saying what to
    provide, instead of a traceback (and is a failure, not a skip)."""
    report = yield
    if RAW_DATA_MISSING and report.failed and str(SHARED_DATA) in report.longreprtext:
        report.longrepr = f"no raw data: {RAW_DATA_MISSING}"
    return report


def make_hf_gpt2(n_layer=2, n_head=4, n_embd=32, n_positions=128, vocab_size=50257, seed=0):
    """A randomly initialised transformers GPT2LMHeadModel (the reference implementation)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Directory of a tiny GPT-2 (2 layers, 4 heads, n_embd 32, 128 positions, full vocabulary)
    written by transformers' save_pretrained: what `--init DIR` gets in the tests."""
    d = tmp_path_factory.mktemp("tiny_base")
    make_hf_gpt2().save_pretrained(d)
    return d


def one_error_line(capsys, main, argv) -> str:
    """A script's main(argv) under common.run_main, as the command line runs it: it must end
    with exit code 1 and exactly one line on stderr, "error: ..."; -> that line."""
    from support.common import run_main

    with pytest.raises(SystemExit) as e:
        run_main(lambda: main([str(a) for a in argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=128)  # tiny_gpt's default


def tiny_gpt(seed=0, **overrides):
    """Our GPT, randomly initialised from `seed`, in eval mode: TINY unless overridden."""
    from model import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def toy_examples(n=16, seed=0):
    """n prompt/completion examples whose completion is the prompt's 4 tokens again: learnable
    by a tiny model in a few steps (block_size 16)."""
    import numpy as np

    from data.datasets import Examples

    rng = np.random.default_rng(seed)
    tokens, index = [], []
    for _ in range(n):
        p = rng.integers(0, 50, 4).tolist()
        index.append((len(tokens), 4, 8))
        tokens += p + p
    return Examples(np.array(tokens, dtype=np.uint16), index, 16, "toy")


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory):
    """E2E prepared from the shared CSVs (data/e2e/prepare.py) into a temporary directory."""
    from data.e2e.prepare import prepare

    out = tmp_path_factory.mktemp("e2e")
    prepare(SHARED_DATA / "e2e", out)
    return out


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory):
    """Tiny Shakespeare prepared from the shared copy into a temporary directory."""
    from data.shakespeare.prepare import prepare

    out = tmp_path_factory.mktemp("shakespeare")
    prepare(SHARED_DATA / "tinyshakespeare", out)
    return out
