"""LoRA against every adaptation method of §5.1, on one base, one task, one training loop:
Table 3 and Figure 2 of Hu et al. (2021) in miniature.

    python -m experiments.methods grid    # each row's learning rate, chosen on validation loss
                                          # (four rates, more beyond an end where it is lowest)
    python -m experiments.methods table   # Table 3: every row at its learning rate, 2 seeds
    python -m experiments.methods sweep   # Figure 2: validation loss against |Θ|
    python -m experiments.methods         # all three, in that order

The base is the quick start's (train.py's 4 × 128 model in out/train), the task E2E (meaning
representation -> restaurant description, the loss on the description only, eq. 2). Every run
goes through train.train, the loop finetune.py and train.py use, with the same steps, batches
and schedule; only the method, its size, its learning rate and the seed change.

The methods (support/methods.py, support/baselines.py, support/prefix.py, lora.py):
FT (every weight), FT^Top2 (the last two blocks), BitFit (every bias), PreEmbed and PreLayer
(l_p + l_i special tokens: their embeddings, or their activations at every layer), Adapter^H and
Adapter^L (bottleneck adapters) and LoRA (r = 4 on W_q, W_v).

Context. A special token takes a position of the model's context (§3), so every run of a stage
trains on examples cut to what the stage's largest prefix leaves (block_size - l_p - l_i), and
decodes at most as many tokens: the methods see the same data and the same decoding budget.

Files (--out, default results/methods): runs/*.json, one per finished run (a rerun skips them:
Ctrl-C loses at most the run in progress); grid.json/.md; table.json/.md (Table 3, with the
inference cost at batch 1 on GPT-2 124M shapes, the training cost on the base, and what explains
the scores: the validation loss by kind of token, and the test outputs' variety, whether they
name the MR's place, their length and BLEU's brevity penalty); sweep.json, .md and .png
(Figure 2). Each stage's files are written together, at its end. --save-dir (out/methods): each
table run's trained tensors, for `sample.py --adapter FILE --eval e2e`. Reading: docs/comparison.md.
"""

import argparse
import hashlib
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.datasets import load_data
from lora import apply_lora, count_trainable, merge_lora, paper_num_params
from model import GPT, PRETRAINED, GPTConfig
from support.adapters import save_adapter
from support.common import (ArgumentParser, HelpFormatter, atomic_write, atomic_write_set,
                            check_flags, get_tokenizer, help_with_range, run_main, save_figure)
from support.methods import PAPER_NAMES, apply_method, paper_params, save_method
from support.metrics import KINDS, corpus_bleu, evaluate_e2e, loss_by_kind
from support.prefix import special_positions
from train import TrainConfig, amp_setup, make_optimizer, train, train_step



@dataclass(frozen=True)
class Row:
    """One method at one size: method (a key of PAPER_NAMES) and its settings (apply_method's, or
    apply_lora's for "lora": its defaults α = 32, dropout 0.1, W_q and W_v, Table 11)."""
    method: str
    settings: dict = field(default_factory=dict)

    def __hash__(self):
        return hash((self.method, json.dumps(self.settings, sort_keys=True)))

    @property
    def name(self) -> str:
        text = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return PAPER_NAMES[self.method] + (f" ({text})" if text else "")

    @property
    def positions(self) -> int:
        """Positions of the context the method takes (§3): its special tokens."""
        return special_positions({"method": self.method, **self.settings})


def prefix(n: int) -> dict:
    """n special tokens, half before the prompt (l_p) and half after it (l_i), as Li & Liang
    place them for table-to-text ("prefix" and "infix")."""
    return {"l_p": n // 2, "l_i": n - n // 2}


# Table 3 in miniature: every method near LoRA's |Θ| on the 4 × 128 base (2 × 8 × 128 × 4 =
# 8,192), FT and FT^Top2, and a second, larger Adapter^L as the paper's table has. PreEmbed
# cannot reach 8,192 (64 tokens of a 128-token context): it gets PreLayer's 16 tokens.
TABLE = (Row("ft"), Row("ft_top2"), Row("bitfit"), Row("pre_embed", prefix(16)),
         Row("pre_layer", prefix(16)), Row("adapter_h", {"bottleneck": 4}),
         Row("adapter_l", {"bottleneck": 6}), Row("adapter_l", {"bottleneck": 64}),
         Row("lora", {"rank": 4}))
# The learning-rate grid: four rates of RATES for every row (the paper tunes each method's), from
# 3e-4 for the methods that train whole weight matrices, from 3e-3 for the rest. Where the lowest
# loss is at an end of the grid, the grid goes on that way, a rate at a time (EXTEND at most),
# until it is not: every row's rate is then a measured optimum, not a bound of the grid.
RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
GRID = {"ft": (3e-4, 1e-3, 3e-3, 1e-2), "ft_top2": (3e-4, 1e-3, 3e-3, 1e-2)}
PEFT_GRID = (3e-3, 1e-2, 3e-2, 1e-1)
EXTEND = 3
# Figure 2 in miniature: each family over sizes, at the learning rate its Table 3 row chose.
SWEEP = {"lora": [{"rank": r} for r in (1, 2, 4, 8, 16, 32, 64)],
         "pre_embed": [prefix(n) for n in (4, 8, 16, 32, 40)],
         "pre_layer": [prefix(n) for n in (4, 8, 16, 32, 40)],
         "adapter_h": [{"bottleneck": m} for m in (1, 4, 16, 64)]}
SEEDS = (0, 1)  # Table 3: every row twice; a difference within the seeds' range is a tie
_FLAG_RANGES = {"steps": ">= 1", "eval_limit": ">= 1", "rounds": ">= 1"}


@dataclass
class Plan:
    """What every run of an invocation shares."""
    init: str
    data: str
    out: Path
    steps: int = 300
    warmup: int = 30
    batch_size: int = 8
    eval_limit: int = 630  # test MRs decoded for BLEU and ROUGE-L (all 630)
    rounds: int = 10  # timing rounds of the cost measurements
    quick: bool = False
    raw_dir: str = None
    base_id: str = ""
    save_dir: str = "out/methods"  # each Table 3 run's trained tensors (not FT's: 29 MB)

    def lrs(self, row: Row) -> tuple:
        grid = GRID.get(row.method, PEFT_GRID)
        return grid[:2] if self.quick else grid


# ---------------------------------------------------------------- one run


def build(init, row: Row, seed: int, device="cpu") -> GPT:
    """The base from init with row's method applied (only its tensors trainable); seed fixes the
    method's random initialization (LoRA's A, the adapters' down projections)."""
    model = GPT.from_pretrained(init, device=device)
    torch.manual_seed(seed)
    return apply_row(model, row)


def apply_row(model: GPT, row: Row) -> GPT:
    """row's method on model: LoRA by lora.apply_lora, FT by nothing (every weight trains), the
    rest by support.methods.apply_method."""
    if row.method == "lora":
        apply_lora(model, **row.settings)
    elif row.method != "ft":
        apply_method(model, row.method, **row.settings)
    return model


def params_formula(row: Row, config: GPTConfig) -> int:
    """|Θ| by the paper's formula (§5.1); FT: every weight of the model."""
    if row.method == "ft":
        with torch.device("meta"):
            return sum(p.numel() for p in GPT(config).parameters())
    if row.method == "lora":
        return paper_num_params(config, row.settings["rank"])
    return paper_params(row.method, config, **row.settings)



def spec_of(plan: Plan, row: Row, lr: float, seed: int, block: int, max_new=None) -> dict:
    """Everything that defines a run, and so its record's name: a run whose spec is already
    in runs/ is kept, not run again."""
    return dict(method=row.method, settings=row.settings, lr=lr, seed=seed, steps=plan.steps,
                warmup=plan.warmup, batch_size=plan.batch_size, block_size=block,
                base=plan.base_id, data=str(plan.data),
                eval=None if max_new is None else dict(split="test", mrs=plan.eval_limit,
                                                       max_new_tokens=max_new, greedy=True))


def record_path(plan: Plan, spec: dict) -> Path:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return plan.out / "runs" / f"{spec['method']}-{digest}.json"


def run_one(plan: Plan, row: Row, spec: dict, data) -> dict:
    """Train row at spec's learning rate and seed through train.train, then (if spec["eval"])
    decode the E2E test MRs greedily -> the run's record: |Θ| counted and by formula, the
    validation loss before and after, the training curve, BLEU and ROUGE-L."""
    model = build(plan.init, row, spec["seed"])
    cfg = TrainConfig(lr=spec["lr"], max_iters=spec["steps"], warmup=spec["warmup"],
                      batch_size=spec["batch_size"], eval_interval=spec["steps"],
                      eval_batches=2 if plan.quick else 0, seed=spec["seed"],
                      log_interval=min(10, spec["steps"]), amp="off")
    history = train(model, *data, cfg)
    rec = dict(spec=spec, name=row.name, params=count_trainable(model),
               params_formula=params_formula(row, model.config),
               base_val_loss=history[0]["val_loss"], val_loss=history[-1]["val_loss"],
               train_s=round(history[-1]["train_s"], 1),
               curve=[[h["step"], h["train_loss"]] for h in history[1:]])
    if spec["eval"] and row.method != "ft":  # FT's model is train.py's; the rest are small
        rec["file"] = str(save_trained(plan, row, model, record_path(plan, spec).stem))
    if spec["eval"]:  # where the loss went: form, copying from the MR, other words
        rec["loss_by_kind"] = [v for v, _ in loss_by_kind({"run": model}, data[1])["run"]]
        e = spec["eval"]
        result = evaluate_e2e(model.eval(), get_tokenizer(), split=e["split"],
                              raw_dir=plan.raw_dir, limit=e["mrs"],
                              max_new_tokens=e["max_new_tokens"])
        outs = result["outputs"]
        bleu = corpus_bleu([o["output"] for o in outs], [o["references"] for o in outs])
        rec.update(bleu_bp=bleu.bp, output_words=bleu.sys_len / len(outs),
                   closest_reference_words=bleu.ref_len / len(outs))  # BLEU's brevity penalty
        rec.update(bleu=result["metrics"]["BLEU"], rouge_l=result["metrics"]["ROUGE_L"],
                   distinct_outputs=len({o["output"] for o in outs}),
                   names_place=statistics.fmean(names_place(o["mr"], o["output"]) for o in outs),
                   outputs=[o["output"] for o in outs[:5]])
    return rec


def names_place(mr: str, output: str) -> bool:
    """Whether output names the restaurant of its meaning representation (its name[...] slot):
    the plainest sign that a method reads the MR instead of reciting a memorized description."""
    found = re.search(r"name\[([^\]]*)\]", mr)
    return bool(found) and found.group(1) in output


def save_trained(plan: Plan, row: Row, model, stem: str) -> Path:
    """The run's trained tensors -> plan.save_dir/stem.safetensors, the file finetune.py
    (LoRA) or save_method (the rest) writes, with the E2E prompt format: `python sample.py
    --adapter FILE --init BASE --eval e2e` decodes with it as the run did."""
    from data.e2e.prepare import format_prompt

    form = format_prompt("{prompt}")
    path = Path(plan.save_dir) / f"{stem}.safetensors"
    if row.method == "lora":
        return save_adapter(model, path, base_name=str(plan.init), prompt_format=form)
    return save_method(model, path, base_name=str(plan.init), prompt_format=form)


def run_all(plan: Plan, runs: list) -> list:
    """runs: [(row, spec)] -> their records, in order: each one kept from runs/ when its spec
    was run before, else run (run_one) and written there at once; a line per run."""
    records, datasets, t0, done = [], {}, time.perf_counter(), 0
    for i, (row, spec) in enumerate(runs, 1):
        path = record_path(plan, spec)
        head = f"[{i}/{len(runs)}] {row.name}, lr {spec['lr']:g}, seed {spec['seed']}"
        if path.exists():
            rec = json.loads(path.read_text())
            if rec.get("spec") == spec:
                records.append(rec)
                print(f"{head}: kept from {path}: val {rec['val_loss']:.4f}")
                continue
        block = spec["block_size"]
        if block not in datasets:
            vocab = GPT.from_pretrained(plan.init).config.vocab_size
            datasets[block] = load_data(plan.data, block, vocab)
        rec = run_one(plan, row, spec, datasets[block])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: Path(p).write_text(json.dumps(rec, indent=1) + "\n"))
        records.append(rec)
        done += 1
        left = (time.perf_counter() - t0) / done * sum(
            not record_path(plan, s).exists() for _, s in runs[i:])
        scores = f", BLEU {rec['bleu']:.2f}, ROUGE-L {rec['rouge_l']:.2f}" if "bleu" in rec else ""
        print(f"{head}: val {rec['val_loss']:.4f}{scores} ({rec['train_s']:.0f} s training; "
              f"about {left / 60:.0f} min left)", flush=True)
    return records


# ---------------------------------------------------------------- the three stages


def context(plan: Plan) -> int:
    """The base's context, block_size (128 for train.py's base)."""
    return GPT.from_pretrained(plan.init).config.block_size


def run_grid(plan: Plan) -> dict:
    """Each Table 3 row at every learning rate of its grid, seed 0, then, for a row whose lowest
    validation loss is at an end of its grid, the next rate of RATES beyond it, until it is not
    (at most EXTEND more; none with --quick) -> grid.json: each row's losses and the chosen
    learning rate (the lowest loss), at_edge where it is still an end."""
    block = context(plan) - max(r.positions for r in TABLE)
    losses = {row: {} for row in TABLE}

    def run(pairs):
        for (row, lr), rec in zip(pairs, run_all(plan, [(row, spec_of(plan, row, lr, 0, block))
                                                        for row, lr in pairs])):
            losses[row][lr] = rec["val_loss"]

    run([(row, lr) for row in TABLE for lr in plan.lrs(row)])
    for _ in range(0 if plan.quick else EXTEND):
        more = [(row, lr) for row in TABLE if (lr := beyond(losses[row])) is not None]
        if not more:
            break
        print("the lowest loss at an end of the grid: " + ", ".join(
            f"{row.name} at {lr:g}" for row, lr in more))
        run(more)
    rows = []
    for row in TABLE:
        loss = dict(sorted(losses[row].items()))
        best = min(loss, key=loss.get)
        rows.append(dict(method=row.method, settings=row.settings, name=row.name,
                         val_loss={f"{lr:g}": v for lr, v in loss.items()}, lr=best,
                         at_edge=best in (min(loss), max(loss))))
    grid = dict(about(plan, "grid"), block_size=block, rows=rows)
    lines = [f"# Learning-rate grid: {grid['command']}", "", _machine_line(grid), "",
             f"Validation loss after {plan.steps} steps, seed 0, at each learning rate; the "
             "chosen rate (bold) has the lowest. Every row starts with four rates; a row whose "
             "lowest loss was at an end of its grid went on beyond it.", "",
             "| method | validation loss (learning rate) | chosen |", "|---|---|---:|"]
    for r in rows:
        cells = ", ".join(("**{:.4f}** ({})" if float(lr) == r["lr"] else "{:.4f} ({})").format(
            v, lr) for lr, v in r["val_loss"].items())
        edge = " (an end)" if r["at_edge"] else ""
        lines.append(f"| {r['name']} | {cells} | {r['lr']:g}{edge} |")
    _write(plan.out, {"grid.json": json.dumps(grid, indent=1), "grid.md": "\n".join(lines)})
    print("\n".join(lines[6:]))
    return grid


def beyond(loss: dict):
    """{lr: validation loss} -> the next rate of RATES beyond its end where the lowest loss is
    there, else None (an interior optimum, or the end of RATES)."""
    best, rates = min(loss, key=loss.get), sorted(loss)
    i = RATES.index(best)
    if best == rates[-1] and i + 1 < len(RATES):
        return RATES[i + 1]
    if best == rates[0] and i > 0:
        return RATES[i - 1]
    return None


def chosen_lrs(plan: Plan) -> dict:
    """{Row: learning rate} from the grid stage's grid.json (it must have run on this base)."""
    path = plan.out / "grid.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python -m experiments.methods grid` "
                                f"with the same --out first (it chooses the learning rates)")
    grid = json.loads(path.read_text())
    if grid.get("base_id") != plan.base_id or grid.get("steps") != plan.steps:
        raise ValueError(f"{path} is from another base or run length: run the grid stage again")
    return {Row(r["method"], r["settings"]): r["lr"] for r in grid["rows"]}


def run_table(plan: Plan) -> dict:
    """Table 3 in miniature: each row at its chosen learning rate with every seed of SEEDS,
    validation loss, test BLEU and ROUGE-L, then the costs -> table.json and table.md."""
    lrs = chosen_lrs(plan)
    block = context(plan) - max(r.positions for r in TABLE)
    max_new = min(64, block - longest_prompt(plan))  # what the largest prefix leaves
    runs = [(row, spec_of(plan, row, lrs[row], seed, block, max_new))
            for row in TABLE for seed in SEEDS]
    records = run_all(plan, runs)
    print("training cost on the base, and inference cost at batch 1 on GPT-2 124M shapes")
    costs = training_costs(plan, block)
    infer = inference_costs(plan)
    rows = []
    for row in TABLE:
        recs = [r for r in records if Row(r["spec"]["method"], r["spec"]["settings"]) == row]
        rows.append(dict(method=PAPER_NAMES[row.method], name=row.name, settings=row.settings,
                         lr=lrs[row], params=recs[0]["params"],
                         params_formula=recs[0]["params_formula"], positions=row.positions,
                         **{k: v for key in ("val_loss", "bleu", "rouge_l")
                            for k, v in mean_runs(key, [r[key] for r in recs]).items()},
                         seeds=list(SEEDS), **{k: statistics.fmean(r[k] for r in recs) for k in
                                               ("distinct_outputs", "names_place", "output_words",
                                                "closest_reference_words", "bleu_bp")},
                         loss_by_kind=[statistics.fmean(k) for k in zip(
                             *(r["loss_by_kind"] for r in recs))], **costs[row], **infer[row]))
    lora = next(r for r in rows if r["method"] == "LoRA")
    for r in rows:
        r["vs_lora"] = compare(r, lora) if r is not lora else "-"
    base = GPT.from_pretrained(plan.init)
    val = load_data(plan.data, block, base.config.vocab_size)[1]
    base_kinds = loss_by_kind({"base": base}, val)["base"]
    table = dict(about(plan, "table"), block_size=block, max_new_tokens=max_new,
                 mrs=plan.eval_limit, base_val_loss=records[0]["base_val_loss"], kinds=list(KINDS),
                 kind_tokens=[n for _, n in base_kinds],
                 base_loss_by_kind=[v for v, _ in base_kinds], rows=rows)
    _write(plan.out, {"table.json": json.dumps(table, indent=1),
                      "table.md": table_markdown(table)})
    print(table_markdown(table).split("\n\n", 2)[2])
    return table


def run_sweep(plan: Plan) -> dict:
    """Figure 2 in miniature: each family of SWEEP over its sizes at its Table 3 row's learning
    rate, seed 0 -> sweep.json, sweep.md and sweep.png (validation loss against |Θ|)."""
    lrs = {row.method: lr for row, lr in chosen_lrs(plan).items()}
    sweep = {m: s[:2] for m, s in SWEEP.items()} if plan.quick else SWEEP
    block = context(plan) - max(Row(m, s).positions for m in sweep for s in sweep[m])
    runs = [(Row(m, s), spec_of(plan, Row(m, s), lrs[m], 0, block))
            for m in sweep for s in sweep[m]]
    records = run_all(plan, runs)
    points = [dict(method=PAPER_NAMES[r["spec"]["method"]], settings=r["spec"]["settings"],
                   name=r["name"], lr=r["spec"]["lr"], params=r["params"],
                   params_formula=r["params_formula"], positions=Row(
                       r["spec"]["method"], r["spec"]["settings"]).positions,
                   val_loss=r["val_loss"]) for r in records]
    out = dict(about(plan, "sweep"), block_size=block, base_val_loss=records[0]["base_val_loss"],
               points=points)
    lines = [f"# Validation loss against |Θ|: {out['command']}", "", _machine_line(out), "",
             "| method | \\|Θ\\| | positions | lr | val loss |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {p['name']} | {p['params']:,} | {p['positions']} | {p['lr']:g} | "
              f"{p['val_loss']:.4f} |" for p in points]
    _write(plan.out, {"sweep.json": json.dumps(out, indent=1), "sweep.md": "\n".join(lines),
                      "sweep.png": lambda p: plot_sweep(out, p)})
    print("\n".join(lines[4:]))
    return out


# ---------------------------------------------------------------- costs


def training_costs(plan: Plan, block: int) -> dict:
    """{Row: train_step_ratio (+ its 95% interval), peak_memory_ratio} relative to LoRA, on the
    base and a batch of the task: the rows' optimizer steps (train.train_step) timed in
    alternation, round after round (support.timing), and each row's peak memory over a few
    steps in a fresh process."""
    from support.timing import paired_ratio, peak_training_memory, time_interleaved

    args = {row: (plan.init, row.method, row.settings, plan.data, block, plan.batch_size)
            for row in TABLE}
    steps = {row: training_step(*args[row]) for row in TABLE}
    times = time_interleaved(steps, plan.rounds, 2, lambda: None, "training steps")
    memory = {row: peak_training_memory(training_step, *args[row])["peak_bytes"]
              for row in TABLE}
    lora = next(r for r in TABLE if r.method == "lora")
    out = {}
    for row in TABLE:
        ratio, ci = paired_ratio(times[row], times[lora])
        out[row] = dict(train_step_ratio=ratio, train_step_ci95=ci,
                        train_step_ms=1e3 * statistics.median(times[row]),
                        peak_memory_ratio=memory[row] / memory[lora],
                        peak_memory_mib=memory[row] / 2 ** 20)
    return out


def training_step(init, method, settings, data, block, batch_size):
    """One optimizer step (train.train_step) of the row (method, settings) built on the base,
    on the first batch of the task, as a zero-argument function: what training_costs times, and
    what support.timing.peak_training_memory runs in a fresh process (so: plain arguments)."""
    model = build(init, Row(method, settings), 0).train()
    train_data, _ = load_data(data, block, model.config.vocab_size)
    batch = train_data.get_batch(batch_size, 0, 0)
    cfg = TrainConfig(lr=1e-3, amp="off")
    autocast, scaler = amp_setup("off", "cpu")
    opt = make_optimizer(model, cfg)
    return lambda: train_step(model, model, opt, scaler, [batch], cfg, autocast)


def inference_costs(plan: Plan) -> dict:
    """{Row: forward_ratio, decode_ratio (+ 95% intervals)} relative to the base at batch 1, on
    GPT-2 124M shapes with random weights (the 4 × 128 base's vocabulary projection would hide
    the blocks): a forward of 1 × 128 tokens and a decoded token with the KV cache after a
    64-token prompt (support.timing.inference_ratios, which bench.py uses too). LoRA is merged
    (W0 + BA, §4.1); FT, FT^Top2 and BitFit run the base's own graph."""
    from support.timing import inference_ratios, shared_copy

    shape = PRETRAINED["gpt2"] if not plan.quick else dict(
        n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=50257)
    torch.manual_seed(0)
    base = GPT(GPTConfig(**shape)).eval()
    models = {"base": base}
    for row in TABLE:
        model = apply_row(shared_copy(base), row)
        if row.method == "lora":  # random A and B (B = 0 would merge nothing), then merged
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.02)
            merge_lora(model)  # into the shared W0: every arm's weights are W0 + BA from now
        models[row] = model.eval()
    res = inference_ratios(models, "base", seq=128, prompt=64, tokens=32, rounds=plan.rounds)
    return {row: {k: res[row][k] for k in ("forward_ratio", "forward_ci95", "decode_ratio",
                                           "decode_ci95")} for row in TABLE}


# ---------------------------------------------------------------- reading the results


def mean_runs(key: str, values: list) -> dict:
    """{key: the mean, key_runs: each seed's value}."""
    return {key: statistics.fmean(values), f"{key}_runs": values}


def compare(row: dict, lora: dict) -> dict:
    """Row against LoRA on validation loss (lower is better) and BLEU (higher is better): "tie"
    where the two rows' ranges over the seeds overlap (a difference within the spread), else
    "better" or "worse"."""
    out = {}
    for key, sign in (("val_loss", -1), ("bleu", 1)):
        a, b = row[f"{key}_runs"], lora[f"{key}_runs"]
        if max(a) >= min(b) and max(b) >= min(a):
            out[key] = "tie"
        else:
            out[key] = "better" if sign * (row[key] - lora[key]) > 0 else "worse"
    return out


def longest_prompt(plan: Plan) -> int:
    """Tokens of the longest E2E test prompt decoded (data/e2e/prepare.format_prompt)."""
    from data.e2e.prepare import format_prompt, load_references

    enc = get_tokenizer()
    return max(len(enc.encode_ordinary(format_prompt(mr)))
               for mr, _ in load_references("test", plan.raw_dir)[:plan.eval_limit])


def table_markdown(t: dict) -> str:
    def pm(r, k, f):  # mean ± half the seeds' range
        v = r[f"{k}_runs"]
        return f"{r[k]:{f}} ± {(max(v) - min(v)) / 2:{f}}"

    def x(r, k):
        return "-" if r.get(k) is None else f"{r[k]:.2f}"

    lines = [f"# Table 3 in miniature: {t['command']}", "", _machine_line(t), "",
             f"Every row: {t['steps']} steps, batch {t['batch_size']}, warmup {t['warmup']}, "
             f"seeds {', '.join(map(str, SEEDS))} (mean ± half the range); validation before "
             f"training {t['base_val_loss']:.4f}; test BLEU and ROUGE-L greedy, up to "
             f"{t['max_new_tokens']} new tokens. \"tie\": the seeds' ranges overlap.", "",
             "| method | \\|Θ\\| (formula / counted) | positions | lr | val loss | BLEU | ROUGE-L "
             "| vs LoRA (val, BLEU) | train step × LoRA | peak memory × LoRA | forward × base "
             "| decode × base |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in t["rows"]:
        vs = r["vs_lora"] if isinstance(r["vs_lora"], str) else \
            f"{r['vs_lora']['val_loss']}, {r['vs_lora']['bleu']}"
        lines.append(f"| {r['name']} | {r['params_formula']:,} / {r['params']:,} | "
                     f"{r['positions']} | {r['lr']:g} | {pm(r, 'val_loss', '.4f')} | "
                     f"{pm(r, 'bleu', '.2f')} | {pm(r, 'rouge_l', '.2f')} | {vs} | "
                     f"{x(r, 'train_step_ratio')} | {x(r, 'peak_memory_ratio')} | "
                     f"{x(r, 'forward_ratio')} | {x(r, 'decode_ratio')} |")
    total = sum(t["kind_tokens"])
    lines += ["", "Where the validation loss is, by kind of target token "
              "(support.metrics.token_kinds), and what the test outputs do (mean of the seeds):",
              "", "| method | " + " | ".join(f"{k} ({n / total:.0%} of tokens)".replace(
                  "|", "\\|") for k, n in zip(t["kinds"], t["kind_tokens"]))
              + f" | distinct outputs (of {t['mrs']}) | outputs naming the MR's place | words "
              "per output (closest reference) | BLEU's brevity penalty |",
              "|---|" + "---:|" * (len(t["kinds"]) + 4),
              "| base, untrained | " + " | ".join(f"{v:.3f}" for v in t["base_loss_by_kind"])
              + " | - | - | - | - |"]
    lines += [f"| {r['name']} | " + " | ".join(f"{v:.3f}" for v in r["loss_by_kind"])
              + f" | {r['distinct_outputs']:.1f} | {r['names_place']:.1%} | "
              f"{r['output_words']:.1f} ({r['closest_reference_words']:.1f}) | "
              f"{r['bleu_bp']:.3f} |" for r in t["rows"]]
    return "\n".join(lines)


def plot_sweep(sweep: dict, path):
    """Validation loss against |Θ| (log scale), a line per method: Figure 2 in miniature."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(p["method"] for p in sweep["points"]):
        pts = sorted((p["params"], p["val_loss"]) for p in sweep["points"]
                     if p["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.axhline(sweep["base_val_loss"], color="grey", ls="--", lw=1, label="base, untrained")
    ax.set(xscale="log", xlabel="trainable parameters |Θ| (log scale)",
           ylabel="E2E validation loss", title="Validation loss against |Θ|")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------- provenance and files


def about(plan: Plan, stage: str) -> dict:
    """What a stage's files record of how they were made: command, machine, commit, settings."""
    return dict(command=f"python -m experiments.methods {stage}"
                        + (" --quick" if plan.quick else ""),
                machine=machine(), commit=commit(), torch=torch.__version__,
                base=str(plan.init), base_id=plan.base_id, data=str(plan.data),
                steps=plan.steps, warmup=plan.warmup, batch_size=plan.batch_size)


def machine() -> str:
    from support.timing import cpu_name

    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def commit() -> str:
    """The repository's commit, with "+changes" when its tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" +changes" if dirty else "")


def _machine_line(d: dict) -> str:
    return f"Machine: {d['machine']}; commit {d['commit']}; torch {d['torch']}; base {d['base']}."


def _write(folder: Path, files: dict):
    """{name: text or write(path)}: written as one set (support.common.atomic_write_set)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_set({folder / name: (w if callable(w) else (
        lambda p, t=w: Path(p).write_text(t + "\n", encoding="utf-8")))
        for name, w in files.items()})


def base_id(init) -> str:
    """The base's identity for the run records: for a local checkpoint, the sha256 of its
    tensors (names, dtypes, shapes and bytes, in name order), not of the file, whose metadata
    safetensors writes in no fixed order (two saves of the same weights differ); else init."""
    from safetensors.torch import load_file

    weights = Path(init) / "model.safetensors"
    if not weights.is_file():
        return str(init)
    h = hashlib.sha256()
    for name, t in sorted(load_file(weights).items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- command line

STAGES = {"grid": run_grid, "table": run_table, "sweep": run_sweep}


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("stage", nargs="?", default="all", choices=(*STAGES, "all"),
                   help="grid (about 35 min on a 2-core CPU), table (about 17 min; needs "
                        "grid's), sweep (about 15 min; needs grid's), or all three")
    p.add_argument("--init", default="out/train", help="the base: train.py's output "
                   "directory, or any GPT-2 that --init of finetune.py takes")
    p.add_argument("--data", default="e2e", help="the E2E set: its name or a prepared folder")
    p.add_argument("--raw-dir", default=None, help="the E2E CSVs for the test references "
                   "(default: those the prepared set holds)")
    p.add_argument("--out", default="results/methods", help="where runs/ and the tables go")
    p.add_argument("--save-dir", default="out/methods", help="where the table stage writes each "
                   "run's trained tensors, for sample.py --adapter (FT's model is not kept)")
    p.add_argument("--steps", type=int, default=300,
                   help=help_with_range("optimizer steps of every run", _FLAG_RANGES, "steps"))
    p.add_argument("--eval-limit", type=int, default=630, help=help_with_range(
        "test MRs decoded for BLEU and ROUGE-L", _FLAG_RANGES, "eval_limit"))
    p.add_argument("--rounds", type=int, default=10, help=help_with_range(
        "timing rounds of the cost measurements", _FLAG_RANGES, "rounds"))
    p.add_argument("--quick", action="store_true", help="a check of the whole pipeline in "
                   "about a minute: 2 steps per run, 2 learning rates, 2 sizes per family, "
                   "3 MRs, tiny inference shapes (numbers meaningless)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.quick:
        args.steps, args.eval_limit, args.rounds = 2, min(args.eval_limit, 3), 2
    check_flags(args, _FLAG_RANGES)
    if args.init not in PRETRAINED and not Path(args.init).exists():
        raise FileNotFoundError(f"--init {args.init}: no such model directory or file (the quick "
                                f"start's base is `python train.py`'s out/train)")
    plan = Plan(init=args.init, data=args.data, out=Path(args.out), steps=args.steps,
                warmup=0 if args.quick else min(30, args.steps), eval_limit=args.eval_limit,
                rounds=args.rounds, quick=args.quick, raw_dir=args.raw_dir,
                batch_size=2 if args.quick else 8, base_id=base_id(args.init),
                save_dir=args.save_dir)
    try:
        for stage in STAGES if args.stage == "all" else (args.stage,):
            print(f"== {stage} ==")
            STAGES[stage](plan)
    except KeyboardInterrupt:  # the finished runs are in runs/: say so, and how to go on
        kept = len(list((plan.out / "runs").glob("*.json"))) if (plan.out / "runs").is_dir() \
            else 0
        print(f"\nstopped: {kept} finished runs are kept in {plan.out / 'runs'}; the same "
              f"command goes on from there", file=sys.stderr)
        raise
    print(f"-> {plan.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
