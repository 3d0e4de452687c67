"""E2E evaluation: generate one output per meaning representation and score it as the paper's
Table 3 does (BLEU, ROUGE-L; LoRA §5.5 and Table 11 for the decoding).

    evaluate_e2e   outputs for the distinct MRs of a split, greedy or beam search, and scores
    corpus_bleu    sacrebleu, set up as e2e-metrics' mteval-v13a BLEU
    rouge_l        coco-caption's ROUGE-L (beta = 1.2), as e2e-metrics computes it
    write_eval     the result JSON and the input files of e2e-metrics' measure_scores.py
    loss_by_kind   the validation loss by kind of target token: form, copying from the MR, words

NIST, METEOR and CIDEr need the Perl, Java and coco-caption tools: write_eval's .hyp.txt and
.ref.txt let e2e-metrics score the same outputs with all five.

Reading order: evaluate_e2e -> corpus_bleu -> rouge_l -> write_eval.
"""

import json
import re
import time
from pathlib import Path

import torch

from data.datasets import IGNORE
from data.e2e.prepare import format_prompt, load_references
from support.adapters import repeat_adapter_ids
from support.common import EOT_TOKEN, atomic_write_set, get_tokenizer
from support.decoding import beam_search, check_fits, completions, generate


@torch.no_grad()
def evaluate_e2e(model, enc, *, split="test", raw_dir=None, limit=None, max_new_tokens=64,
                 beams=1, length_penalty=1.0, no_repeat_ngram_size=0, early_stopping=False,
                 batch_size=16) -> dict:
    """One output per distinct MR of the split (data/e2e/prepare.py: format_prompt, the same
    prompt as in fine-tuning), scored against all its references -> a dict with the settings,
    "metrics" {"BLEU", "ROUGE_L"} (both 0 to 100, as in Table 3), tokens_per_s and every
    {"mr", "output", "references"}.

    References: data/e2e/prepared-*/{split}.refs.json, from prepare.py, or with raw_dir the E2E CSVs
    in that folder (data.e2e.prepare.load_references; FileNotFoundError when neither is there).
    Greedy decoding batches MRs whose prompts have the same number of tokens (no padding needed,
    so every row is exactly what it would be alone); beam search runs MR by MR. Under
    adapters.use_adapters(model, [id]) every MR is decoded with adapter id (the batches are this
    function's, not the caller's, so more ids are a ValueError). Bad lengths and settings
    (limit, batch_size, beams not integers >= 1; decoding's checks): ValueError, before any MR.
    """
    from tqdm import tqdm  # a progress bar only here: the other functions print nothing

    for name, v in (("limit", 1 if limit is None else limit), ("batch_size", batch_size),
                    ("beams", beams)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"evaluate_e2e: {name} must be an integer >= 1, got {v!r}")
    items = load_references(split, raw_dir)[:limit]
    prompts = [enc.encode_ordinary(format_prompt(mr)) for mr, _ in items]
    for ids in prompts:  # every prompt checked before the first is decoded
        check_fits(model, len(ids), max_new_tokens)
    outputs, n_tokens = [None] * len(items), 0
    device = model.wte.weight.device
    t0 = now(device)
    with tqdm(total=len(items), desc=f"E2E {split}", unit="MR") as bar:
        if beams > 1:
            groups = [[i] for i in range(len(items))]
        else:
            by_len = {}
            for i, ids in enumerate(prompts):
                by_len.setdefault(len(ids), []).append(i)
            groups = [g[k:k + batch_size] for g in by_len.values()
                      for k in range(0, len(g), batch_size)]
        for group in groups:
            idx = torch.tensor([prompts[i] for i in group], device=device)  # (b, T), one T
            with repeat_adapter_ids(model, len(group)):  # use_adapters([id]): id for each MR
                if beams > 1:
                    out = beam_search(model, idx, beams, max_new_tokens, length_penalty,
                                      no_repeat_ngram_size, EOT_TOKEN, early_stopping)
                else:
                    out = generate(model, idx, max_new_tokens, greedy=True, eos_token=EOT_TOKEN)
            comps, n = completions(out, idx.size(1))  # beam search: the best beam's tokens
            for i, c in zip(group, comps):
                outputs[i] = one_line(enc.decode(c))
            n_tokens += n
            bar.update(len(group))
    seconds = now(device) - t0
    refs = [r for _, r in items]
    bleu, rouge = corpus_bleu(outputs, refs), rouge_l(outputs, refs)
    return {
        "task": "e2e", "split": split, "mrs": len(items),
        "decoding": ({"beams": beams, "length_penalty": length_penalty,
                      "no_repeat_ngram_size": no_repeat_ngram_size,
                      "early_stopping": early_stopping} if beams > 1 else {"greedy": True})
        | {"max_new_tokens": max_new_tokens},
        "metrics": {"BLEU": round(bleu.score, 2), "ROUGE_L": round(100 * rouge, 2)},
        "bleu": f"{bleu} ({bleu.signature})",
        "tokens_per_s": round(n_tokens / seconds, 1),
        "outputs": [{"mr": mr, "output": o, "references": r}
                    for (mr, r), o in zip(items, outputs)],
    }


def corpus_bleu(hyps, refs_list):
    """Corpus BLEU of outputs hyps [str] against all references of each, refs_list [[str]] ->
    sacrebleu's BLEUScore (.score from 0 to 100) with .signature set. MRs have 1 to 45
    references, so the reference streams are padded with None, which sacrebleu skips ('' would
    count as a reference of length 0 in the brevity penalty).

    Lowercased, 13a tokenization, closest reference length: as e2e-metrics (the paper's script
    for Table 3) computes BLEU with mteval-v13a (case-insensitive by default). Differences left:
    sacrebleu smooths a zero n-gram count with 'exp' smoothing (mteval with a tiny constant), and
    the Perl script pads missing references with ''."""
    from sacrebleu.metrics import BLEU  # slow to import: only evaluation needs it

    n = max(len(refs) for refs in refs_list)
    streams = [[refs[i] if i < len(refs) else None for refs in refs_list] for i in range(n)]
    metric = BLEU(lowercase=True, tokenize="13a")
    score = metric.corpus_score(hyps, streams)
    score.signature = str(metric.get_signature())  # nrefs:var|case:lc|eff:no|tok:13a|...
    return score


def rouge_l(hyps, refs_list, beta=1.2) -> float:
    """ROUGE-L in [0, 1] of outputs hyps [str] against refs_list [[str]], as e2e-metrics computes
    it for Table 3 (coco-caption's Rouge): per output, the longest common subsequence with each
    reference gives precision and recall; the best precision and the best recall over its
    references combine into F_beta with beta = 1.2; then the mean over outputs. Tokens come from
    rouge-score (lowercased words); coco-caption uses the PTB tokenizer."""
    from rouge_score import rouge_scorer  # only evaluation needs it

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    total = 0.0
    for hyp, refs in zip(hyps, refs_list):
        scores = [scorer.score(ref, hyp)["rougeL"] for ref in refs]  # score(target, prediction)
        p = max(s.precision for s in scores)
        r = max(s.recall for s in scores)
        if p > 0 and r > 0:
            total += (1 + beta ** 2) * p * r / (r + beta ** 2 * p)
    return total / len(hyps)


def one_line(text: str) -> str:
    """An output as one line, whitespace runs as single spaces (E2E references are one line)."""
    return " ".join(text.split())


def write_eval(result: dict, path):
    """The JSON (outputs + scores), and beside it .hyp.txt (one output per line) and .ref.txt
    (each MR's references, groups separated by a blank line): the input files of e2e-metrics'
    measure_scores.py, so the paper's script can score the same outputs with all five metrics.
    The three are one set (common.atomic_write_set): a failure while writing leaves the old
    three whole; a crash between two of the renames leaves a mix that the folder's manifest.json
    shows, and experiments/compare.py refuses it (common.check_manifest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outs = result["outputs"]
    hyp = "".join(o["output"] + "\n" for o in outs)
    ref = "\n".join("".join(r + "\n" for r in o["references"]) for o in outs)
    files = {path.with_suffix(".hyp.txt"): hyp, path.with_suffix(".ref.txt"): ref,
             path: json.dumps(result, indent=1) + "\n"}
    atomic_write_set({f: lambda p, text=text: Path(p).write_text(text, encoding="utf-8")
                      for f, text in files.items()})


def now(device) -> float:
    """A clock for tokens/s: on CUDA, wait for the kernels queued on device (a torch.device or
    its name) first, or the time stops before the GPU has finished the work it is meant to
    measure."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)  # that GPU: without it, the current one
    return time.perf_counter()


# ---------------------------------------------------------------- where a loss is

KINDS = ("first token", "in the MR", "other", "<|endoftext|>")


SLOT_VALUE = re.compile(r"\[([^\]]*)\]")  # an E2E MR is key[value], ...: name[The Eagle]


def mr_value_tokens(prompt: str) -> set:
    """The token ids a description could copy from the MR in `prompt`: each slot value's
    tokens as written at the start of a sentence ("The Eagle") and after a space (" The
    Eagle"). Not the slot keys (" area", " near": words a description also uses on its own),
    the brackets, nor the "||" that ends the prompt."""
    enc = get_tokenizer()
    return {t for value in SLOT_VALUE.findall(prompt) for form in (value, " " + value)
            for t in enc.encode_ordinary(form)}


def token_kinds(x, y):
    """x, y (B, T) inputs and targets of E2E prompt/completion examples -> (B, T) kind index
    into KINDS (-1 off the targets): the completion's first token, a token of one of the
    example's slot values (mr_value_tokens: copying from the MR), any other token, the closing
    EOT."""
    target = y != IGNORE
    first = target.int().argmax(1)  # (B,) position of the first target: x[:first + 1] is the prompt
    enc = get_tokenizer()
    copied = torch.zeros_like(target)  # (B, T)
    for b in range(y.size(0)):
        values = mr_value_tokens(enc.decode(x[b, :first[b] + 1].tolist()))
        copied[b] = torch.isin(y[b], torch.tensor(sorted(values), dtype=y.dtype))
    pos = torch.arange(y.size(1))
    kind = torch.where(copied, 1, 2)
    kind = torch.where(pos[None, :] == first[:, None], 0, kind)
    kind = torch.where(y == EOT_TOKEN, 3, kind)
    return torch.where(target, kind, -1)


@torch.no_grad()
def loss_by_kind(models: dict, data, batch_size=8) -> dict:
    """Mean validation loss per kind of target token (token_kinds) of each model {label: GPT}
    -> {label: [(mean loss, tokens) per KINDS]}. Which kinds a method lowers tells what it
    learned: the format (first token, EOT), the register (other), or to use the MR (in the MR:
    the slot values)."""
    from tqdm import tqdm

    sums = {label: torch.zeros(len(KINDS), dtype=torch.float64) for label in models}
    counts = torch.zeros(len(KINDS), dtype=torch.float64)
    for x, y in tqdm(data.eval_batches(batch_size), total=-(-len(data) // batch_size),
                     desc="loss by kind of token", unit="batch"):
        kind = token_kinds(x, y)
        counts += torch.bincount(kind[kind >= 0], minlength=len(KINDS))
        for label, model in models.items():  # one loss per target, in kind[kind >= 0]'s order
            nll = model.eval()(x, y, reduction="none")
            sums[label] += torch.bincount(kind[kind >= 0], nll.double(), minlength=len(KINDS))
    return {label: [(float(s / max(c, 1)), int(c)) for s, c in zip(sums[label], counts)]
            for label in models}
