"""LoRA against full fine-tuning of the same base, side by side: the last step of the quick start.

    python -m experiments.compare   # reads out/finetune, out/full, out/eval/{lora,full}.json

Prints and writes (OUT/report.md, OUT/loss.png, one set):
  - the validation loss of the base, of LoRA and of full fine-tuning, and the share of full
    fine-tuning's drop that LoRA recovers: (base - LoRA) / (base - full), 1 = as good;
  - the E2E test scores of both (sample.py --eval e2e), and LoRA's BLEU as a fraction of full
    fine-tuning's (the paper's Table 3 compares them on GPT-2 M);
  - both runs' validation loss on one plot, against step and against training time (a LoRA step
    is cheaper: no gradient for W0, §4.2), so "the same budget" can be read either way;
  - where the gap is: the validation loss of the three models by kind of target token (the
    first token, tokens of the example's slot values, which a description can copy from its
    MR, the other description tokens, the closing <|endoftext|>): the format, using the MR,
    the register;
  - a few test MRs with the base's, LoRA's and full fine-tuning's outputs side by side (the
    base is decoded here, greedily, as sample.py decodes the other two).

The base is the one the LoRA evaluation records (its "init"); both runs must have been
validated on the same data, so that their step-0 losses (the base's) agree.
"""

import json
from pathlib import Path

import torch

from data.datasets import load_data
from support.common import (EOT_TOKEN, FINETUNE_OUT, ArgumentParser, HelpFormatter,
                            atomic_write_set, check_manifest, check_writable, get_tokenizer,
                            run_main)
from support.metrics import KINDS, loss_by_kind


def read_history(run_dir) -> list[dict]:
    """log.jsonl of a train.py or finetune.py run -> its entries (step, train_s, val_loss, ...)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a train.py/finetune.py --out?")
    try:
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        [(h["step"], h["val_loss"]) for h in history]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a log.jsonl of train.py or finetune.py ({e!r})") from None
    if not any(h.get("val_loss") is not None for h in history[1:]):
        raise ValueError(f"{path}: no validation loss after step 0 (the run did not finish)")
    return history


def val_curve(history) -> list[tuple[int, float, float]]:
    """[(step, training seconds, validation loss)] of a run's validated steps."""
    return [(h["step"], h.get("train_s") or 0.0, h["val_loss"]) for h in history
            if h.get("val_loss") is not None]


def share_of_drop(base: float, lora: float, full: float):
    """The fraction of full fine-tuning's drop in loss that LoRA recovers (1: all of it; can be
    negative or above 1); None where full fine-tuning did not lower the loss."""
    return (base - lora) / (base - full) if base > full else None


def plot_runs(curves: dict, path):
    """Validation loss of each run {label: [(step, seconds, loss)]}, against step (left) and
    against training seconds (right), as one PNG."""
    from matplotlib.figure import Figure

    from support.common import save_figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for label, pts in curves.items():
        by_step.plot([p[0] for p in pts], [p[2] for p in pts], "o-", ms=3, label=label)
        by_time.plot([p[1] / 60 for p in pts], [p[2] for p in pts], "o-", ms=3, label=label)
    by_step.set(xlabel="optimizer step", ylabel="E2E validation loss (nats / target token)",
                title="the same steps")
    by_time.set(xlabel="training time (minutes, validation left out)", title="the same time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, dpi=100)


def report(runs: dict, evals: dict, base_outputs: dict, share, kinds: dict) -> str:
    """The markdown page: losses, scores, the loss by kind of token, the outputs side by side."""
    lines = ["# LoRA against full fine-tuning", "",
             "| | validation loss (final) | best | training time | test BLEU | ROUGE-L |",
             "| --- | --- | --- | --- | --- | --- |"]
    base_loss = next(iter(runs.values()))[0][2]
    lines.append(f"| base (untuned) | {base_loss:.4f} | | | | |")
    for label, pts in runs.items():
        m = evals[label]["metrics"]
        lines.append(f"| {label} | {pts[-1][2]:.4f} | {min(p[2] for p in pts):.4f} | "
                     f"{pts[-1][1] / 60:.1f} min | {m['BLEU']:.2f} | {m['ROUGE_L']:.2f} |")
    (lora, le), (full, fe) = ((k, evals[k]["metrics"]["BLEU"]) for k in runs)
    recovers = ("full fine-tuning did not lower the validation loss" if share is None else
                f"LoRA recovers {share:.0%} of full fine-tuning's drop in validation loss, "
                f"(base - LoRA) / (base - full)")
    lines += ["", f"{recovers}; LoRA's test BLEU is "
              f"{f'{le / fe:.2f}' if fe else 'undefined'} x full fine-tuning's.", "",
              "## Where the gap is: validation loss by kind of target token", "",
              "| target tokens | share of the tokens | base | LoRA | full fine-tuning | "
              "LoRA's share of the drop |", "| --- | --- | --- | --- | --- | --- |"]
    total = sum(c for _, c in kinds["base"])
    for i, name in enumerate(KINDS):
        (b, n), (lo, _), (fu, _) = (kinds[k][i] for k in ("base", "LoRA", "full fine-tuning"))
        sh = share_of_drop(b, lo, fu)
        lines.append(f"| {name.replace('|', chr(92) + '|')} | {n / total:.0%} | {b:.3f} | "
                     f"{lo:.3f} | {fu:.3f} | {'-' if sh is None else f'{sh:.2f}'} |")
    lines += ["", "## Test MRs, greedy outputs side by side", ""]
    for i, base_out in base_outputs.items():
        lines += [f"**{evals['LoRA']['outputs'][i]['mr']}**", "", f"- base: {base_out}"]
        lines += [f"- {label}: {evals[label]['outputs'][i]['output'] or '(nothing)'}"
                  for label in runs]
        lines += [f"- a reference: {evals['LoRA']['outputs'][i]['references'][0]}", ""]
    return "\n".join(lines)


@torch.no_grad()
def greedy_outputs(model, mrs: list, max_new_tokens=64) -> list:
    """The base's greedy output for each MR, prompted as in fine-tuning (format_prompt) and
    decoded as sample.py --eval decodes the tuned models."""
    from data.e2e.prepare import format_prompt
    from support.decoding import completions, generate
    from support.metrics import one_line

    enc, outs = get_tokenizer(), []
    for mr in mrs:
        idx = torch.tensor([enc.encode_ordinary(format_prompt(mr))])
        out = generate(model, idx, max_new_tokens, greedy=True, eos_token=EOT_TOKEN)
        outs.append(one_line(enc.decode(completions(out, idx.size(1))[0][0])) or "(nothing)")
    return outs


def parser():
    p = ArgumentParser(
        prog="python -m experiments.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--lora", default=FINETUNE_OUT, help="finetune.py's --out")
    p.add_argument("--full", default="out/full", help="train.py --init's --out")
    p.add_argument("--lora-eval", default="out/eval/lora.json",
                   help="sample.py --eval e2e --out of the LoRA model")
    p.add_argument("--full-eval", default="out/eval/full.json",
                   help="sample.py --eval e2e --out of the fully fine-tuned model")
    p.add_argument("--data", default="e2e", help="the runs' --data: its validation split is read")
    p.add_argument("--examples", type=int, default=6,
                   help="test MRs shown side by side, spread over the evaluated ones (>= 1)")
    p.add_argument("--out", default="out/compare", help="folder for report.md and loss.png")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.examples < 1:
        raise ValueError(f"--examples must be >= 1, got {args.examples}")
    runs = {"LoRA": val_curve(read_history(args.lora)),
            "full fine-tuning": val_curve(read_history(args.full))}
    evals = {}
    for label, path in (("LoRA", args.lora_eval), ("full fine-tuning", args.full_eval)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} not found: run sample.py --eval e2e --out {path}")
        path = Path(path)  # with its .hyp.txt and .ref.txt: one set (metrics.write_eval)
        check_manifest(path.parent, [path.name] + [path.with_suffix(s).name
                                                   for s in (".hyp.txt", ".ref.txt")])
        try:
            evals[label] = json.loads(Path(path).read_text())
            evals[label]["outputs"][0]["output"], evals[label]["init"], evals[label]["adapter"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{path}: not a result of sample.py --eval e2e ({e!r})") from None
    if not evals["LoRA"]["adapter"]:
        raise ValueError(f"{args.lora_eval}: evaluated without an adapter; run sample.py with "
                         f"--adapter (or its default) for LoRA")
    (b1, b2) = (pts[0][2] for pts in runs.values())
    if runs["LoRA"][0][0] != 0 or runs["full fine-tuning"][0][0] != 0 or abs(b1 - b2) > 1e-3:
        raise ValueError(f"the two runs' step-0 validation losses differ ({b1:.4f}, {b2:.4f}): "
                         f"they were not validated on the same data from the same base")
    mrs = [[o["mr"] for o in e["outputs"]] for e in evals.values()]
    if mrs[0] != mrs[1]:
        raise ValueError("the two evaluations are of different MRs: run both with the same "
                         "--split and --eval-limit")
    n = len(mrs[0])
    shown = sorted({i * n // args.examples for i in range(min(args.examples, n))})  # spread
    out = Path(args.out)
    check_writable(out, "--out", directory=True)

    from lora import merge_lora
    from model import GPT
    from support.adapters import load_adapter
    base = evals["LoRA"]["init"]
    models = {"base": GPT.from_pretrained(base),
              "LoRA": merge_lora(load_adapter(GPT.from_pretrained(base), evals["LoRA"]["adapter"])),
              "full fine-tuning": GPT.from_pretrained(evals["full fine-tuning"]["init"])}
    _, val = load_data(args.data, models["base"].config.block_size)
    print(f"validation loss by kind of token, {len(val)} examples of {args.data}")
    kinds = loss_by_kind(models, val)
    print(f"decoding {len(shown)} test MRs with the base, {base}")
    base_outputs = dict(zip(shown, greedy_outputs(models["base"], [mrs[0][i] for i in shown])))
    share = share_of_drop(b1, runs["LoRA"][-1][2], runs["full fine-tuning"][-1][2])
    text = report(runs, evals, base_outputs, share, kinds)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_set({out / "report.md": lambda p: Path(p).write_text(text + "\n",
                                                                        encoding="utf-8"),
                      out / "loss.png": lambda p: plot_runs(runs, p)})
    print("\n## ".join(text.split("\n## ")[:2]).split("\n", 2)[2])
    print(f"-> {out / 'report.md'}, {out / 'loss.png'}")
    return 0


if __name__ == "__main__":
    run_main(main)
