"""sample.py, support/decoding.py, support/metrics.py: merged == unmerged generation, seeded
sampling, beam search against transformers, the E2E evaluation and its metrics on hand-made cases, the base model taken
from the adapter's metadata, and bad input on the command line."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA, one_error_line

from model import GPT
from sample import complete, load_model, main, parser
from support.common import EOT_TOKEN, get_tokenizer
from support.decoding import ban_repeated_ngrams, beam_search, generate, sample_next
from support.metrics import corpus_bleu, evaluate_e2e, one_line, rouge_l

E2E_RAW = SHARED_DATA / "e2e"


def make_adapter(base_dir, path, seed=0, record_base=True, prompt_format=None):
    """An adapter whose B is random and non-zero (a trained one; B = 0 at init changes nothing).
    It records base_dir as its base (save_adapter's base_name), unless record_base is False,
    and prompt_format as its task's prompt format (None: plain prompts)."""
    from lora import apply_lora
    from support.adapters import save_adapter

    model = GPT.from_pretrained(base_dir)
    torch.manual_seed(seed)  # A's init: the same seed, the same tensors
    apply_lora(model, rank=4, alpha=32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    if not record_base:
        model.name = ""  # as for a model built in code rather than loaded by name
    save_adapter(model, path, prompt_format=prompt_format)
    return path


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "adapter.safetensors")


E2E_FORMAT = "{prompt} ||"  # data/e2e/prepare.py's format_prompt, as a prepared set records it


@pytest.fixture(scope="module")
def task_adapter(tiny_base, tmp_path_factory):
    """The adapter of the fixture above (the same tensors), recording E2E's prompt format."""
    return make_adapter(tiny_base, tmp_path_factory.mktemp("task") / "adapter.safetensors",
                        prompt_format=E2E_FORMAT)


def run_main(capsys, *args):
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------- merge, sampling, streaming

def test_merged_greedy_equals_unmerged_and_differs_from_base(tiny_base, adapter, capsys):
    common = ["--init", tiny_base, "--adapter", adapter, "--greedy", "--max-new-tokens", 20,
              "--prompt", "The restaurant is"]
    compare = run_main(capsys, *common, "--compare", "--merge").splitlines()
    assert compare[0] == "=== The restaurant is"
    base = compare[1].removeprefix("[base]    ")  # --compare shows newlines as \n
    merged = compare[2].removeprefix("[adapter] ")

    def shown(out):  # a --no-stream printout: prompt + output, then a separator line
        return out.removesuffix("\n" + "-" * 40 + "\n").replace("\n", "\\n")

    unmerged = run_main(capsys, *common, "--no-stream")
    assert shown(unmerged) == "The restaurant is" + merged  # fp32: same tokens, merged or not
    assert merged != base  # a non-zero adapter changes the output
    no_adapter = run_main(capsys, *common[:2], "--no-adapter", *common[4:], "--no-stream")
    assert shown(no_adapter) == "The restaurant is" + base


def test_merge_really_merges(tiny_base, adapter):
    """--merge leaves plain weights that compute what the unmerged adapter computes."""
    base, _ = load_model(tiny_base)
    merged, label = load_model(tiny_base, adapter, merge=True)
    unmerged, _ = load_model(tiny_base, adapter)
    assert label == "adapter merged into W"
    w0, w = base.h[0].attn.c_attn.weight, merged.h[0].attn.c_attn.weight
    assert not torch.equal(w0, w)  # BA was added into W
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), unmerged(idx), atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible_and_streams_what_it_returns(tiny_base, capsys):
    args = ["--init", tiny_base, "--no-adapter", "--prompt", "Once upon a time",
            "--max-new-tokens", 12, "--top-k", 50, "--top-p", 0.95]
    a = run_main(capsys, *args, "--num-samples", 3, "--seed", 1)
    b = run_main(capsys, *args, "--num-samples", 3, "--seed", 1)
    c = run_main(capsys, *args, "--num-samples", 3, "--seed", 2)
    assert a == b
    assert a != c
    streamed = run_main(capsys, *args, "--seed", 3)
    printed = run_main(capsys, *args, "--seed", 3, "--no-stream")
    assert streamed == printed.removesuffix("-" * 40 + "\n")


# ---------------------------------------------------------------- the task's prompt format

def test_finetune_records_the_prompt_format_of_its_data(tiny_base, e2e_dir, tmp_path):
    """A prepared E2E set records format_prompt's form; finetune.py copies it into the adapter.
    A .txt run records none: its prompts are plain text."""
    import finetune
    from data.e2e.prepare import format_prompt
    from support.adapters import read_adapter

    fast = ["--init", tiny_base, "--max-iters", 1, "--eval-interval", 1, "--eval-batches", 1,
            "--batch-size", 2, "--warmup", 0, "--no-progress", "--block-size", 64]
    finetune.main([str(a) for a in fast + ["--data", e2e_dir, "--out", tmp_path / "e2e"]])
    meta = read_adapter(tmp_path / "e2e" / "adapter.safetensors")[1]
    assert meta["prompt_format"] == E2E_FORMAT == format_prompt("{prompt}")
    text = tmp_path / "plain.txt"
    text.write_text("The Vaults is a pub by the river. " * 200)
    finetune.main([str(a) for a in fast + ["--data", text, "--out", tmp_path / "txt"]])
    assert "prompt_format" not in read_adapter(tmp_path / "txt" / "adapter.safetensors")[1]


def test_a_prompt_is_put_into_the_adapters_task_format(tiny_base, adapter, task_adapter, capsys):
    """An MR typed as --prompt gets the separator the adapter was trained with; the same
    tensors without the record see the prompt as typed; a prompt already in the form is kept."""
    mr = "name[The Eagle], food[French]"
    args = ["--init", tiny_base, "--greedy", "--no-stream", "--max-new-tokens", 8]
    task = run_main(capsys, *args, "--adapter", task_adapter, "--prompt", mr)
    assert task.startswith(mr + " ||")
    assert task == run_main(capsys, *args, "--adapter", adapter, "--prompt", mr + " ||")
    assert task == run_main(capsys, *args, "--adapter", task_adapter, "--prompt", mr + " ||")
    assert not run_main(capsys, *args, "--adapter", adapter, "--prompt", mr).startswith(mr + " ||")


def test_the_default_decoding_is_greedy_for_a_task_adapter_only(tiny_base, adapter, task_adapter,
                                                                 capsys):
    """A task adapter decodes greedily (what --eval does) unless a sampling flag is given; an
    adapter without a task, and the base alone, sample at temperature 1 as before."""
    args = ["--init", tiny_base, "--no-stream", "--max-new-tokens", 12, "--prompt", "name[A]"]
    greedy = run_main(capsys, *args, "--adapter", task_adapter, "--greedy")
    assert main([str(a) for a in args + ["--adapter", task_adapter, "--seed", 1]]) == 0
    out, err = capsys.readouterr()
    assert out == greedy and "greedy (the task adapter's default" in err, err
    assert run_main(capsys, *args, "--adapter", task_adapter, "--seed", 2) == greedy
    sampled = run_main(capsys, *args, "--adapter", task_adapter, "--temperature", 1.0)
    assert sampled != greedy  # asked for: sampling
    two = run_main(capsys, *args, "--adapter", task_adapter, "--num-samples", 2)
    first, second, _ = two.split("-" * 40 + "\n")
    assert first != second  # more than one sample: sampled, not two greedy copies
    plain = ["--init", tiny_base, "--no-stream", "--max-new-tokens", 12, "--prompt", "name[A] ||"]
    for source in (["--adapter", adapter], ["--no-adapter"]):
        default = run_main(capsys, *plain, *source)
        assert default == run_main(capsys, *plain, *source, "--temperature", 1.0)
        assert default != run_main(capsys, *plain, *source, "--greedy")


@pytest.fixture(scope="module")
def ends_at_once(tmp_path_factory):
    """A tiny GPT-2 whose every next token is <|endoftext|>: ln_f outputs wte[EOT] whatever its
    input, and that row is the longest, so its logit is the largest."""
    from conftest import make_hf_gpt2

    hf = make_hf_gpt2()
    with torch.no_grad():
        wte = hf.transformer.wte.weight
        wte[EOT_TOKEN] *= 100
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.copy_(wte[EOT_TOKEN])
    d = tmp_path_factory.mktemp("ends_at_once")
    hf.save_pretrained(d)
    return d


def test_zero_new_tokens_are_reported_in_one_line_with_the_reason(ends_at_once, tmp_path,
                                                                  capsys):
    base = ["--init", ends_at_once, "--max-new-tokens", 5, "--prompt", "name[The Eagle]"]
    assert main([str(a) for a in base + ["--no-adapter", "--greedy"]]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "<|endoftext|>" in line]
    assert len(notes) == 1 and "nothing was generated" in notes[0], notes
    plain = make_adapter(ends_at_once, tmp_path / "plain.safetensors")
    assert main([str(a) for a in base + ["--adapter", plain, "--greedy"]]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "<|endoftext|>" in line]
    assert len(notes) == 1 and "records no prompt format" in notes[0], notes


# ---------------------------------------------------------------- beam search

@pytest.fixture(scope="module")
def tiny(tiny_base):
    return GPT.from_pretrained(tiny_base).eval()


def prompts(n, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (1, T), generator=g) for _ in range(n)]


def test_beam_search_with_one_beam_is_greedy(tiny):
    for idx in prompts(4):
        free = generate(tiny, idx, 16, greedy=True)[0, 5:].tolist()
        for eos in (EOT_TOKEN, free[4]):  # the second one ends the greedy text early
            greedy = generate(tiny, idx, 16, greedy=True, eos_token=eos)
            for lp in (1.0, 0.5):
                assert torch.equal(beam_search(tiny, idx, 1, 16, length_penalty=lp,
                                               eos_token=eos), greedy)


@pytest.mark.parametrize("beams,length_penalty,no_repeat,early,ends_early", [
    (4, 0.9, 0, False, True), (10, 0.9, 4, False, True), (4, 0.9, 2, False, True),
    (5, 1.0, 3, False, True), (3, 0.5, 0, True, True), (6, -1.0, 0, False, True),
    (5, 2.0, 0, False, False)])  # a penalty > 1 favours long hypotheses: all reach 16 tokens
def test_beam_search_matches_transformers(tiny_base, tiny, beams, length_penalty, no_repeat, early,
                                          ends_early):
    """The same sequences as transformers' generate(num_beams=...) with the same length penalty,
    n-gram ban and early_stopping (the paper's 10 beams, 0.9, 4 among them). The end token is
    one the model emits a few steps in, so hypotheses end at different lengths and the length
    penalty decides between them."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_base).eval()
    ended_early = 0
    for idx in prompts(6, seed=1):
        free = beam_search(tiny, idx, 4, 16, eos_token=None)[0, 5:].tolist()
        eos = next((t for i, t in enumerate(free) if i >= 3 and t not in free[:i]), free[-1])
        ours = beam_search(tiny, idx, beams, 16, length_penalty=length_penalty,
                           no_repeat_ngram_size=no_repeat, eos_token=eos, early_stopping=early)
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                             num_beams=beams, length_penalty=length_penalty,
                             no_repeat_ngram_size=no_repeat, early_stopping=early,
                             max_new_tokens=16, eos_token_id=eos, pad_token_id=eos)
        assert ours.tolist() == theirs.tolist()
        ended_early += ours.size(1) < 5 + 16
    assert (ended_early >= 1) == ends_early  # whether the end-of-text path was exercised


def test_ban_repeated_ngrams_by_hand():
    seqs = torch.tensor([[1, 2, 3, 1, 2]])
    banned = lambda n: (ban_repeated_ngrams(seqs, torch.zeros(1, 6), n)[0] == -math.inf)
    assert banned(3).nonzero().flatten().tolist() == [3]  # "1 2 3" seen: after "1 2", not 3
    assert banned(2).nonzero().flatten().tolist() == [3]  # after "2": 3 seen
    assert banned(1).nonzero().flatten().tolist() == [1, 2, 3]
    assert banned(6).nonzero().numel() == 0  # no 6-gram fits yet


def kept_by_top_p(logits, top_p, n=4000):
    """The tokens sample_next can pick from logits (V,) under top_p: n draws find every token of
    the kept set (each has probability >= 1/100 in these tests, missed with odds below e^-40),
    and no other."""
    g = torch.Generator().manual_seed(0)
    return set(sample_next(logits.expand(n, -1), top_p=top_p, generator=g).tolist())


@pytest.mark.parametrize("probs, top_p", [
    ((.5, .3, .1, .1), .8), ((.5, .3, .1, .1), .9), ((.5, .3, .1, .1), .5), ((.25,) * 4, .5),
    ((.25,) * 4, .75), ((.4, .3, .2, .1), .7), ((.4, .3, .2, .1), .9), ((.6, .3, .1), .9),
    ((.7, .2, .1), .9), ((.1,) * 10, .3), ((.1,) * 10, .7), ((.2,) * 5, .6), ((.05,) * 20, .35)])
def test_top_p_keeps_the_smallest_set_that_reaches_p_on_exact_boundaries(probs, top_p):
    """.5 + .3 reaches .8 exactly, so top_p=0.8 keeps two tokens, not three (summed in float32,
    .5 + .3 is 0.79999995). The expected count is computed in exact fractions; probs are in
    descending order, and among tied tokens any may be kept. (transformers' float32 test keeps
    eight of the twenty .05 at .35.)"""
    from fractions import Fraction

    need, mass = 0, Fraction(0)
    while mass < Fraction(str(top_p)):
        mass, need = mass + Fraction(str(probs[need])), need + 1
    kept = kept_by_top_p(torch.tensor(probs).log(), top_p)
    assert len(kept) == need and all(probs[t] >= probs[need - 1] for t in kept)


def test_top_p_keeps_what_transformers_keeps():
    """The same set as transformers' TopPLogitsWarper: on the issue's boundary and on random
    logits (12 tokens, each with probability >= 1/100) at several p."""
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(1)
    cases = [(torch.tensor([.5, .3, .1, .1]).log(), .8)] + [
        (torch.randn(12, generator=g) * 0.5, p) for p in (.2, .5, .8, .95) for _ in range(3)]
    for logits, p in cases:
        assert logits.softmax(-1).min() > 0.01
        theirs = TopPLogitsWarper(p)(None, logits[None])[0].isfinite().nonzero().flatten()
        assert kept_by_top_p(logits, p) == set(theirs.tolist()), (logits, p)


# ---------------------------------------------------------------- host syncs and nan logits

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
              "cpu", "numpy")  # each waits for the device to finish (a host sync on a GPU)


def host_reads(monkeypatch, call) -> int:
    """How many times call() reads a tensor's values back to the host (the Python-level ways)."""
    count = [0]
    for name in HOST_READS:
        def counted(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    call()
    monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("settings", [dict(greedy=True), dict(top_k=20, top_p=0.9)])
def test_generate_reads_the_device_a_fixed_number_of_times(tiny, monkeypatch, settings):
    """Finiteness is checked once, not for every token: 16 new tokens read the device back as
    often as 4 (before: one isfinite check a token)."""
    idx = prompts(1)[0].expand(2, -1)
    reads = {n: host_reads(monkeypatch, lambda: generate(tiny, idx, n, **settings))
             for n in (4, 16)}
    assert reads[16] == reads[4] <= 2, reads


def test_beam_search_reads_the_device_once_a_step(tiny, monkeypatch):
    """One read-back a step for the hypotheses and the stop test (before: about 2 x beams), the
    n-gram ban computed on the device."""
    idx = prompts(1)[0]
    reads = {n: host_reads(monkeypatch, lambda: beam_search(tiny, idx, 4, n, eos_token=None,
                                                            no_repeat_ngram_size=3))
             for n in (4, 16)}
    assert reads[16] - reads[4] <= 12, reads


def nan_at(model, call_number):
    """A forward hook: the model's logits are nan from its call_number-th call on (0: the
    prompt), as when fp16 activations overflow partway through a generation."""
    calls = [0]

    def hook(module, args, out):
        calls[0] += 1
        return out.fill_(float("nan")) if calls[0] > call_number else out
    return model.register_forward_hook(hook)


@pytest.mark.parametrize("at", [0, 3])
@pytest.mark.parametrize("decode", ["greedy", "sample", "beams"])
def test_nan_logits_are_refused_and_no_token_from_them_is_streamed(tiny, at, decode):
    idx, streamed = prompts(1)[0], []
    handle = nan_at(tiny, at)
    try:
        with pytest.raises(ValueError, match="logits are nan or inf"):
            if decode == "beams":
                beam_search(tiny, idx, 3, 8, eos_token=None)
            else:
                generate(tiny, idx, 8, greedy=decode == "greedy", stream=streamed.append)
    finally:
        handle.remove()
    assert len(streamed) <= at  # the tokens before the nan step, if any


# ---------------------------------------------------------------- several adapters (LoRA §4.2)

@pytest.fixture(scope="module")
def side_by_side(tiny_base, adapter, tmp_path_factory):
    """(base with adapters "a" and "b" loaded side by side, {name: the model with it alone})."""
    from support.adapters import load_adapter, load_adapters

    b = make_adapter(tiny_base, tmp_path_factory.mktemp("b") / "b.safetensors", seed=1)
    files = {"a": adapter, "b": b}
    model = GPT.from_pretrained(tiny_base).eval()
    load_adapters(model, files)
    alone = {n: load_adapter(GPT.from_pretrained(tiny_base).eval(), f) for n, f in files.items()}
    return model, alone


def test_beam_search_under_use_adapters_equals_the_adapter_alone(side_by_side):
    """Beam search expands the prompt's row into `beams` rows after the prompt has run: each beam
    keeps the prompt's adapter id (PEFT repeats it per beam the same way)."""
    from support.adapters import use_adapters

    model, alone = side_by_side
    for idx in prompts(2, seed=2):
        outs = {}
        for name, single in alone.items():
            want = beam_search(single, idx, 3, 12, length_penalty=0.9, no_repeat_ngram_size=2)
            with use_adapters(model, [name]):
                got = beam_search(model, idx, 3, 12, length_penalty=0.9, no_repeat_ngram_size=2)
            assert got.tolist() == want.tolist()
            outs[name] = got.tolist()
        assert outs["a"] != outs["b"]  # the ids matter
    with use_adapters(model, ["a", "b"]), pytest.raises(ValueError, match="2 adapter ids for a "
                                                                           "batch of 1 rows"):
        beam_search(model, idx, 3, 12)  # one prompt, one row: two ids cannot both apply


def test_num_samples_under_use_adapters_equals_the_adapter_alone(side_by_side):
    """complete(num_samples=3) samples 3 rows of one prompt: each with the prompt's adapter."""
    from support.adapters import use_adapters

    model, alone = side_by_side
    prompt = prompts(1, seed=3)[0][0].tolist()
    sampling = dict(num_samples=3, max_new_tokens=10, top_k=50)
    for name, single in alone.items():
        want = complete(single, prompt, generator=torch.Generator().manual_seed(0), **sampling)
        with use_adapters(model, [name]):
            got = complete(model, prompt, generator=torch.Generator().manual_seed(0), **sampling)
        assert got == want
        assert len({tuple(c) for c in got[0]}) > 1  # three samples, not one row copied
        with use_adapters(model, [name]):  # and beams through complete
            assert complete(model, prompt, max_new_tokens=8, beams=3) == \
                complete(single, prompt, max_new_tokens=8, beams=3)


def test_e2e_evaluation_under_use_adapters_equals_the_adapter_alone(side_by_side):
    """evaluate_e2e batches MRs itself (greedy) or expands one into beams: one id applies to
    every MR either way; two ids cannot be matched to its rows and are refused."""
    from support.adapters import use_adapters

    model, alone = side_by_side
    enc = get_tokenizer()
    for kw in (dict(limit=12), dict(limit=2, beams=3)):  # 12 MRs: some batch has several
        want = evaluate_e2e(alone["b"], enc, raw_dir=E2E_RAW, max_new_tokens=5, **kw)
        with use_adapters(model, ["b"]):
            got = evaluate_e2e(model, enc, raw_dir=E2E_RAW, max_new_tokens=5, **kw)
        assert got["outputs"] == want["outputs"]
        with use_adapters(model, ["b", "a"]), pytest.raises(ValueError, match="adapter ids"):
            evaluate_e2e(model, enc, raw_dir=E2E_RAW, max_new_tokens=5, **kw)


# ---------------------------------------------------------------- metrics on hand-made cases

def test_corpus_bleu_known_scores():
    # identical (case and the final period's tokenization do not matter, as in e2e-metrics)
    assert corpus_bleu(["The cat sat on the mat."], [["the cat sat on the mat ."]]).score == \
        pytest.approx(100)
    # "the cat sat on a mat" vs "the cat sat on the mat": n-gram precisions 5/6, 3/5, 2/4, 1/3,
    # same length so no brevity penalty: BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    assert corpus_bleu(["the cat sat on a mat"], [["the cat sat on the mat"]]).score == \
        pytest.approx(100 * (1 / 12) ** 0.25)
    # Two MRs, 2 and 1 references (the streams are padded). Every n-gram matches; output length
    # 6 + 2 = 8, closest reference lengths 6 + 6 = 12, so BLEU = exp(1 - 12/8). Padding with ''
    # would make the closest reference of "the cat" the empty one (length 0) and give 100.
    hyps = ["the cat sat on the mat", "the cat"]
    refs = [["a dog ran", "the cat sat on the mat"], ["the cat sat on the mat"]]
    assert corpus_bleu(hyps, refs).score == pytest.approx(100 * math.exp(1 - 12 / 8))


def test_rouge_l_known_scores():
    assert rouge_l(["the cat sat on the mat"], [["The cat sat on the mat."]]) == pytest.approx(1)
    # LCS with "the cat" is 2 words: P = 2/6, R = 1; with "the cat sat on the mat" 5 words:
    # P = R = 5/6. Best P = 5/6 and best R = 1 combine: F = (1 + b^2) P R / (R + b^2 P), b = 1.2.
    p, r, b2 = 5 / 6, 1.0, 1.44
    assert rouge_l(["the cat sat on a mat"], [["the cat", "the cat sat on the mat"]]) == \
        pytest.approx((1 + b2) * p * r / (r + b2 * p))
    assert rouge_l(["x y", "the cat"], [["a b"], ["the cat"]]) == pytest.approx(0.5)  # mean


# ---------------------------------------------------------------- E2E evaluation

def test_eval_e2e_writes_scores_and_outputs(tiny_base, adapter, tmp_path, capsys):
    from data.e2e.prepare import load_references

    out = tmp_path / "e2e.json"
    run_main(capsys, "--init", tiny_base, "--adapter", adapter, "--merge", "--eval", "e2e",
             "--eval-limit", 8, "--raw-dir", E2E_RAW, "--max-new-tokens", 8, "--out", out)
    result = json.loads(out.read_text())
    assert result["mode"] == "adapter merged into W"
    assert set(result["metrics"]) == {"BLEU", "ROUGE_L"}
    assert all(0 <= v <= 100 for v in result["metrics"].values())
    expected = load_references("test", E2E_RAW)[:8]
    assert [(o["mr"], o["references"]) for o in result["outputs"]] == \
        [(mr, refs) for mr, refs in expected]
    hyps = [o["output"] for o in result["outputs"]]
    # the score file's numbers are the metrics of its outputs
    assert result["metrics"]["BLEU"] == round(corpus_bleu(hyps, [r for _, r in expected]).score, 2)
    # beside it, the input files of e2e-metrics' measure_scores.py
    assert (tmp_path / "e2e.hyp.txt").read_text().splitlines() == hyps
    groups = (tmp_path / "e2e.ref.txt").read_text().split("\n\n")
    assert [g.strip().split("\n") for g in groups] == [refs for _, refs in expected]


def test_eval_batches_equal_single_rows_and_beam_path(tiny):
    """Greedy evaluation batches prompts of equal length: each row must be what it is alone."""
    from data.e2e.prepare import format_prompt, load_references

    enc = get_tokenizer()
    items = load_references("test", E2E_RAW)[:12]
    lengths = [len(enc.encode_ordinary(format_prompt(mr))) for mr, _ in items]
    assert len(set(lengths)) < len(lengths)  # some batch holds more than one MR
    result = evaluate_e2e(tiny, enc, raw_dir=E2E_RAW, limit=12, max_new_tokens=6)
    for (mr, _), o in zip(items, result["outputs"]):
        comps, _ = complete(tiny, enc.encode_ordinary(format_prompt(mr)), max_new_tokens=6,
                            greedy=True)
        assert o["output"] == one_line(enc.decode(comps[0]))
    beam = evaluate_e2e(tiny, enc, raw_dir=E2E_RAW, limit=2, max_new_tokens=6, beams=3,
                        length_penalty=0.9, no_repeat_ngram_size=4)
    assert beam["decoding"]["beams"] == 3 and len(beam["outputs"]) == 2


# ---------------------------------------------------------------- the base model and --help

def test_init_defaults_to_the_base_the_adapter_records(tiny_base, adapter, tmp_path, capsys):
    """Without --init, the base is the one save_adapter recorded (finetune.py's --init), not
    gpt2: offline, without a hub cache, gpt2 could not even load."""
    from support.adapters import read_adapter

    assert read_adapter(adapter)[1]["base_name"] == str(tiny_base)
    args = ["--adapter", adapter, "--greedy", "--no-stream", "--max-new-tokens", 8,
            "--prompt", "The restaurant is"]
    assert run_main(capsys, *args) == run_main(capsys, "--init", tiny_base, *args)
    out = tmp_path / "e2e.json"
    run_main(capsys, "--adapter", adapter, "--eval", "e2e", "--eval-limit", 2,
             "--raw-dir", E2E_RAW, "--max-new-tokens", 4, "--out", out)
    assert json.loads(out.read_text())["init"] == str(tiny_base)


def test_help_shows_defaults_and_every_option_has_help(capsys):
    p = parser()
    for action in p._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 64)" in shown and "(default: out/finetune/adapter.safetensors)" in shown
    assert "python sample.py --merge --eval e2e --beams 10" in shown  # the examples, unwrapped


# ---------------------------------------------------------------- bad input

BAD_FLAGS = [  # (every script's module, a flag it cannot parse, the one line it must print)
    ("train", ["--max-iters", "many"], "error: --max-iters takes an integer, got 'many'"),
    ("finetune", ["--rank", "four"], "error: --rank takes an integer, got 'four'"),
    ("sample", ["--temperature", "hot"], "error: --temperature takes a number, got 'hot'"),
    ("bench", ["--model", "huge"], "error: --model: invalid choice: 'huge' (choose from"),
    ("experiments.compare", ["--examples", "six"], "error: --examples takes an integer"),
    ("experiments.studies", ["rank", "--steps", "1e3"], "error: --steps takes an integer"),
    ("data.e2e.prepare", ["--bogus"], "error: unrecognized arguments: --bogus"),
    ("data.pretrain.prepare", ["--raw-dir"], "error: --raw-dir: expected one argument"),
    ("data.shakespeare.prepare", ["--out-dir"], "error: --out-dir: expected one argument"),
]


@pytest.mark.parametrize("module, argv, line", BAD_FLAGS, ids=[b[0] for b in BAD_FLAGS])
def test_a_flag_that_does_not_parse_is_one_line_and_exit_code_1(module, argv, line, capsys):
    """It was argparse's usage block (15 lines for finetune.py) and exit code 2."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith(line), err
    assert err[0].endswith("(see --help)"), err


def test_bad_flags_on_the_command_line_and_help_still_exits_0():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs = {args: subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for args in [("finetune.py", "--rank", "four"), ("-m", "data.e2e", "--bogus"),
                         ("sample.py", "--top-k", "x"), ("-m", "experiments.compare", "--help")]}
    expected = ["error: --rank takes an integer, got 'four' (see --help)",
                "error: unrecognized arguments: --bogus (see --help)",
                "error: --top-k takes an integer, got 'x' (see --help)", None]
    for (args, proc), line in zip(runs.items(), expected):
        out, err = proc.communicate(timeout=120)
        if line is None:  # --help
            assert proc.returncode == 0 and err == "" and "usage:" in out, err
        else:
            assert proc.returncode == 1 and err == line + "\n" and out == "", (args, err)

BAD_INPUT = ["missing adapter", "not an adapter", "other base", "init unloadable",
             "recorded base gone", "no recorded base", "empty prompt", "too long"]


@pytest.fixture(scope="module")
def bad_input_runs(tiny_base, adapter, tmp_path_factory):
    """Every case of BAD_INPUT run through `python sample.py`, all started at once (each process
    imports torch, so together they take about the time of one) -> {case: (process, the start
    and the end of the one line expected on stderr)}."""
    import shutil

    from conftest import make_hf_gpt2

    tmp = tmp_path_factory.mktemp("bad_input")
    other_base, gone = tmp / "other_base", tmp / "gone_base"
    make_hf_gpt2(seed=1).save_pretrained(other_base)  # same shapes, other weights
    make_hf_gpt2(seed=2).save_pretrained(gone)
    other = make_adapter(other_base, tmp / "other.safetensors")
    orphan = make_adapter(gone, tmp / "orphan.safetensors")
    shutil.rmtree(gone)  # the adapter still records it
    anonymous = make_adapter(tiny_base, tmp / "anonymous.safetensors", record_base=False)
    (tmp / "text.safetensors").write_text("not safetensors")
    init, nope = ["--init", str(tiny_base)], tmp / "nope"
    cases = {
        "missing adapter": (init + ["--adapter", tmp / "nope.safetensors"],
                            f"error: adapter file not found: {tmp / 'nope.safetensors'} "
                            f"(train one with finetune.py or pass --adapter)", ""),
        "not an adapter": (init + ["--adapter", tmp / "text.safetensors"],
                           f"error: {tmp / 'text.safetensors'}: cannot read the adapter", ""),
        "other base": (init + ["--adapter", other],
                       f"error: {other}: adapter was trained on other base weights",
                       f"(pass --init {other_base})"),
        "init unloadable": (["--init", nope, "--adapter", adapter],
                            f"error: {nope}: no such file or directory",
                            f"({adapter} was trained on '{tiny_base}': pass --init {tiny_base})"),
        "recorded base gone": (["--adapter", orphan], f"error: {gone}: no such file or directory",
                               f"(the base recorded in {orphan}; pass --init with the model it "
                               f"was trained on, or --no-adapter)"),
        "no recorded base": (["--adapter", anonymous], "error: could not get 'gpt2'", ""),
        "empty prompt": (init + ["--no-adapter", "--prompt", ""], "error: the prompt is empty",
                         ""),
        "too long": (init + ["--adapter", adapter, "--max-new-tokens", 500], "error: prompt (",
                     ""),
    }
    assert list(cases) == BAD_INPUT
    # Offline and an empty Hugging Face cache: gpt2 cannot load, wherever the tests run.
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"))
    runs = {k: (subprocess.Popen([sys.executable, "sample.py", *map(str, args)], cwd=ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True), start, end)
            for k, (args, start, end) in cases.items()}
    yield runs
    for proc, _, _ in runs.values():  # a deselected case leaves no process behind
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_one_line_and_nonzero_exit(bad_input_runs, case):
    proc, start, end = bad_input_runs[case]
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(start), err
    assert err.rstrip("\n").endswith(end), err
    assert out == "", out


# ---------------------------------------------------------------- settings out of range

@pytest.mark.parametrize("call, message", [
    (lambda m, i: generate(m, i, 4, temperature=-1.0), "temperature must be >= 0 and finite"),
    (lambda m, i: generate(m, i, 4, temperature=float("nan")), "temperature must be >= 0"),
    (lambda m, i: generate(m, i, 4, temperature=float("inf")), "temperature must be >= 0"),
    (lambda m, i: generate(m, i, -3), "max_new_tokens must be an integer >= 1"),
    (lambda m, i: generate(m, i, 2.5), "max_new_tokens must be an integer >= 1"),
    (lambda m, i: generate(m, i, 4, top_k=0), "top_k must be an integer >= 1"),
    (lambda m, i: generate(m, i, 4, top_k=2.5), "top_k must be an integer >= 1"),
    (lambda m, i: generate(m, i, 4, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda m, i: generate(m, i, 4, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (lambda m, i: generate(m, i, 4, greedy=True, top_k=0), "top_k must be"),
    (lambda m, i: sample_next(torch.zeros(1, 8), top_k=0), "top_k must be"),
    (lambda m, i: sample_next(torch.zeros(1, 8), top_p=0.0), "top_p must be"),
    (lambda m, i: beam_search(m, i, 0, 4), "beams must be an integer >= 1"),
    (lambda m, i: beam_search(m, i, 2.0, 4), "beams must be an integer >= 1"),
    (lambda m, i: beam_search(m, i, 2, 4, length_penalty=float("nan")),
     "length_penalty must be finite"),
    (lambda m, i: beam_search(m, i, 2, 4, no_repeat_ngram_size=-1),
     "no_repeat_ngram_size must be an integer >= 0"),
    (lambda m, i: complete(m, i[0].tolist(), num_samples=0), "num_samples must be"),
    (lambda m, i: evaluate_e2e(m, None, raw_dir="nowhere", limit=0), "limit must be"),
    (lambda m, i: evaluate_e2e(m, None, raw_dir="nowhere", limit=-1), "limit must be"),
    (lambda m, i: evaluate_e2e(m, None, raw_dir="nowhere", batch_size=0), "batch_size must be"),
    (lambda m, i: evaluate_e2e(m, None, raw_dir="nowhere", beams=0), "beams must be"),
])
def test_decoding_settings_out_of_range_are_one_clear_value_error(tiny, call, message):
    """Before: a negative temperature sampled from the inverted distribution, top_k=0 and
    top_p=0 raised deep in torch, a negative eval limit dropped the last MR."""
    with pytest.raises(ValueError, match=message):
        call(tiny, prompts(1)[0])


def error_line(capsys, argv) -> str:
    return one_error_line(capsys, main, argv)


@pytest.mark.parametrize("flags, message", [
    (["--beams", 100000], "--beams must be at most 64"),
    (["--num-samples", 1000], "--num-samples must be at most 64"),
    (["--num-samples", 0], "--num-samples must be >= 1, got 0"),
    (["--temperature", "inf"], "--temperature must be"),
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--temperature", "nan", "--greedy"], "--temperature must be finite"),
    (["--length-penalty", "nan"], "--length-penalty must be finite"),
    (["--top-k", 0], "--top-k must be >= 1"),
    (["--top-p", 0], r"--top-p must be in (0, 1]"),
    (["--top-p", 1.5], r"--top-p must be in (0, 1]"),
    (["--max-new-tokens", -5], "--max-new-tokens must be >= 1"),
    (["--no-repeat-ngram-size", -1], "--no-repeat-ngram-size must be >= 0"),
    (["--eval", "e2e", "--eval-limit", 0], "--eval-limit must be >= 1"),
    (["--eval", "e2e", "--batch-size", 0], "--batch-size must be >= 1"),
])
def test_flags_out_of_range_are_refused_before_anything_loads(capsys, flags, message):
    """--init names no model: the flag's error comes first, so nothing was loaded."""
    line = error_line(capsys, ["--init", "/no/such/model", "--no-adapter", *flags])
    assert message in line, line


def test_help_states_the_range_of_every_numeric_flag():
    import sample

    helps = {a.dest: a.help for a in parser()._actions}
    for name, spec in sample._FLAG_RANGES.items():
        assert f"({spec}" in helps[name], name
    assert f"at most {sample.MAX_ROWS}" in helps["beams"]


def test_an_unusable_eval_out_is_found_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    base = ["--init", "/no/such/model", "--no-adapter", "--eval", "e2e", "--out"]
    line = error_line(capsys, base + [tmp_path / "file" / "e2e.json"])
    assert line.startswith(f"error: --out {tmp_path / 'file' / 'e2e.json'}: cannot write it")
    line = error_line(capsys, base + [tmp_path])  # a directory in the way
    assert line.startswith(f"error: --out {tmp_path}: cannot write it")
    # a usable path passes, and the check leaves nothing behind: the model is what fails
    line = error_line(capsys, base + [tmp_path / "new" / "e2e.json"])
    assert "/no/such/model" in line and list((tmp_path / "new").iterdir()) == []


def test_a_prompt_file_that_is_not_utf8_names_the_file_and_line(tiny_base, tmp_path, capsys):
    """It said "'utf-8' codec can't decode byte 0xe9 in position 3", naming no file."""
    f = tmp_path / "prompts.txt"
    f.write_bytes(b"name[The Vaults] ||\ncaf\xe9 ||\n")
    line = error_line(capsys, ["--init", tiny_base, "--no-adapter", "--prompt-file", f])
    assert line.startswith(f"error: {f}:2: not UTF-8 text (byte 0xe9)"), line
