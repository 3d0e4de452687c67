"""Measure the paper's practical claims side by side, in one run, on this machine.

1. Inference latency (LoRA Table 1, §3): one forward pass for the base model, LoRA merged
   (W = W0 + BA, §4.1: "no additional inference latency"), LoRA unmerged (r=4 on W_q, W_v),
   the two adapter baselines Table 1 compares against, Adapter^H (Houlsby et al. 2019) and
   Adapter^L (Lin et al. 2020), built in support/baselines.py, and prefix tuning, PreEmbed and
   PreLayer (§5.1, support/prefix.py) with --prefix-tokens N special tokens (N // 2 prefix, the
   rest infix). Adapters add depth (§3: layers processed in sequence); prefixes reserve
   sequence length instead: a prefix arm runs N more positions in every forward and attends to
   N more cached ones in every decoded token, so its cost grows with N, and the report's
   positions column says how many of the context's positions each arm takes.
2. Decoding latency per token with the KV cache at batch size 1, same arms.
3. Training (§4.2, "Practical Benefits and Limitations"): step time and peak memory of LoRA
   against full fine-tuning on the same model and batch, and the FLOP/s achieved as a share of
   this machine's matmul FLOP/s, measured in the same run.

    python bench.py --quick                          # a few minutes on a quiet 2-core CPU
    python bench.py --quick --clock cpu --threads 1  # the same on a shared or busy machine

Noise: a shared machine swings a single ratio by 5-10%. So the thread count is fixed, every arm
is warmed up, and the arms run interleaved within each round (in a rotating order): each round
gives a paired ratio arm / base, and the ratio reported is their geometric mean with a 95%
interval (a t-interval on the log-ratios, see support.timing.paired_ratio). A target is met,
missed, or "within noise" when the interval straddles it (verdict). All inference arms read the same
weight tensors (see build_arm). Where other processes compete for the cores, wall time counts
their time too: --clock cpu times this process's CPU time instead, and with --threads 1 that is
the compute time itself. Peak training memory is measured for each arm in its own process.

Reading order: the arms -> timing helpers (the harness and the intervals are support/timing.py,
shared with experiments/methods.py) -> machine peaks and FLOP counts -> the three benchmarks ->
progress lines -> claims, report and main().
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lora import apply_lora, count_trainable, merge_lora
from model import GPT, PRETRAINED, GPTConfig
from support.baselines import adapter_params, add_adapters, bottleneck_for
from support.common import (DTYPES, ArgumentParser, HelpFormatter, atomic_write, check_flags,
                            check_writable, get_device, help_with_range, run_main)
from support.methods import apply_method
from support.prefix import INIT_TOKENS, SEPARATOR
from support.timing import (CLOCKS, cached_decoder, context_positions, cpu_name,
                            end_with_separator, peak_rss_since, reset_peak_mark, rss_now,
                            shared_copy, summarize, synchronizer, time_interleaved)
from train import TrainConfig, make_optimizer

# ---------------------------------------------------------------- the arms

ARMS = ("base", "lora_merged", "lora_unmerged", "adapter_H", "adapter_L", "pre_embed",
        "pre_layer")
PREFIX_ARMS = ("pre_embed", "pre_layer")  # prefix tuning, LoRA §5.1 (support/prefix.py)
PAPER_LORA = dict(rank=4, alpha=32, targets=("q", "v"))  # the paper's GPT-2 setting (§4.2, §5.4)
TRAIN = TrainConfig()  # train.py's defaults: AdamW lr 2e-4, weight decay 0.01, clip 1.0


def prefix_settings(config: GPTConfig, tokens: int) -> dict:
    """apply_method's settings for a prefix arm of `tokens` special tokens: l_p = tokens // 2
    prefix and l_i = tokens - l_p infix tokens, Li & Liang's prefix + infix (LoRA §5.1), with
    support/prefix.py's separator and init words. Those are GPT-2's token ids: a smaller
    vocabulary (--model tiny) takes them modulo its size, so that they exist there."""
    V = config.vocab_size
    return dict(l_p=tokens // 2, l_i=tokens - tokens // 2, separator=SEPARATOR % V,
                init_tokens=[t % V for t in INIT_TOKENS])


def build_arm(base: GPT, arm: str, adapter_target: int = 11_000_000, seed: int = 0,
              prefix_tokens: int = 16) -> GPT:
    """One inference arm, in eval mode, sharing base's weight tensors.

    Every arm reads the very same weight memory: where a copy of the weights happened to be
    allocated moved decoding time by 1-2% here, more than the effects measured. So the merged
    arm merges W0 + BA into the shared weights, and from then on the base arm (and every other)
    runs with W0 + BA: the same shapes and bytes, so the same time as W0. The LoRA matrices get
    random values (B = 0 at init would make merging a no-op in value, though not in time).
    The prefix arms (prefix_settings) take prefix_tokens positions of every sequence."""
    if arm == "base":
        return base.eval()
    if arm in PREFIX_ARMS:
        return apply_method(shared_copy(base), arm,
                            **prefix_settings(base.config, prefix_tokens)).eval()
    if arm.startswith("adapter_"):
        kind = arm.removeprefix("adapter_")
        m = bottleneck_for(kind, base.config.n_layer, base.config.n_embd, adapter_target)
        if m > base.config.n_embd:
            raise ValueError(f"adapter bottleneck {m} for {adapter_target:,} parameters is wider "
                             f"than n_embd {base.config.n_embd}: lower --adapter-params")
        return add_adapters(shared_copy(base), kind, m).eval()
    if arm not in ("lora_merged", "lora_unmerged"):
        raise ValueError(f"unknown arm {arm!r}: use some of {', '.join(ARMS)}")
    model = shared_copy(base)
    apply_lora(model, **PAPER_LORA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # apply_lora leaves only the LoRA matrices trainable
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    if arm == "lora_merged":
        merge_lora(model)
    return model.eval()


class Arms:
    """The inference arms over one base model, each built once and reused by every setting: the
    LoRA and prefix arms once in all (the merged one merges once), the adapters once per
    parameter count."""

    def __init__(self, base: GPT, names, seed: int = 0, prefix_tokens: int = 16):
        self.base, self.names, self.seed, self.built = base, list(names), seed, {}
        self.prefix_tokens = prefix_tokens

    def get(self, adapter_target: int) -> dict:
        out = {}
        for a in self.names:
            key = (a, adapter_target if a.startswith("adapter_") else None)
            if key not in self.built:
                self.built[key] = build_arm(self.base, a, adapter_target, self.seed,
                                            self.prefix_tokens)
            out[a] = self.built[key]
        return out


def extra_params(model: GPT, arm: str) -> int:
    """Parameters an arm evaluates beyond the base model's at inference."""
    if arm.startswith("adapter_"):
        return adapter_params(model)
    if arm == "lora_unmerged" or arm in PREFIX_ARMS:  # only the method's tensors are trainable
        return count_trainable(model)
    return 0


# ---------------------------------------------------------------- timing helpers
# (the harness and the intervals are in support/timing.py)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def profile_ops(fn, device: str, top: int = 6) -> list:
    """The ops that took the most time (their own, without their callees) in one call of fn:
    where an arm's time goes (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [dict(op=e.key, self_ms=getattr(e, key) / 1e3, calls=e.count) for e in rows]


# ---------------------------------------------------------------- machine peaks and FLOP counts


def _median_seconds(fn, device: str, clock, trials: int = 5, warmup: int = 2) -> float:
    sync = synchronizer(device)
    ts = []
    for i in range(warmup + trials):
        sync()
        t0 = clock()
        fn()
        sync()
        if i >= warmup:
            ts.append(clock() - t0)
    return statistics.median(ts)


def matmul_flops(device: str, dtype, n: int = 2048, clock=time.perf_counter) -> float:
    """FLOP/s of a large square matmul on this machine now: the ceiling the model's FLOP/s is
    compared with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / _median_seconds(lambda: a @ b, device, clock)


def read_bandwidth(device: str, nbytes: int = 256 * 2 ** 20, clock=time.perf_counter) -> float:
    """Bytes/s of reading one large tensor (x.sum(), far larger than any cache): the ceiling of
    decoding, which reads every weight once per token."""
    x = torch.ones(nbytes // 4, device=device)
    return nbytes / _median_seconds(lambda: x.sum(), device, clock)


def gemv_bandwidth(device: str, dtype, nbytes: int = 256 * 2 ** 20,
                   clock=time.perf_counter) -> float:
    """Bytes/s of matrix-vector products over nn.Linear-shaped weights (out, in) that do not fit
    in any cache: what this machine's matmul kernel reaches on decoding's work, beside the
    bandwidth of a plain read."""
    n_embd = 1024
    rows = nbytes // (torch.finfo(dtype).bits // 8) // n_embd // 8
    ws = [torch.randn(rows, n_embd, device=device, dtype=dtype) for _ in range(8)]
    x = torch.randn(1, n_embd, device=device, dtype=dtype)
    return nbytes / _median_seconds(lambda: [torch.nn.functional.linear(x, w) for w in ws],
                                    device, clock)


def counted_params(model: GPT) -> int:
    """N as nanoGPT's estimate_mfu counts it: every parameter once (wte, tied to lm_head, is the
    output matmul), less the position embeddings, which are a lookup."""
    return model.num_params() - model.wpe.weight.numel()


def flops_per_token(config: GPTConfig, n: int, T: int, kind: str) -> int:
    """FLOPs per token as nanoGPT's estimate_mfu: 6N + 12*L*H*Q*T for a training step (2N
    forward and 4N backward for the weights' matmuls; 12LHQT for attention's scores and values).
    forward: a third of it. lora_train: no weight gradients for the frozen weights, so 4N."""
    L, H, Q = config.n_layer, config.n_head, config.n_embd // config.n_head
    attn = 12 * L * H * Q * T
    return {"train": 6 * n + attn, "lora_train": 4 * n + attn, "forward": 2 * n + attn // 3}[kind]


# ---------------------------------------------------------------- model shapes

MODELS = {  # random weights in these shapes unless --init gives real ones
    "gpt2": PRETRAINED["gpt2"],
    "gpt2-medium": PRETRAINED["gpt2-medium"],
    # for tests; block_size 512 leaves the CPU default --shapes 4x256 room for the prefix arms
    "tiny": dict(n_layer=2, n_head=4, n_embd=32, block_size=512, vocab_size=1024),
}


def check_lengths(args, config, shapes, skip, positions: int = 0):
    """Every sequence the chosen parts run must fit the model: checked before the first
    measurement, not when its part comes. positions: those the prefix arms take from every
    sequence (--prefix-tokens; 0 without them), which a forward and a decoding must leave."""
    n = config.block_size
    plus = f" + {positions} positions of the prefix arms (--prefix-tokens)" if positions else ""
    for B, T in shapes if "forward" not in skip else ():
        if T + positions > n:
            raise ValueError(f"--shapes {B}x{T}: sequence length {T}{plus} is longer than the "
                             f"model's {n}")
    if "decode" not in skip and args.decode_prompt + args.decode_tokens + positions > n:
        raise ValueError(f"--decode-prompt + --decode-tokens{plus} = "
                         f"{args.decode_prompt + args.decode_tokens + positions} exceeds the "
                         f"model's block_size {n}")
    if "train" not in skip and args.train_seq + 1 > n:
        raise ValueError(f"--train-seq {args.train_seq} is too long for the model's {n}")


def build_base(args) -> GPT:
    if args.init:
        return GPT.from_pretrained(args.init, device=args.device, dtype=DTYPES[args.dtype])
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(**MODELS[args.model]))
    model.name = f"{args.model} shape, random weights"
    return model.to(device=args.device, dtype=DTYPES[args.dtype])


# ---------------------------------------------------------------- 1. forward latency


@torch.inference_mode()
def bench_forward(arms: Arms, B: int, T: int, args) -> dict:
    """One forward pass (B, T) -> logits (B, T, V) per call, as Table 1. Each row ends with the
    prefix arms' separator (support.timing.end_with_separator), where their infix goes; a
    prefix arm runs T + --prefix-tokens positions."""
    base = arms.base
    target = args.adapter_params or (500_000 if (B, T) == (32, 512) else 11_000_000)  # Table 1
    models = arms.get(target)
    idx = torch.randint(0, base.config.vocab_size, (B, T), device=args.device)
    idx = end_with_separator(idx, models)
    fns = {a: (lambda m=m: m(idx)) for a, m in models.items()}
    times = time_interleaved(fns, args.rounds, args.warmup, synchronizer(args.device),
                             f"forward {B}x{T}", CLOCKS[args.clock])
    out = summarize(times, "base")
    for a, m in models.items():
        out[a]["extra_params"] = extra_params(m, a)
        out[a]["positions"] = context_positions(m)
    flops = B * T * flops_per_token(base.config, counted_params(base), T, "forward")
    achieved = flops / (out["base"]["median_ms"] / 1e3)
    res = dict(batch=B, seq=T, adapter_params_target=target, arms=out,
               base_flops_per_s=achieved, base_mfu=achieved / args.peak_flops)
    if args.profile:
        res["profile"] = {a: profile_ops(fn, args.device) for a, fn in fns.items()}
    return res


# ---------------------------------------------------------------- 2. decoding with the KV cache


@torch.inference_mode()
def bench_decode(arms: Arms, args) -> dict:
    """Per-token latency of decoding at batch 1: a prompt of --decode-prompt tokens is cached once
    (not timed), then each call feeds --decode-tokens single tokens with last_only=True, as
    decoding.generate does; the cache is rewound to the end of the prefill before each call
    (support.timing.cached_decoder). The prompt ends with the prefix arms' separator; their
    special tokens are cached with it, so they attend to --prefix-tokens more positions."""
    base, P, n = arms.base, args.decode_prompt, args.decode_tokens
    target = args.adapter_params or 11_000_000
    prompt = torch.randint(0, base.config.vocab_size, (1, P), device=args.device)
    tokens = torch.randint(0, base.config.vocab_size, (n, 1, 1), device=args.device)
    models = arms.get(target)
    prompt = end_with_separator(prompt, models)
    fns = {a: cached_decoder(m, prompt, tokens) for a, m in models.items()}
    times = time_interleaved(fns, args.rounds, args.warmup, synchronizer(args.device),
                             "decode", CLOCKS[args.clock])
    out = summarize(times, "base", per=n)
    for a, m in models.items():
        out[a]["extra_params"] = extra_params(m, a)
        out[a]["positions"] = context_positions(m)
    # Each token reads every weight once: the cached KV (<= P + n positions) is left out.
    weight_bytes = counted_params(base) * base.wte.weight.element_size()
    bw = weight_bytes / (out["base"]["median_ms"] / 1e3)
    res = dict(prompt=P, tokens=n, adapter_params_target=target, arms=out,
               weight_bytes_per_token=weight_bytes, base_bytes_per_s=bw,
               base_bandwidth_share=bw / args.peak_bandwidth,
               base_gemv_share=bw / args.gemv_bandwidth)
    if args.profile:
        res["profile"] = {a: profile_ops(fn, args.device) for a, fn in fns.items()}
    return res


# ---------------------------------------------------------------- 3. training


def train_arm(args, arm: str):
    """A fresh model and its optimizer for arm 'full' (every weight trains) or 'lora': train.py's
    make_optimizer (AdamW over the requires_grad parameters only, so LoRA's frozen weights get
    no Adam state, fused kernels) with train.py's defaults (TrainConfig, the paper's recipe)."""
    model = build_base(args)
    if arm == "lora":
        apply_lora(model, **PAPER_LORA)
    elif arm != "full":
        raise ValueError(f"unknown training arm {arm!r}")
    model.train()
    return model, make_optimizer(model, TRAIN)


def _train_step(model, opt, idx, targets):
    """One optimizer step as train.py's loop takes it: forward with targets -> loss (label
    smoothing as configured), backward, gradient clipping, AdamW step. The model runs in --dtype
    without autocast, the dtype the matmul FLOP/s is measured in, so the two compare."""
    loss = model(idx, targets, label_smoothing=TRAIN.label_smoothing)
    loss.backward()
    if TRAIN.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       TRAIN.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def batch_for(args, config):
    g = torch.Generator().manual_seed(args.seed)
    B, T = args.train_batch, args.train_seq
    data = torch.randint(0, config.vocab_size, (B, T + 1), generator=g).to(args.device)
    return data[:, :-1], data[:, 1:]


def peak_memory_child(args) -> dict:
    """Run in a fresh process (`bench.py --_child ARM`): the peak memory of a few training steps,
    weights included.

    CUDA: torch.cuda.max_memory_allocated, the allocator's own peak of live tensors.
    CPU: the peak resident set size less the resident size before the model was built (the
    interpreter and torch). Why this is sound: with no swap every tensor written is resident, so
    the peak of resident memory is at least the peak of live tensors; what it adds is memory
    the allocator held freed and had not returned, which the process did occupy. Nothing but this
    arm runs in the process. On Linux the mark is reset once the model is built (clear_refs), so
    the transient of reading a checkpoint (--init) is not counted; elsewhere ru_maxrss is used.
    """
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    before = rss_now()
    model, opt = train_arm(args, args._child)
    idx, targets = batch_for(args, model.config)
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
        method = "cuda max_memory_allocated"
    else:
        method = reset_peak_mark()  # support.timing, as peak_training_memory does
    for _ in range(args.mem_steps):  # Adam's state is allocated in the first step
        _train_step(model, opt, idx, targets)
    if cuda:
        peak = torch.cuda.max_memory_allocated(args.device)
    else:
        peak = peak_rss_since(before, method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(peak_bytes=peak, trainable_params=trainable, memory_method=method)


def peak_memory(args, arm: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", arm] + args.child_argv
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"the memory probe for {arm} failed:\n{r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_train(args) -> dict:
    """Step time of full fine-tuning and LoRA, interleaved; peak memory of each in its own
    process; achieved FLOP/s of each as a share of the matmul FLOP/s."""
    mem = {}
    for arm in ("full", "lora"):
        mem[arm] = peak_memory(args, arm)
        say(args, f"training peak memory, {arm}: {mem[arm]['peak_bytes'] / 2 ** 20:.0f} MiB")
    arms = {arm: train_arm(args, arm) for arm in ("full", "lora")}
    idx, targets = batch_for(args, arms["full"][0].config)
    fns = {arm: (lambda mo=mo: _train_step(*mo, idx, targets)) for arm, mo in arms.items()}
    times = time_interleaved(fns, args.train_rounds, 1, synchronizer(args.device), "train",
                             CLOCKS[args.clock])
    out = summarize(times, "full")
    model = arms["full"][0]
    n, T, tokens = counted_params(model), args.train_seq, args.train_batch * args.train_seq
    for arm, kind in (("full", "train"), ("lora", "lora_train")):
        s = out[arm]
        s["tokens_per_s"] = tokens / (s["median_ms"] / 1e3)
        s["flops_per_token"] = flops_per_token(model.config, n, T, kind)
        s["mfu"] = s["tokens_per_s"] * s["flops_per_token"] / args.peak_flops
        s.update(mem[arm])
        s["memory_ratio_to_full"] = mem[arm]["peak_bytes"] / mem["full"]["peak_bytes"]
    say(args, f"training step: full {out['full']['median_ms']:.0f} ms, lora "
              f"{out['lora']['median_ms']:.0f} ms (ratio {out['lora']['ratio_to_base']:.3f})")
    return dict(batch=args.train_batch, seq=T, arms=out)


# ---------------------------------------------------------------- progress lines


def plan_line(args, model_name: str, names, shapes, skip) -> str:
    """One line before the work: what runs, in which settings, and the machine's load."""
    parts = []
    if "forward" not in skip:
        parts.append("forward " + ", ".join(f"{B}x{T}" for B, T in shapes))
    if "decode" not in skip:
        parts.append(f"decode {args.decode_tokens} tokens")
    if "train" not in skip:
        parts.append(f"train {args.train_batch}x{args.train_seq} (full, lora)")
    load, cpus = _load(), os.cpu_count() or 1
    busy = f"load {load:.1f} on {cpus} CPUs" if load is not None else f"{cpus} CPUs"
    return (f"bench.py: {model_name}, {args.device} {args.dtype}, {args.threads} threads, "
            f"{args.clock} clock; {', '.join(parts) or 'nothing'}; {len(names)} arms x "
            f"{args.rounds} rounds; {busy}")


def say(args, text: str):
    """A progress line as each measurement completes, with the seconds since the start."""
    print(f"[{time.perf_counter() - args.t0:5.0f} s] {text}", flush=True)


def ratios_text(part: dict, unit: str = "ms") -> str:
    arms = part["arms"]
    others = ", ".join(f"{a} {s['ratio_to_base']:.3f}" for a, s in arms.items() if a != "base")
    return f"base {arms['base']['median_ms']:.2f} {unit}; ratio to base: {others}"


# ---------------------------------------------------------------- claims and report

# What this implementation should reach: (description, where the figure is in the results,
# the bound, <= or >=)
CLAIMS = [
    ("forward seq 128: lora_merged / base", ("forward128", "lora_merged"), 1.01, "<="),
    ("forward seq 128: lora_unmerged / base", ("forward128", "lora_unmerged"), 1.05, "<="),
    ("decode 1 token: lora_merged / base", ("decode", "lora_merged"), 1.01, "<="),
    ("decode 1 token: lora_unmerged / base", ("decode", "lora_unmerged"), 1.05, "<="),
    ("train: lora step time / full", ("train_time",), 0.65, "<="),
    ("train: lora peak memory / full", ("train_mem",), 0.40, "<="),
    ("forward seq 128: FLOP/s / matmul FLOP/s", ("forward128_mfu",), 0.60, ">="),
    ("train step (full): FLOP/s / matmul FLOP/s", ("train_mfu",), 0.45, ">="),
    ("decode: weight bytes/s / read bandwidth", ("decode_bw",), 0.60, ">="),
]


def verdict(value: float, ci, bound: float, op: str) -> str:
    """'met', 'missed' or 'within noise' for a figure that should be op ('<=' or '>=') bound.
    With a 95% interval ci = [lo, hi] (paired_ratio): met when all of it is on the right side
    of the bound, missed when all of it is on the wrong side, within noise when it straddles
    the bound. A figure measured once (ci None: peak memory, shares of the machine's peaks, a
    single round) is met or missed by its value."""
    lo, hi = ci if ci is not None else (value, value)
    if op == "<=":
        return "met" if hi <= bound else "missed" if lo > bound else "within noise"
    return "met" if lo >= bound else "missed" if hi < bound else "within noise"


def check_targets(res: dict) -> list:
    """Each of CLAIMS whose figure this run measured: its value, 95% interval (None where the
    figure is measured once) and verdict."""
    fwd = next((f for f in res.get("forward", []) if f["seq"] == 128), None)
    dec, tr = res.get("decode"), res.get("train")
    figures = {}  # key -> (value, interval or None)
    if fwd:
        for a, s in fwd["arms"].items():
            figures[("forward128", a)] = s["ratio_to_base"], s["ratio_ci95"]
        figures[("forward128_mfu",)] = fwd["base_mfu"], None
    if dec:
        for a, s in dec["arms"].items():
            figures[("decode", a)] = s["ratio_to_base"], s["ratio_ci95"]
        figures[("decode_bw",)] = dec["base_bandwidth_share"], None
    if tr:
        lora = tr["arms"]["lora"]
        figures[("train_time",)] = lora["ratio_to_base"], lora["ratio_ci95"]
        figures[("train_mem",)] = lora["memory_ratio_to_full"], None
        figures[("train_mfu",)] = tr["arms"]["full"]["mfu"], None
    out = []
    for desc, key, bound, op in CLAIMS:
        if key in figures:
            v, ci = figures[key]
            out.append(dict(target=desc, value=v, ci95=ci, bound=f"{op} {bound}",
                            verdict=verdict(v, ci, bound, op)))
    return out


def _with_ci(value: float, ci) -> str:
    """A figure with its 95% interval, if it has one: '1.003 [0.995, 1.012]'."""
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def print_report(res: dict):
    m = res["machine"]
    print(f"\n{res['model']} ({res['params'] / 1e6:.1f}M parameters), {m['device']} "
          f"{res['dtype']}, {m['threads']} threads, {res['clock']} clock, {m['cpu']}, "
          f"torch {m['torch']}; {res['seconds']:.0f} s")
    load = (f"; load average {m['load_average_start']:.1f} at start, "
            f"{m['load_average_end']:.1f} at end" if m["load_average_start"] is not None else "")
    print(f"this machine: matmul {m['matmul_flops'] / 1e9:.0f} GFLOP/s, read bandwidth "
          f"{m['read_bandwidth'] / 1e9:.1f} GB/s (matrix-vector {m['gemv_bandwidth'] / 1e9:.1f} "
          f"GB/s){load}")
    row = "{:<15} {:>12} {:>9} {:>20} {:>22}"
    for f in res.get("forward", []):
        print(f"\nForward pass, batch {f['batch']} x seq {f['seq']} ({f['arms']['base']['trials']}"
              f" rounds; adapters sized for {f['adapter_params_target'] / 1e6:g}M parameters); "
              f"base at {f['base_mfu']:.0%} of matmul FLOP/s")
        _arm_table(f, row)
    if res.get("decode"):
        d = res["decode"]
        print(f"\nDecoding with the KV cache, batch 1, per token ({d['tokens']} tokens after a "
              f"{d['prompt']}-token prompt, {d['arms']['base']['trials']} rounds); base reads "
              f"weights at {d['base_bandwidth_share']:.0%} of the read bandwidth "
              f"({d['base_gemv_share']:.0%} of the matrix-vector one)")
        _arm_table(d, row)
    if res.get("train"):
        t = res["train"]
        print(f"\nTraining step, batch {t['batch']} x seq {t['seq']}, AdamW "
              f"({t['arms']['full']['trials']} rounds; peak memory in a process per arm)")
        trow = "{:<6} {:>12} {:>18} {:>22} {:>9} {:>11} {:>8} {:>6}"
        print(trow.format("arm", "trainable", "step ms", "ratio [95% interval]", "tokens/s",
                          "peak MiB", "ratio", "MFU"))
        for a, s in t["arms"].items():
            print(trow.format(a, f"{s['trainable_params']:,}",
                              f"{s['mean_ms']:.1f} ± {s['std_ms']:.1f}",
                              _with_ci(s["ratio_to_base"], s["ratio_ci95"]),
                              f"{s['tokens_per_s']:.0f}",
                              f"{s['peak_bytes'] / 2 ** 20:.0f}",
                              f"{s['memory_ratio_to_full']:.3f}", f"{s['mfu']:.0%}"))
    print("\nTargets (a timed ratio: geometric mean over rounds [95% interval]; within "
          "noise: the interval straddles the target):")
    for t in res["targets"]:
        print(f"  {t['verdict']:<12} {t['target']}: {_with_ci(t['value'], t['ci95'])} "
              f"(target {t['bound']})")


def _arm_table(part: dict, row: str):
    """The arms of a latency part, one row each. positions: those of the context an arm's method
    takes from every sequence (the prefix arms' special tokens; 0 for the others)."""
    print(row.format("arm", "extra params", "positions", "mean ms ± std",
                     "ratio [95% interval]"))
    for a, s in part["arms"].items():
        print(row.format(a, f"{s['extra_params']:,}", s.get("positions", 0),
                         f"{s['mean_ms']:.2f} ± {s['std_ms']:.2f}",
                         _with_ci(s["ratio_to_base"], s["ratio_ci95"])))
    for a, ops in part.get("profile", {}).items():
        print(f"  {a} spends one call in: " + ", ".join(
            f"{o['op']} {o['self_ms']:.2f} ms ({o['calls']}x)" for o in ops))


def _load():
    """1-minute load average: how busy the machine was (other processes skew timings)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def parse_shapes(text: str):
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        shapes = [()]
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"--shapes {text!r}: give BATCHxSEQ pairs, e.g. 32x512,16x256,1x128")
    return shapes


def parse_count(text: str) -> int:
    """'11M', '0.5M', '500k' or '500000' -> int."""
    t = text.strip().lower()
    scale = {"k": 1e3, "m": 1e6}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if scale != 1 else t) * scale)
    except (ValueError, OverflowError):  # not a number; inf
        n = 0
    if n < 1:
        raise ValueError(f"--adapter-params {text!r}: give a count (>= 1) such as 11M, 0.5M "
                         f"or 5000")
    return n


# The allowed values of every numeric flag (common.RANGES): in --help, checked before any work.
_FLAG_RANGES = {"rounds": ">= 1", "warmup": ">= 0", "decode_prompt": ">= 1",
                "decode_tokens": ">= 1", "prefix_tokens": ">= 1", "train_batch": ">= 1",
                "train_seq": ">= 1", "train_rounds": ">= 1", "mem_steps": ">= 1",
                "threads": ">= 1", "seed": "[0, 2**32)"}


def _ranged(text, name) -> str:
    """A flag's help with its allowed values, as main checks them."""
    return help_with_range(text, _FLAG_RANGES, name)


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Latency of LoRA (merged, unmerged) and adapter baselines against GPT-2 "
                    "(LoRA Table 1), and LoRA's training savings against full fine-tuning (§4.2). "
                    "Each ratio comes with a 95% interval over paired rounds; a target is met, "
                    "missed, or within noise.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(MODELS), default="gpt2",
                   help="shape with random weights: gpt2 (124M), gpt2-medium (355M, the paper's "
                        "Table 1 model), tiny (2 layers, for tests)")
    g.add_argument("--init", default=None,
                   help="real weights instead: a released size, a directory or a weights file")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="of the weights and of every step (no autocast)")
    g = p.add_argument_group("what to measure")
    g.add_argument("--quick", action="store_true",
                   help="forward 1x128 only, 10 rounds, 8 decoded tokens, training batch 2 and "
                        "3 training rounds: a few minutes on a 2-core CPU")
    g.add_argument("--arms", default=",".join(ARMS), help="inference arms, comma-separated")
    g.add_argument("--shapes", default=None,
                   help="forward-pass settings BATCHxSEQ, comma-separated; the paper's are "
                        "32x512,16x256,1x128 (default: those on cuda, 4x256,1x128 on cpu)")
    g.add_argument("--adapter-params", default=None,
                   help="adapter parameter count (>= 1) the bottleneck is solved for (default "
                        "as Table 1: 0.5M at 32x512, 11M elsewhere)")
    g.add_argument("--profile", action="store_true",
                   help="also list the ops each arm spends its time in (torch.profiler)")
    g.add_argument("--skip", default=None,
                   help="parts to leave out, comma-separated: forward, decode, train")
    g = p.add_argument_group("rounds and sizes")
    g.add_argument("--rounds", type=int, default=None,
                   help=_ranged("timed rounds per arm", "rounds") + "; default 30, quick 10")
    g.add_argument("--warmup", type=int, default=2,
                   help=_ranged("untimed calls per arm first", "warmup"))
    g.add_argument("--decode-prompt", type=int, default=128,
                   help=_ranged("cached prompt length", "decode_prompt"))
    g.add_argument("--decode-tokens", type=int, default=None,
                   help=_ranged("tokens decoded per timed call", "decode_tokens")
                   + "; default 16, quick 8")
    g.add_argument("--prefix-tokens", type=int, default=16,
                   help=_ranged("special tokens of the prefix arms: N // 2 prefix, the rest "
                                "infix (Li & Liang); they take N positions of the context",
                                "prefix_tokens"))
    g.add_argument("--train-batch", type=int, default=None,
                   help=_ranged("sequences per training step", "train_batch")
                   + "; default 4, quick 2")
    g.add_argument("--train-seq", type=int, default=128,
                   help=_ranged("tokens per training sequence", "train_seq"))
    g.add_argument("--train-rounds", type=int, default=None,
                   help=_ranged("timed training steps per arm", "train_rounds")
                   + "; default 10, quick 3")
    g.add_argument("--mem-steps", type=int, default=2,
                   help=_ranged("steps of each memory probe", "mem_steps"))
    g = p.add_argument_group("run (on a shared or busy machine: --clock cpu --threads 1)")
    g.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=_ranged("torch threads, fixed for the run; 1 on a shared machine",
                               "threads"))
    g.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: latency as a user sees it; cpu: this process's CPU time, which "
                        "other processes hardly change (with --threads 1 it is the compute "
                        "time; with more threads it sums them, so it is no latency)")
    g.add_argument("--seed", type=int, default=0,
                   help=_ranged("random weights, LoRA matrices, inputs", "seed"))
    g.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # memory probe, internal
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.t0 = time.perf_counter()
    args.device = get_device(args.device)
    q = args.quick
    for name, quick, full in (("rounds", 10, 30), ("decode_tokens", 8, 16), ("train_batch", 2, 4),
                              ("train_rounds", 3, 10)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    check_flags(args, _FLAG_RANGES)
    if args.adapter_params is not None:
        args.adapter_params = parse_count(args.adapter_params)
    torch.set_num_threads(args.threads)

    if args._child:
        print(json.dumps(peak_memory_child(args)))
        return 0
    # what a memory probe needs to build the same model and batch
    args.child_argv = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
                       "--threads", str(args.threads), "--seed", str(args.seed),
                       "--train-batch", str(args.train_batch), "--train-seq", str(args.train_seq),
                       "--mem-steps", str(args.mem_steps)]
    if args.init:
        args.child_argv += ["--init", args.init]
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in names if a not in ARMS]
    if bad:
        raise ValueError(f"--arms: unknown {bad}; use some of {', '.join(ARMS)}")
    names = ["base"] + [a for a in names if a != "base"]  # ratios need the base arm
    skip = {s.strip() for s in (args.skip or "").split(",") if s.strip()}
    if skip - {"forward", "decode", "train"}:
        raise ValueError(f"--skip: unknown {sorted(skip - {'forward', 'decode', 'train'})}")
    cuda = args.device.startswith("cuda")
    if cuda and args.clock == "cpu":
        raise ValueError("--clock cpu times the CPU: on cuda use the default --clock wall")
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    elif q:
        shapes = parse_shapes("1x128")
    else:
        shapes = parse_shapes("32x512,16x256,1x128" if cuda else "4x256,1x128")

    if args.json:
        check_writable(args.json, "--json")  # now, not after the whole benchmark
    base = build_base(args)
    positions = args.prefix_tokens if set(names) & set(PREFIX_ARMS) else 0
    check_lengths(args, base.config, shapes, skip, positions)  # before the machine's peaks
    dtype = DTYPES[args.dtype]
    args.peak_flops = matmul_flops(args.device, dtype, clock=CLOCKS[args.clock])
    args.peak_bandwidth = read_bandwidth(args.device, clock=CLOCKS[args.clock])
    args.gemv_bandwidth = gemv_bandwidth(args.device, dtype, clock=CLOCKS[args.clock])
    model_name = getattr(base, "name", args.model)
    print(plan_line(args, model_name, names, shapes, skip), flush=True)
    arms = Arms(base, names, args.seed, args.prefix_tokens)
    prefix = prefix_settings(base.config, args.prefix_tokens)
    res = dict(model=model_name, params=base.num_params(),
               dtype=args.dtype, clock=args.clock, argv=argv,
               lora=dict(PAPER_LORA, targets=list(PAPER_LORA["targets"])),
               prefix=dict(tokens=args.prefix_tokens, l_p=prefix["l_p"], l_i=prefix["l_i"]),
               machine=dict(device=device_name(args.device),
                            cpu=cpu_name(),
                            cpus=os.cpu_count(), threads=args.threads, torch=torch.__version__,
                            matmul_flops=args.peak_flops, read_bandwidth=args.peak_bandwidth,
                            gemv_bandwidth=args.gemv_bandwidth,
                            load_average_start=_load()))
    if "forward" not in skip:
        res["forward"] = []
        for B, T in shapes:
            part = bench_forward(arms, B, T, args)
            say(args, f"forward {B}x{T}: " + ratios_text(part))
            res["forward"].append(part)
    if "decode" not in skip:
        res["decode"] = bench_decode(arms, args)
        say(args, "decode, per token: " + ratios_text(res["decode"]))
    del base, arms
    if "train" not in skip:
        res["train"] = bench_train(args)
    res["machine"]["load_average_end"] = _load()
    res["seconds"] = time.perf_counter() - args.t0
    res["targets"] = check_targets(res)
    print_report(res)
    if args.json:
        text = json.dumps(res, indent=2) + "\n"
        atomic_write(args.json, lambda path: Path(path).write_text(text))
    return 0


if __name__ == "__main__":
    run_main(main)
