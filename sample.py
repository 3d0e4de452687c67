"""Generate text with GPT-2, with a LoRA adapter, or with the adapter merged into the weights, and
score generations on E2E (LoRA §5.5, Table 3).

    python sample.py --merge                  # base + adapter folded into W: the base model's speed
    python sample.py                          # the adapter runs unmerged, beside the frozen W0
    python sample.py --no-adapter             # the base model alone
    python sample.py --compare --greedy       # base and adapted outputs, same prompts and seed
    python sample.py --merge --eval e2e --beams 10 --length-penalty 0.9 --no-repeat-ngram-size 4

Why --merge matters (§4.1, "No Additional Inference Latency"): after training, W = W0 + (α/r) BA
is computed once and stored; generation then runs on plain weights, exactly as fast as the base
model. Unmerged, every adapted layer does two extra small matmuls per token.

Reading order: load_model -> complete (sampling, greedy, streaming) -> beam_search -> the E2E
evaluation (evaluate_e2e, corpus_bleu, rouge_l) -> main.
"""

import argparse
import codecs
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune import ADAPTER, OUT_DIR as FINETUNE_OUT
from lora import repeat_adapter_ids
from model import EOT_TOKEN, KVCache, _atomic_write
from train import DTYPES, get_device, get_tokenizer, load_base, run_main

DEFAULT_ADAPTER = f"{FINETUNE_OUT}/{ADAPTER}"  # where finetune.py writes by default
# The prompt when none is given: an MR of the E2E test set, formatted as in fine-tuning.
EXAMPLE_MR = ("name[The Vaults], eatType[pub], food[French], priceRange[high], area[riverside], "
              "familyFriendly[yes], near[Raja Indian Cuisine]")


def load_model(init, adapter=None, *, merge=False, device="cpu", dtype="float32"):
    """The base model (train.load_base), with the adapter file loaded if one is given, and merged
    into the weights if merge. Returns (model, label of the mode)."""
    model = load_base(init, device, dtype).eval()
    label = "base"
    if adapter is not None:
        label = attach_adapter(model, adapter, merge=merge)
    return model, label


def attach_adapter(model, path, *, merge=False) -> str:
    """Load a LoRA adapter into model (lora.load_adapter adds the LoRA layers its metadata
    describes); merge=True folds BA into W0 (lora.merge_lora), so generation runs on plain weights."""
    from lora import load_adapter, merge_lora

    check_adapter_file(path)
    load_adapter(model, path)
    model.eval()
    if merge:
        merge_lora(model)
        return "adapter merged into W"
    return "adapter (unmerged)"


def check_adapter_file(path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"adapter file not found: {path} "
                                f"(train one with finetune.py or pass --adapter)")


# ---------------------------------------------------------------- sampling and greedy decoding

@torch.no_grad()
def complete(model, ids, *, num_samples=1, max_new_tokens=64, temperature=1.0, top_k=None,
             top_p=None, greedy=False, beams=1, length_penalty=1.0, no_repeat_ngram_size=0,
             early_stopping=False, generator=None, stream=None):
    """Continue the prompt `ids` (list of token ids). Returns (completions, n_generated):
    the new tokens of each sample, cut before <|endoftext|>, and how many tokens were produced
    (the <|endoftext|> that ends a sample counts; beam search counts the best beam only).

    beams > 1: beam search (one completion). Otherwise model.generate, which runs the prompt once
    and then one token per step against the KV cache; num_samples rows are sampled together.
    Under lora.use_adapters(model, [id]) every sample (or beam) is decoded with adapter id.
    """
    check_fits(model, len(ids), max_new_tokens)
    idx = torch.tensor([ids], dtype=torch.long, device=model.wte.weight.device)  # (1, T)
    if beams > 1:
        if num_samples != 1:
            raise ValueError("beam search returns one sequence: use --num-samples 1 with --beams")
        out = beam_search(model, idx, beams, max_new_tokens, length_penalty=length_penalty,
                          no_repeat_ngram_size=no_repeat_ngram_size, early_stopping=early_stopping)
        if stream is not None:
            for t in out[0, len(ids):]:
                stream(t[None])
    else:
        with repeat_adapter_ids(model, num_samples):  # the prompt's adapter for each sample
            out = model.generate(idx.expand(num_samples, -1), max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p,
                                 greedy=greedy, eos_token=EOT_TOKEN, generator=generator,
                                 stream=stream)  # (num_samples, T + n)
    completions, n_generated = [], 0
    for row in out[:, len(ids):].tolist():
        end = row.index(EOT_TOKEN) if EOT_TOKEN in row else len(row)
        completions.append(row[:end])
        n_generated += min(end + 1, len(row))
    return completions, n_generated


def check_fits(model, prompt_len, max_new_tokens):
    """Bad lengths as one clear ValueError, before any output is printed."""
    if prompt_len == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's block_size {model.config.block_size}")


class Streamer:
    """Prints the tokens of row 0 as they are generated, up to <|endoftext|>. Token bytes go
    through an incremental UTF-8 decoder: a character split across two tokens prints whole."""

    def __init__(self, enc, out=None):
        self.enc, self.out = enc, out or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ended = False

    def __call__(self, tokens):  # tokens (B,): the new column
        t = int(tokens[0])
        self.ended |= t == EOT_TOKEN
        if not self.ended:
            self.out.write(self.decoder.decode(self.enc.decode_single_token_bytes(t)))
            self.out.flush()

    def close(self):
        self.out.write(self.decoder.decode(b"", final=True) + "\n")


# ---------------------------------------------------------------- beam search

@torch.no_grad()
def beam_search(model, idx, beams, max_new_tokens, length_penalty=1.0, no_repeat_ngram_size=0,
                eos_token=EOT_TOKEN, early_stopping=False):
    """Beam search for one prompt idx (1, T) -> the best sequence (1, T + n), its <|endoftext|>
    included when it has one. The paper decodes E2E with 10 beams, length penalty 0.9 and no
    repeated 4-grams (LoRA Table 11).

    The semantics are transformers' generate(num_beams=beams, length_penalty=...,
    no_repeat_ngram_size=..., early_stopping=...) (tested for equality):
    - each step, every beam's log-probabilities are added to its score and the best 2*beams
      continuations are taken over all beams (so at least `beams` of them do not end);
    - a continuation among the best `beams` that emits eos_token (or any of them at the last step)
      becomes a hypothesis with score sum(log p) / n**length_penalty, n = tokens generated,
      eos included; the best `beams` hypotheses are kept;
    - the best `beams` continuations that do not end go on; the KV cache rows follow their beams
      (under lora.use_adapters, every beam keeps the prompt's adapter);
    - stop when `beams` hypotheses exist and (early_stopping, or the best running beam's score
      divided by its current length**length_penalty is no better than the worst hypothesis).
    no_repeat_ngram_size n > 0: a token that would repeat an n-gram of the sequence (prompt
    included) gets probability 0. With beams=1 and no n-gram ban this is greedy decoding.
    """
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ValueError("beam_search takes one prompt: idx of shape (1, T)")
    if beams < 1:
        raise ValueError(f"beams must be at least 1, got {beams}")
    T = idx.size(1)
    check_fits(model, T, max_new_tokens)
    cache = KVCache(model.config, 1, T + max_new_tokens, idx.device, model.wte.weight.dtype)
    logits = model(idx, cache=cache, last_only=True)[:, -1]  # (1, V): the prompt runs once
    # Every beam starts as the prompt: copy its cache rows; only beam 0 may extend at step 1,
    # or all beams would pick the same tokens.
    cache.reorder(torch.zeros(beams, dtype=torch.long, device=idx.device))
    logits = logits.expand(beams, -1)  # (beams, V)
    seqs = idx.expand(beams, T)  # (beams, T)
    scores = torch.full((beams,), float("-inf"), device=idx.device)
    scores[0] = 0.0
    hyps = []  # (score, tokens (T + n,)), best first
    for step in range(1, max_new_tokens + 1):
        logp = F.log_softmax(logits.float(), dim=-1)  # (beams, V)
        if no_repeat_ngram_size > 0:
            logp = ban_repeated_ngrams(seqs, logp, no_repeat_ngram_size)
        V = logp.size(-1)
        cand, flat = (scores[:, None] + logp).view(-1).topk(2 * beams)  # (2*beams,), best first
        src, tok = flat // V, flat % V  # which beam it extends, with which token
        last = step == max_new_tokens
        ends = torch.full_like(tok, last, dtype=torch.bool)  # at the last step, all end
        if eos_token is not None:
            ends |= tok == eos_token
        for r in range(beams):  # only the best `beams` continuations may become hypotheses
            if ends[r]:
                hyps.append((cand[r].item() / step ** length_penalty,
                             torch.cat([seqs[src[r]], tok[r:r + 1]])))
        hyps = sorted(hyps, key=lambda h: h[0], reverse=True)[:beams]
        if last:
            break
        keep = (~ends).nonzero().squeeze(1)[:beams]  # the best continuations that go on
        scores = cand[keep]
        seqs = torch.cat([seqs[src[keep]], tok[keep, None]], dim=1)  # (beams, T + step)
        cache.reorder(src[keep])
        if len(hyps) == beams and (early_stopping
                                   or scores[0].item() / step ** length_penalty <= hyps[-1][0]):
            break
        with repeat_adapter_ids(model, beams):  # one prompt's adapter id for all its beams
            logits = model(tok[keep, None], cache=cache, last_only=True)[:, -1]  # (beams, V)
    return hyps[0][1][None]


def ban_repeated_ngrams(seqs, logp, n):
    """log p = -inf for every token that would complete an n-gram already in the row's sequence
    (transformers' NoRepeatNGramLogitsProcessor)."""
    T = seqs.size(1)
    if T + 1 < n:
        return logp
    logp = logp.clone()
    for row, seq in enumerate(seqs.tolist()):
        prefix = seq[T - n + 1:]  # the last n - 1 tokens
        banned = [seq[i + n - 1] for i in range(T - n + 1) if seq[i:i + n - 1] == prefix]
        logp[row, banned] = float("-inf")
    return logp


# ---------------------------------------------------------------- E2E evaluation

def corpus_bleu(hyps, refs_list):
    """Corpus BLEU of outputs against all references of each (sacrebleu). MRs have 1 to 45
    references, so the reference streams are padded with None, which sacrebleu skips ('' would
    count as a reference of length 0 in the brevity penalty).

    Lowercased, 13a tokenization, closest reference length: as e2e-metrics (the paper's script)
    computes BLEU with mteval-v13a (case-insensitive by default). Differences left: sacrebleu
    smooths a zero n-gram count with 'exp' smoothing (mteval with a tiny constant), and the Perl
    script pads missing references with ''."""
    n = max(len(refs) for refs in refs_list)
    streams = [[refs[i] if i < len(refs) else None for refs in refs_list] for i in range(n)]
    from sacrebleu.metrics import BLEU

    metric = BLEU(lowercase=True, tokenize="13a")
    score = metric.corpus_score(hyps, streams)
    score.signature = str(metric.get_signature())  # nrefs:var|case:lc|eff:no|tok:13a|...
    return score


def rouge_l(hyps, refs_list, beta=1.2) -> float:
    """ROUGE-L in [0, 1] as e2e-metrics computes it (coco-caption's Rouge): per output, the longest
    common subsequence with each reference gives precision and recall; the best precision and
    the best recall over its references combine into F_beta with beta = 1.2; then the mean over
    outputs. Tokens come from rouge-score (lowercased words); coco-caption uses the PTB tokenizer."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    total = 0.0
    for hyp, refs in zip(hyps, refs_list):
        scores = [scorer.score(ref, hyp)["rougeL"] for ref in refs]  # score(target, prediction)
        p = max(s.precision for s in scores)
        r = max(s.recall for s in scores)
        if p > 0 and r > 0:
            total += (1 + beta ** 2) * p * r / (r + beta ** 2 * p)
    return total / len(hyps)


@torch.no_grad()
def evaluate_e2e(model, enc, *, split="test", raw_dir=None, limit=None, max_new_tokens=64,
                 beams=1, length_penalty=1.0, no_repeat_ngram_size=0, early_stopping=False,
                 batch_size=16) -> dict:
    """One output per distinct MR of the split (data/e2e/prepare.py: format_prompt, the same
    prompt as in fine-tuning), scored against all its references. Greedy decoding batches MRs
    whose prompts have the same number of tokens (no padding needed, so every row is exactly
    what it would be alone); beam search runs MR by MR. Under lora.use_adapters(model, [id])
    every MR is decoded with adapter id (the batches are this function's, not the caller's, so
    more ids are refused)."""
    from tqdm import tqdm

    from data.e2e.prepare import format_prompt, load_references

    items = load_references(split, raw_dir)[:limit]
    prompts = [enc.encode_ordinary(format_prompt(mr)) for mr, _ in items]
    for ids in prompts:
        check_fits(model, len(ids), max_new_tokens)
    outputs, n_tokens = [None] * len(items), 0
    device = model.wte.weight.device
    t0 = _now(device)
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
                    out = model.generate(idx, max_new_tokens, greedy=True, eos_token=EOT_TOKEN)
            for i, row in zip(group, out[:, idx.size(1):].tolist()):
                end = row.index(EOT_TOKEN) if EOT_TOKEN in row else len(row)
                outputs[i] = one_line(enc.decode(row[:end]))
                n_tokens += min(end + 1, len(row))
            bar.update(len(group))
    seconds = _now(device) - t0
    refs = [r for _, r in items]
    bleu = corpus_bleu(outputs, refs)
    return {
        "task": "e2e", "split": split, "mrs": len(items),
        "decoding": ({"beams": beams, "length_penalty": length_penalty,
                      "no_repeat_ngram_size": no_repeat_ngram_size,
                      "early_stopping": early_stopping} if beams > 1 else {"greedy": True})
        | {"max_new_tokens": max_new_tokens},
        "metrics": {"BLEU": round(bleu.score, 2), "ROUGE_L": round(100 * rouge_l(outputs, refs), 2)},
        "bleu": f"{bleu} ({bleu.signature})",
        "tokens_per_s": round(n_tokens / seconds, 1),
        "outputs": [{"mr": mr, "output": o, "references": r}
                    for (mr, r), o in zip(items, outputs)],
    }


def one_line(text: str) -> str:
    """An output as one line, whitespace runs as single spaces (E2E references are one line)."""
    return " ".join(text.split())


def write_eval(result: dict, path):
    """The JSON (outputs + scores), and beside it .hyp.txt (one output per line) and .ref.txt
    (each MR's references, groups separated by a blank line): the input files of e2e-metrics'
    measure_scores.py, so the paper's script can score the same outputs with all five metrics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outs = result["outputs"]
    hyp = "".join(o["output"] + "\n" for o in outs)
    ref = "\n".join("".join(r + "\n" for r in o["references"]) for o in outs)
    _atomic_write(path.with_suffix(".hyp.txt"), lambda p: Path(p).write_text(hyp))
    _atomic_write(path.with_suffix(".ref.txt"), lambda p: Path(p).write_text(ref))
    _atomic_write(path, lambda p: Path(p).write_text(json.dumps(result, indent=1) + "\n"))


def _now(device) -> float:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------- command line

def read_prompts(args, enc) -> list[str]:
    from data.e2e.prepare import format_prompt

    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path}: no prompts in it (one per line)")
    elif args.prompt is not None:
        prompts = [args.prompt]
    else:
        prompts = [format_prompt(args.mr if args.mr is not None else EXAMPLE_MR)]
    for p in prompts:
        if not p.strip() or not enc.encode_ordinary(p):
            raise ValueError("the prompt is empty: give some text")
    return prompts


def check_args(args):
    if args.no_adapter and (args.merge or args.compare):
        raise ValueError("--no-adapter runs the base model alone: drop --merge / --compare")
    if args.compare and args.eval:
        raise ValueError("--compare prints generations; evaluate base and adapter separately")
    if args.eval and (args.prompt is not None or args.prompt_file or args.mr):
        raise ValueError("--eval e2e makes its own prompts from the test set: drop the prompt")
    if args.beams > 1 and args.num_samples != 1:
        raise ValueError("beam search returns one sequence: use --num-samples 1 with --beams")
    for name in ("num_samples", "beams", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ValueError("--eval-limit must be at least 1")
    if args.temperature <= 0 and not args.greedy:
        raise ValueError("--temperature must be > 0 (use --greedy for argmax decoding)")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError("--top-k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError("--top-p must be in (0, 1]")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--init", default="gpt2",
                   help="base model: gpt2, gpt2-medium, ..., or a checkpoint dir/file (default gpt2)")
    g.add_argument("--adapter", default=DEFAULT_ADAPTER,
                   help=f"LoRA adapter file from finetune.py (default {DEFAULT_ADAPTER})")
    g.add_argument("--no-adapter", action="store_true", help="run the base model alone")
    g.add_argument("--merge", action="store_true",
                   help="fold the adapter into the weights (W0 + BA) before generating")
    g.add_argument("--compare", action="store_true",
                   help="print base and adapted outputs for the same prompts and seed, "
                        "one line each (newlines shown as \\n)")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, ...")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES))

    g = p.add_argument_group("prompts (default: an E2E meaning representation)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompt-file", help="a file with one prompt per line")
    src.add_argument("--mr", help="an E2E meaning representation, formatted as in fine-tuning")

    g = p.add_argument_group("sampling")
    g.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    g.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep mass p")
    g.add_argument("--greedy", action="store_true", help="argmax decoding")
    g.add_argument("--seed", type=int, default=1337, help="default 1337")
    g.add_argument("--no-stream", action="store_true",
                   help="print a single sample when done instead of token by token")

    g = p.add_argument_group("beam search (the paper on E2E: --beams 10 --length-penalty 0.9 "
                             "--no-repeat-ngram-size 4)")
    g.add_argument("--beams", type=int, default=1, help="beams; 1 = no beam search (default)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="hypothesis score = sum log p / length**this (default 1.0)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="never repeat an n-gram of this size (0: off)")
    g.add_argument("--early-stopping", action="store_true",
                   help="stop as soon as --beams hypotheses have ended")

    g = p.add_argument_group("evaluation (greedy, or beam search with --beams)")
    g.add_argument("--eval", choices=["e2e"], help="generate for every distinct MR and score")
    g.add_argument("--split", default="test", help="E2E split (default test)")
    g.add_argument("--eval-limit", type=int, default=None, help="only the first N MRs")
    g.add_argument("--raw-dir", default=None,
                   help="folder with the E2E CSVs (default: where data/e2e/prepare.py read them)")
    g.add_argument("--batch-size", type=int, default=16, help="MRs per greedy batch (default 16)")
    g.add_argument("--out", default=None, help="score file (default out/eval/e2e_SPLIT.json)")
    args = p.parse_args(argv)
    check_args(args)

    torch.manual_seed(args.seed)
    device = get_device(args.device)
    enc = get_tokenizer()
    adapter = None if args.no_adapter else args.adapter
    if adapter is not None:
        check_adapter_file(adapter)  # before the (slow) base model loads
    prompts = None if args.eval else read_prompts(args, enc)
    decoding = dict(max_new_tokens=args.max_new_tokens, beams=args.beams,
                    length_penalty=args.length_penalty,
                    no_repeat_ngram_size=args.no_repeat_ngram_size,
                    early_stopping=args.early_stopping)

    if args.eval:
        model, label = load_model(args.init, adapter, merge=args.merge, device=device,
                                  dtype=args.dtype)
        result = evaluate_e2e(model, enc, split=args.split, raw_dir=args.raw_dir,
                              limit=args.eval_limit, batch_size=args.batch_size, **decoding)
        result = {"init": args.init, "adapter": adapter, "mode": label} | result
        out = args.out or f"out/eval/e2e_{args.split}.json"
        write_eval(result, out)
        m = result["metrics"]
        print(f"E2E {args.split}, {result['mrs']} MRs, {label}: BLEU {m['BLEU']:.2f}, "
              f"ROUGE-L {m['ROUGE_L']:.2f} ({result['tokens_per_s']} tokens/s) -> {out}")
        return 0

    model = load_base(args.init, device, args.dtype).eval()
    for ids in (enc.encode_ordinary(pr) for pr in prompts):  # bad lengths before any output
        check_fits(model, len(ids), args.max_new_tokens)
    sampling = dict(num_samples=args.num_samples, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, greedy=args.greedy) | decoding

    def run(label, stream_ok):
        gen = torch.Generator(device=device).manual_seed(args.seed)  # same stream for each mode
        stream = stream_ok and args.num_samples == 1 and not args.no_stream
        results, n_tokens, seconds = [], 0, 0.0
        for text in prompts:
            streamer = None
            if stream:
                print(text, end="", flush=True)
                streamer = Streamer(enc)
            t0 = _now(device)
            comps, n = complete(model, enc.encode_ordinary(text), generator=gen,
                                stream=streamer, **sampling)
            seconds += _now(device) - t0
            n_tokens += n
            results.append([enc.decode(c) for c in comps])
            if streamer is not None:
                streamer.close()
        print(f"[{label}] {n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} "
              f"tokens/s ({device}, {args.dtype})", file=sys.stderr)
        return results

    if args.compare:
        base = run("base", stream_ok=False)
        label = attach_adapter(model, adapter, merge=args.merge)
        adapted = run(label, stream_ok=False)

        def shown(s):  # each output on one line, so that the pairs line up
            return s.replace("\n", "\\n")

        for text, b, a in zip(prompts, base, adapted):
            print(f"=== {shown(text)}")
            for k, (bs, as_) in enumerate(zip(b, a)):
                tag = f" #{k + 1}" if args.num_samples > 1 else ""
                print(f"[base{tag}]    {shown(bs)}\n[adapter{tag}] {shown(as_)}")
        return 0

    label = attach_adapter(model, adapter, merge=args.merge) if adapter is not None else "base"
    stream = args.num_samples == 1 and not args.no_stream
    results = run(label, stream_ok=True)
    if not stream:
        for text, comps in zip(prompts, results):
            for c in comps:
                print(text + c)
                print("-" * 40)
    return 0


if __name__ == "__main__":
    run_main(main)
