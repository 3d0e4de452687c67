"""Generate text with GPT-2, with a LoRA adapter, or with the adapter merged into the weights
(LoRA §4.1), or with the file of any other §5.1 method, and score generations on E2E
(--eval e2e, LoRA §5.5 and Table 3; see support/metrics.py).

    python sample.py --merge                  # base + adapter folded into W: the base model's speed
    python sample.py                          # the adapter runs unmerged, beside the frozen W0
    python sample.py --no-adapter             # the base model alone
    python sample.py --compare --greedy       # base and adapted outputs, same prompts and seed
    python sample.py --merge --eval e2e --beams 10 --length-penalty 0.9 --no-repeat-ngram-size 4

Why --merge matters (§4.1, "No Additional Inference Latency"): after training, W = W0 + (α/r) BA
is computed once and stored; generation then runs on plain weights, exactly as fast as the base
model. Unmerged, every adapted layer does two extra small matmuls per token.

The base model (--init) defaults to the one the adapter was trained on, which finetune.py records
in the adapter file (base_name), else gpt2. An adapter trained on a task records its prompt format
too (E2E: "MR ||", data/e2e/prepare.py's format_prompt): --prompt is put into it, so an MR typed
as it is gets the separator the adapter learned after, and decoding defaults to greedy, what
--eval uses (sampling when a sampling flag is given). Without that record (a plain-text run, the
base alone) prompts are used as typed and the default is sampling at temperature 1. How tokens
are chosen (sampling, greedy, beam search) is support/decoding.py's; the E2E evaluation is
support/metrics.py's.

--adapter takes the file of any method support/methods.py saves (FT^Top2, BitFit, PreEmbed,
PreLayer, Adapter^H, Adapter^L) as it takes a LoRA adapter: one loader, support.methods
(read_method for the recorded base and prompt format, load_method for the tensors). Only LoRA
merges (--merge): its update is a matrix added to W0; adapters add layers, prefixes add positions.

Reading order: load_model (load_base, attach_adapter) -> complete -> Streamer -> main.
"""

import argparse
import codecs
import sys
from pathlib import Path

import torch

from data.e2e.prepare import format_prompt
from data.files import read_text
from lora import merge_lora
from model import GPT
from support.adapters import in_prompt_format, repeat_adapter_ids
from support.common import (ADAPTER_FILE, DTYPES, EOT_TOKEN, FINETUNE_OUT, ArgumentParser,
                            HelpFormatter, check_flags, check_range, check_writable, get_device,
                            get_tokenizer, help_with_range, run_main)
from support.decoding import beam_search, check_fits, completions, generate
from support.methods import load_method, method_label, read_method
from support.metrics import evaluate_e2e, now, write_eval
from support.prefix import check_separator, special_positions

DEFAULT_ADAPTER = f"{FINETUNE_OUT}/{ADAPTER_FILE}"  # where finetune.py writes by default
DEFAULT_BASE = "gpt2"  # the base when the adapter records none, or without an adapter
# The prompt when none is given: an MR of the E2E test set, in E2E's prompt format.
EXAMPLE_MR = ("name[The Vaults], eatType[pub], food[French], priceRange[high], area[riverside], "
              "familyFriendly[yes], near[Raja Indian Cuisine]")
# The allowed values of every numeric flag (common.RANGES), shown in --help and checked by
# check_args before anything loads. --temperature only counts without --greedy (nan never).
_FLAG_RANGES = {"num_samples": ">= 1", "max_new_tokens": ">= 1", "temperature": "> 0",
                "top_k": ">= 1", "top_p": "(0, 1]", "beams": ">= 1", "length_penalty": "finite",
                "no_repeat_ngram_size": ">= 0", "eval_limit": ">= 1", "batch_size": ">= 1",
                "seed": "[0, 2**32)"}
MAX_ROWS = 64  # --beams, --num-samples: rows decoded at once, each with a KV cache and logits


# ---------------------------------------------------------------- the model: base (+ adapter)

def load_model(init, adapter=None, *, merge=False, device="cpu", dtype="float32"):
    """The base model (load_base), with the adapter file (LoRA's, or any method's) loaded if one
    is given, and merged into the weights if merge (LoRA only; attach_adapter). Returns (model
    in eval mode, label of the mode)."""
    model = load_base(init, device=device, dtype=dtype, adapter=adapter)
    label = "base"
    if adapter is not None:
        label = attach_adapter(model, adapter, merge=merge)
    return model, label


def load_base(init, *, device="cpu", dtype="float32", adapter=None):
    """GPT.from_pretrained(init) in eval mode; dtype is a name of common.DTYPES. When it cannot
    be loaded (OSError: not found, offline without a cache; ValueError: not a GPT-2 checkpoint),
    the error names the base the adapter file records, the --init that fits it."""
    try:
        return GPT.from_pretrained(init, device=device, dtype=DTYPES[dtype]).eval()
    except (OSError, ValueError) as e:
        base = recorded_base(adapter) if adapter is not None else None
        if base is None:
            raise
        hint = (f"{adapter} was trained on '{base}': pass --init {base}" if base != str(init)
                else f"the base recorded in {adapter}; pass --init with the model it was "
                     f"trained on, or --no-adapter")
        raise (OSError if isinstance(e, OSError) else ValueError)(f"{e} ({hint})") from None


def recorded_base(path):
    """The base model an adapter or method file was trained on, as save_adapter and save_method
    record it (metadata base_name: finetune.py's --init), or None when it records none. Reads
    and checks the file (methods.read_method): a corrupt file is a ValueError here, before the
    base loads."""
    return read_method(path)["base_name"]


def attach_adapter(model, path, *, merge=False) -> str:
    """Load the file of a LoRA adapter or of any other method into model (methods.load_method:
    a LoRA adapter gets the LoRA layers its metadata describes, another method its modules or
    hooks and tensors; either way the model must be the file's base). merge=True folds LoRA's
    (α/r) BA into W0 (lora.merge_lora), so generation runs on plain weights: no added latency
    (§4.1); for another method it is a ValueError, raised before the model is touched
    (check_merge). Returns the label of the mode: "adapter merged into W" or "adapter
    (unmerged)" for LoRA, the method's name and settings otherwise (methods.method_label,
    "PreLayer (l_p=8, l_i=8)"). A file for another base is a ValueError that says which --init
    it was trained on."""
    check_adapter_file(path)
    info = read_method(path)
    if merge:
        check_merge(info, path)
    try:
        load_method(model, path)
    except ValueError as e:
        base = info["base_name"]
        if base is None or base == getattr(model, "name", None):
            raise
        raise ValueError(f"{e} (pass --init {base})") from None
    model.eval()
    if info["method"] != "lora":
        return method_label(info["method"], info["settings"])
    if merge:
        merge_lora(model)
        return "adapter merged into W"
    return "adapter (unmerged)"


def check_merge(info, path):
    """--merge is for LoRA files only (info: methods.read_method's): one ValueError otherwise.
    LoRA's update BA has W0's shape and adds into it (§4.1); adapters add layers and prefixes
    add positions, which no merge removes, and FT^Top2's and BitFit's tensors are weights of
    the model itself, with nothing to fold."""
    if info["method"] != "lora":
        raise ValueError(f"{path}: --merge folds LoRA's BA into W0 (§4.1), and this file is "
                         f"{method_label(info['method'], info['settings'])}: drop --merge "
                         f"(only LoRA merges; adapters add layers, prefixes add positions)")


def check_adapter_file(path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"adapter file not found: {path} "
                                f"(train one with finetune.py or pass --adapter)")


# ---------------------------------------------------------------- sampling, greedy, beams

@torch.no_grad()
def complete(model, ids, *, num_samples=1, max_new_tokens=64, temperature=1.0, top_k=None,
             top_p=None, greedy=False, beams=1, length_penalty=1.0, no_repeat_ngram_size=0,
             early_stopping=False, generator=None, stream=None):
    """Continue the prompt `ids` (list of token ids). Returns (completions, n_generated):
    the new tokens of each sample, cut before <|endoftext|>, and how many tokens were produced
    (the <|endoftext|> that ends a sample counts; beam search counts the best beam only).

    beams > 1: decoding.beam_search (one completion; Table 11's decoding). Otherwise
    decoding.generate, which runs the prompt once and then one token per step against the KV
    cache; num_samples rows are sampled together. Under adapters.use_adapters(model, [id])
    every sample (or beam) is decoded with adapter id. ValueError: bad lengths (check_fits),
    num_samples < 1, num_samples > 1 with beams, and decoding's checks of the other settings.
    """
    check_fits(model, len(ids), max_new_tokens)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    idx = torch.tensor([ids], dtype=torch.long, device=model.wte.weight.device)  # (1, T)
    if beams > 1:
        if num_samples != 1:
            raise ValueError("beam search returns one sequence: use --num-samples 1 with --beams")
        out = beam_search(model, idx, beams, max_new_tokens, length_penalty=length_penalty,
                          no_repeat_ngram_size=no_repeat_ngram_size, early_stopping=early_stopping)
        if stream is not None:  # beam search knows its tokens only at the end
            for t in out[0, len(ids):]:
                stream(t[None])
    else:
        with repeat_adapter_ids(model, num_samples):  # the prompt's adapter for each sample
            out = generate(model, idx.expand(num_samples, -1), max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                           eos_token=EOT_TOKEN, generator=generator,
                           stream=stream)  # (num_samples, T + n)
    return completions(out, len(ids))


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


# ---------------------------------------------------------------- command line

def read_prompts(args, enc, prompt_format=None) -> list[str]:
    """--prompt or --prompt-file's lines, each put into the adapter's prompt_format (a task's, as
    finetune.py records it; None: as typed); without either, EXAMPLE_MR in E2E's format."""
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts = [line for line in read_text(path).splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path}: no prompts in it (one per line)")
    elif args.prompt is not None:
        prompts = [args.prompt]
    else:
        return [format_prompt(EXAMPLE_MR)]
    for p in prompts:
        if not p.strip() or not enc.encode_ordinary(p):
            raise ValueError("the prompt is empty: give some text")
    return [in_prompt_format(prompt_format, p) for p in prompts]


def decoding_mode(args, prompt_format) -> tuple[bool, str]:
    """(greedy, how it is said): greedy with --greedy, and by default for an adapter that records
    a task's prompt format (the evaluation's decoding); sampling at --temperature (default 1.0)
    otherwise, or when --temperature, --top-k, --top-p or --num-samples above 1 asks for it."""
    asked = args.temperature is not None or args.top_k is not None or args.top_p is not None \
        or args.num_samples > 1
    if args.greedy:
        return True, "greedy"
    if prompt_format is not None and not asked:
        return True, "greedy (the task adapter's default; --temperature T samples)"
    return False, f"sampling at temperature {temperature(args)}"


def temperature(args) -> float:
    return 1.0 if args.temperature is None else args.temperature  # None: not given


def empty_note(prompt_format, adapter) -> str:
    """The one line said when an output is empty: why, and what may help."""
    why = ("note: nothing was generated: the first token was <|endoftext|>, so the model takes "
           "the prompt for a finished text")
    if adapter is not None and prompt_format is None:
        return why + (f"; {adapter} records no prompt format: if it was trained on prompts of "
                      f"a form (E2E: 'MR ||'), type the prompt in that form")
    return why + ("; the prompt was put into the adapter's format: try an input like the task's"
                  if prompt_format is not None else "")


def check_args(args):
    """Contradicting or out-of-range options as one ValueError, before anything loads."""
    if args.no_adapter and (args.merge or args.compare):
        raise ValueError("--no-adapter runs the base model alone: drop --merge / --compare")
    if args.compare and args.eval:
        raise ValueError("--compare prints generations; evaluate base and adapter separately")
    if args.eval and (args.prompt is not None or args.prompt_file):
        raise ValueError("--eval e2e makes its own prompts from the test set: drop the prompt")
    check_range("--temperature", args.temperature, "finite")  # nan or inf, even with --greedy
    check_flags(args, _FLAG_RANGES, skip=("temperature",) if args.greedy else ())  # argmax
    for name in ("beams", "num_samples"):
        if getattr(args, name) > MAX_ROWS:
            raise ValueError(f"--{name.replace('_', '-')} must be at most {MAX_ROWS} (each "
                             f"row has its own KV cache and logits), got {getattr(args, name)}")
    if args.beams > 1 and args.num_samples != 1:
        raise ValueError("beam search returns one sequence: use --num-samples 1 with --beams")


def _ranged(text, name) -> str:
    """A flag's help with its allowed values, as check_args checks them."""
    most = f", at most {MAX_ROWS}" if name in ("beams", "num_samples") else ""
    return help_with_range(text, _FLAG_RANGES, name, most)


class _Help(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (common.HelpFormatter), and the epilog's example lines kept as written."""


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n")[1], formatter_class=_Help)
    g = p.add_argument_group("model")
    g.add_argument("--init", default=None,
                   help="base model: gpt2, gpt2-medium, ..., or a checkpoint dir/file (default: "
                        f"the base the adapter file records, else {DEFAULT_BASE})")
    g.add_argument("--adapter", default=DEFAULT_ADAPTER,
                   help="LoRA adapter file from finetune.py, or a file of any other method "
                        "(support.methods.save_method: FT^Top2, BitFit, PreEmbed, PreLayer, "
                        "Adapter^H, Adapter^L)")
    g.add_argument("--no-adapter", action="store_true", help="run the base model alone")
    g.add_argument("--merge", action="store_true",
                   help="fold the adapter into the weights (W0 + BA) before generating "
                        "(§4.1); LoRA files only")
    g.add_argument("--compare", action="store_true",
                   help="print base and adapted outputs for the same prompts and seed, "
                        "one line each (newlines shown as \\n)")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, ...")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="the dtype the model runs in")

    g = p.add_argument_group("prompts, put into the prompt format the adapter records, if any "
                             "(default: an E2E MR, 'MR ||')")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the text to continue; for an E2E adapter an MR, e.g. "
                                      "'name[The Eagle], food[French]'")
    src.add_argument("--prompt-file", help="a file with one prompt per line")

    g = p.add_argument_group("sampling (default: greedy for an adapter that records a task's "
                             "prompt format, as --eval; else sampling at temperature 1.0)")
    g.add_argument("--num-samples", type=int, default=1,
                   help=_ranged("samples per prompt", "num_samples"))
    g.add_argument("--max-new-tokens", type=int, default=64,
                   help=_ranged("tokens generated at most", "max_new_tokens"))
    g.add_argument("--temperature", type=float, default=None,
                   help=_ranged("divides the logits; unused with --greedy", "temperature"))
    g.add_argument("--top-k", type=int, default=None,
                   help=_ranged("keep the k most likely tokens", "top_k"))
    g.add_argument("--top-p", type=float, default=None,
                   help=_ranged("nucleus sampling: keep mass p", "top_p"))
    g.add_argument("--greedy", action="store_true", help="argmax decoding, also for a plain LM")
    g.add_argument("--seed", type=int, default=1337,
                   help=_ranged("the same seed, the same samples", "seed"))
    g.add_argument("--no-stream", action="store_true",
                   help="print a single sample when done instead of token by token")

    g = p.add_argument_group("beam search (the paper on E2E, Table 11: --beams 10 "
                             "--length-penalty 0.9 --no-repeat-ngram-size 4)")
    g.add_argument("--beams", type=int, default=1,
                   help=_ranged("beams; 1 = no beam search", "beams"))
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help=_ranged("hypothesis score = sum log p / length**this", "length_penalty"))
    g.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help=_ranged("never repeat an n-gram of this size; 0: off",
                                "no_repeat_ngram_size"))
    g.add_argument("--early-stopping", action="store_true",
                   help="stop as soon as --beams hypotheses have ended")

    g = p.add_argument_group("evaluation (greedy, or beam search with --beams; Table 3)")
    g.add_argument("--eval", choices=["e2e"], help="generate for every distinct MR and score")
    g.add_argument("--split", default="test", choices=("test", "val"), help="E2E split to score")
    g.add_argument("--eval-limit", type=int, default=None,
                   help=_ranged("only the first N MRs", "eval_limit"))
    g.add_argument("--raw-dir", default=None,
                   help="folder with the E2E CSVs to read the references from (default: "
                        "data/e2e/prepared-*/SPLIT.refs.json, written by python -m data.e2e)")
    g.add_argument("--batch-size", type=int, default=16,
                   help=_ranged("MRs per greedy batch", "batch_size"))
    g.add_argument("--out", default=None, help="score file (default: out/eval/e2e_SPLIT.json)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    check_args(args)

    torch.manual_seed(args.seed)
    device = get_device(args.device)
    enc = get_tokenizer()
    adapter = None if args.no_adapter else args.adapter
    info, method = {}, None  # the file's metadata; its method and settings, as one dict
    if adapter is not None:
        check_adapter_file(adapter)  # the file, its method and --merge: before the base loads
        info = read_method(adapter)
        method = {"method": info["method"], **info["settings"]}
        if args.merge:
            check_merge(info, adapter)
    init = args.init or info.get("base_name") or DEFAULT_BASE
    prompt_format = info.get("prompt_format")
    prompts = None if args.eval else read_prompts(args, enc, prompt_format)
    decoding = dict(max_new_tokens=args.max_new_tokens, beams=args.beams,
                    length_penalty=args.length_penalty,
                    no_repeat_ngram_size=args.no_repeat_ngram_size,
                    early_stopping=args.early_stopping)

    if args.eval:
        out = args.out or f"out/eval/e2e_{args.split}.json"
        check_writable(out, "--out")  # now, not after the whole evaluation
        model, label = load_model(init, adapter, merge=args.merge, device=device,
                                  dtype=args.dtype)
        result = evaluate_e2e(model, enc, split=args.split, raw_dir=args.raw_dir,
                              limit=args.eval_limit, batch_size=args.batch_size, **decoding)
        named = method_label(info["method"], info["settings"]) if info else None
        result = {"init": init, "adapter": adapter, "method": named, "mode": label} | result
        write_eval(result, out)
        m = result["metrics"]
        print(f"E2E {args.split}, {result['mrs']} MRs, {label}: BLEU {m['BLEU']:.2f}, "
              f"ROUGE-L {m['ROUGE_L']:.2f} ({result['tokens_per_s']} tokens/s) -> {out}")
        return 0

    # The base alone first: --compare generates with it before the adapter is attached.
    model = load_base(init, device=device, dtype=args.dtype, adapter=adapter)
    for ids in (enc.encode_ordinary(pr) for pr in prompts):  # bad prompts before any output
        check_fits(model, len(ids), args.max_new_tokens, special=special_positions(method))
        check_separator(method, ids)  # the token a prefix method's infix follows
    greedy, how = decoding_mode(args, prompt_format)
    how = f"beam search, {args.beams} beams" if args.beams > 1 else how
    sampling = dict(num_samples=args.num_samples, temperature=temperature(args),
                    top_k=args.top_k, top_p=args.top_p, greedy=greedy) | decoding

    def run(label, stream_ok):
        gen = torch.Generator(device=device).manual_seed(args.seed)  # same stream for each mode
        stream = stream_ok and args.num_samples == 1 and not args.no_stream
        results, n_tokens, seconds, empty = [], 0, 0.0, False
        for text in prompts:
            streamer = None
            if stream:
                print(text, end="", flush=True)
                streamer = Streamer(enc)
            t0 = now(device)
            comps, n = complete(model, enc.encode_ordinary(text), generator=gen,
                                stream=streamer, **sampling)
            seconds += now(device) - t0
            n_tokens += n
            empty |= any(len(c) == 0 for c in comps)
            results.append([enc.decode(c) for c in comps])
            if streamer is not None:
                streamer.close()
        print(f"[{label}] {how}: {n_tokens} token{'s' * (n_tokens != 1)} in {seconds:.2f} s: "
              f"{n_tokens / seconds:.1f} tokens/s ({init}, {device}, {args.dtype})",
              file=sys.stderr)
        if empty:
            print(empty_note(prompt_format, adapter if label != "base" else None),
                  file=sys.stderr)
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
