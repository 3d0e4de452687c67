"""Timing and memory measurement shared by bench.py and experiments/methods.py: models timed in
alternation, paired ratios with 95% intervals, and peak training memory in a fresh process.

    time_interleaved(fns, rounds, warmup, sync)   every callable once per round, order rotated
    paired_ratio(ts, base_ts), summarize(times)   geometric-mean ratio to a base, 95% interval
    inference_ratios(models, "base")              forward and cached decoding of each model,
                                                  timed interleaved, as ratios to the base
    peak_training_memory(build, *args)            peak memory of a few training steps (CPU)

Why interleaved and paired: a shared machine swings one timing by 5-10%; a slow moment hits
every model of the same round, so a round's ratio to the base keeps little of it (bench.py's
docstring and docs/bench.md say more).

Reading order: the harness -> intervals -> inference latency of models -> peak memory -> the
machine's name.
"""

import concurrent.futures
import copy
import math
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from model import KVCache
from support.prefix import special_positions

# ---------------------------------------------------------------- the harness

# wall: latency as a user sees it. cpu: this process's CPU time, which other processes on a
# shared machine inflate far less (with --threads 1 it is the compute time; with more threads it
# sums them, so it is no longer a latency).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares the parameter tensors: arms that only add modules
    cost no second copy of the weights (deepcopy's memo maps each parameter to itself)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def synchronizer(device: str):
    """-> a function that waits for the kernels queued on device (a no-op off CUDA). Every
    torch.cuda call here names the device: without it, it acts on the current GPU, which is
    cuda:0 for --device cuda:1."""
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(fns: dict, rounds: int, warmup: int, sync, desc="",
                     clock=time.perf_counter) -> dict:
    """fns: name -> callable. Warm each up, then run every arm once per round, the order rotated
    each round so none always runs first. Returns name -> seconds, one per round."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync()
    times = {n: [] for n in names}
    for r in tqdm(range(rounds), desc=desc, leave=False, disable=None):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = clock()
            fns[name]()
            sync()
            times[name].append(clock() - t0)
    return times


# ---------------------------------------------------------------- intervals


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with df >= 1 degrees of freedom: a two-sided 95%
    interval's half-width in standard errors. Exact for df 1 and 2 (closed forms); from df 3 the
    expansion in powers of 1/df of Abramowitz & Stegun 26.7.5, within 0.2% of the exact value
    (3.179 against 3.182 at df 3, closer above)."""
    if df == 1:
        return math.tan(math.pi * 0.475)
    if df == 2:
        return 0.95 / math.sqrt(2 * 0.975 * 0.025)
    z = statistics.NormalDist().inv_cdf(0.975)
    g = [(z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
         (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
         (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160]
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def paired_ratio(ts, base_ts):
    """Seconds per round of an arm and of the base, timed in alternation within each round ->
    (geometric mean of the per-round ratios ts[i] / base_ts[i], their 95% interval [lo, hi]).

    The interval is a Student t-interval on the log-ratios, exponentiated:
    exp(mean ± t(0.975, n - 1) · sd / sqrt(n)). Paired, so a slow moment of the machine, which
    hits both sides of a round's ratio, leaves it; in logs, because timing noise multiplies
    and a ratio and its inverse are then symmetric. It assumes the rounds' log-ratios are
    independent and about normal; a few outlying rounds widen it. With one round there is no
    interval: None."""
    logs = [math.log(t / b) for t, b in zip(ts, base_ts)]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), None
    half = t_quantile_975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), [math.exp(mean - half), math.exp(mean + half)]


def summarize(times: dict, base: str, per: int = 1) -> dict:
    """times: arm -> seconds per round. -> per arm: mean, std and median in ms (per item:
    per=tokens per call), and the ratio to base with its 95% interval (paired_ratio)."""
    out = {}
    for name, ts in times.items():
        ms = [t * 1e3 / per for t in ts]
        ratio, ci = paired_ratio(ts, times[base])
        out[name] = dict(mean_ms=statistics.fmean(ms),
                         std_ms=statistics.stdev(ms) if len(ms) > 1 else 0.0,
                         median_ms=statistics.median(ms), ratio_to_base=ratio, ratio_ci95=ci,
                         trials=len(ms))
    return out


# ---------------------------------------------------------------- inference latency of models


def context_positions(model) -> int:
    """Positions of the model's context its method takes from every sequence: l_p + l_i for
    prefix tuning (model.prefix, as support/prefix.py sets it; LoRA §3: prefix tuning "reserves
    a part of the sequence length"), 0 for any other model (LoRA, adapters, the base): the
    method's own count, support.prefix.special_positions, read off the model."""
    return special_positions(getattr(model, "method_config", None))


def end_with_separator(idx, models):
    """idx (B, T) token ids -> idx with its last column set to the separator after which the
    models' prefix tuning puts its infix (support/prefix.py: E2E's " ||",
    support.prefix.SEPARATOR, unless the model was given another), so every row has one and
    the infix finds its place; idx itself when no model has an infix. Every model gets this same
    input: a fixed last token costs the others no time. models: a dict name -> model; models
    whose separators differ are a ValueError (no one input fits both)."""
    seps = {m.prefix.separator for m in models.values()
            if getattr(m, "prefix", None) is not None and m.prefix.l_i > 0}
    if len(seps) > 1:
        raise ValueError(f"the prefix models' separators differ ({sorted(seps)}): one input "
                         f"cannot end with all of them")
    if not seps:
        return idx
    idx = idx.clone()
    idx[:, -1] = seps.pop()
    return idx


def cached_decoder(model, prompt, tokens):
    """-> a callable that decodes `tokens` one at a time with the KV cache after `prompt`, as
    decoding.generate does, and returns the last token's logits (B, 1, vocab).

    prompt (B, P) runs here, once (the prefill, not timed); each call rewinds the cache to the
    end of the prefill and feeds tokens (n, B, 1), one (B, 1) at a time with last_only=True. A
    prefix model's prefill also caches its l_p + l_i special tokens (support/prefix.py grows
    the cache for them), so the rewind is to the length the prefill left, not to P. Runs in
    inference mode (no autograd graph, even for a method's trainable tensors)."""
    B, P = prompt.shape
    with torch.inference_mode():
        cache = KVCache(model.config, B, P + len(tokens), prompt.device, model.wte.weight.dtype)
        model(prompt, cache=cache)  # prefill
    filled = cache.length

    @torch.inference_mode()
    def run():
        cache.length = filled
        for t in tokens:
            logits = model(t, cache=cache, last_only=True)  # (B, 1, vocab)
        return logits
    return run


@torch.inference_mode()
def inference_ratios(models: dict, base="base", *, seq=128, prompt=64, tokens=32, rounds=10,
                     warmup=2, clock=time.perf_counter, device="cpu") -> dict:
    """Inference latency of every model as a ratio to models[base], as bench.py measures it:

    - forward: one forward pass of a batch 1 × seq of random tokens -> logits (1, seq, vocab);
    - decode: after a prompt-token prefill (not timed), `tokens` tokens decoded one at a time
      with the KV cache (cached_decoder), per decoded token.

    Every model is timed interleaved with the others round after round (time_interleaved,
    `warmup` untimed calls each first), and each ratio is a paired_ratio against the base: the
    geometric mean over `rounds` rounds with its 95% interval (None from a single round). The
    inputs are the same for every model, drawn from a fixed seed, with the last token of the
    forward's sequence and of the prompt set to the prefix models' separator
    (end_with_separator), so PreEmbed and PreLayer (support/prefix.py) find where their infix
    goes. A prefix model then runs seq + l_p + l_i positions in the forward and attends to
    l_p + l_i more cached ones when decoding: its cost grows with the prefix's length.

    models: name -> a GPT (plain, LoRA merged or not, adapters, prefix tuning), on `device`,
    sharing one vocabulary; each runs in eval mode here and is left in the mode it came in.
    clock: time.perf_counter (wall) or time.process_time (this process's CPU time), CLOCKS.
    -> name -> dict(forward_ratio, forward_ci95, decode_ratio, decode_ci95, forward_ms,
    decode_ms_per_token): the ratios to the base (the base's are 1.0, and from two rounds on its
    intervals [1.0, 1.0]) and the median over rounds of a forward in ms and of a decoded token
    in ms. Bad settings or
    lengths that do not fit a model's block_size: ValueError, before anything runs."""
    if base not in models:
        raise ValueError(f"base {base!r} is not among the models {list(models)}")
    for name, v, low in (("seq", seq, 1), ("prompt", prompt, 1), ("tokens", tokens, 1),
                         ("rounds", rounds, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    for name, m in models.items():
        n, size = context_positions(m), m.config.block_size
        if seq + n > size or prompt + n + tokens > size:
            raise ValueError(f"{name}: seq {seq} or prompt {prompt} + tokens {tokens}, plus the "
                             f"{n} positions its method takes, exceeds its block_size {size}")
    vocab = models[base].config.vocab_size
    g = torch.Generator().manual_seed(0)
    idx = end_with_separator(torch.randint(0, vocab, (1, seq), generator=g), models).to(device)
    start = end_with_separator(torch.randint(0, vocab, (1, prompt), generator=g), models)
    new = torch.randint(0, vocab, (tokens, 1, 1), generator=g).to(device)
    modes = {name: m.training for name, m in models.items()}
    sync = synchronizer(device)
    try:
        for m in models.values():
            m.eval()  # dropout off: inference, as decoding.generate's callers run it
        fwd = time_interleaved({name: (lambda m=m: m(idx)) for name, m in models.items()},
                               rounds, warmup, sync, "forward", clock)
        decoders = {name: cached_decoder(m, start.to(device), new) for name, m in models.items()}
        dec = time_interleaved(decoders, rounds, warmup, sync, "decode", clock)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    fwd, dec = summarize(fwd, base), summarize(dec, base, per=tokens)
    return {name: dict(forward_ratio=fwd[name]["ratio_to_base"],
                       forward_ci95=fwd[name]["ratio_ci95"],
                       decode_ratio=dec[name]["ratio_to_base"],
                       decode_ci95=dec[name]["ratio_ci95"],
                       forward_ms=fwd[name]["median_ms"],
                       decode_ms_per_token=dec[name]["median_ms"]) for name in models}


# ---------------------------------------------------------------- peak memory


def _rss_bytes(field: str):
    """VmRSS (resident now) or VmHWM (resident at peak) of this process in bytes, from Linux's
    /proc; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _max_rss_bytes() -> int:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def rss_now() -> int:
    """This process's resident set size now, in bytes: VmRSS on Linux; elsewhere the peak so far
    (ru_maxrss), the nearest figure there."""
    return _rss_bytes("VmRSS") or _max_rss_bytes()


def reset_peak_mark() -> str:
    """Reset this process's peak resident mark to its resident size now, so that what ran
    before (building a model, reading a checkpoint) is not counted -> the method peak_rss_since
    then uses: "VmHWM - VmRSS before build" on Linux >= 4.0 (/proc/self/clear_refs), else
    "ru_maxrss - RSS before build" (no reset: the peak since the process started)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now (Linux >= 4.0)
        return "VmHWM - VmRSS before build"
    except OSError:
        return "ru_maxrss - RSS before build"


def peak_rss_since(before: int, method: str) -> int:
    """Peak resident bytes since reset_peak_mark (which returned method), less `before` (the
    rss_now() taken before the model was built): the memory the training steps peaked at,
    the model's own tensors included."""
    peak = _rss_bytes("VmHWM") if method.startswith("VmHWM") else _max_rss_bytes()
    return peak - before


def peak_training_memory(build, *args, steps=2, threads=None) -> dict:
    """Peak memory of `steps` training steps, measured in a fresh process -> dict(peak_bytes=int,
    memory_method=str).

    The process is started with multiprocessing's "spawn" (not fork), so nothing of this
    process's memory is in it. There, `step = build(*args)` builds the model and its optimizer
    and returns a zero-argument callable that runs one optimizer step; build must be a
    module-level (picklable) function, and args picklable. The peak mark is reset after build
    (reset_peak_mark), then step() runs `steps` times (Adam's state is allocated in the first);
    peak_bytes is the peak resident set size less the resident size before build
    (peak_rss_since), so it counts the model, the optimizer state, the activations and whatever
    freed memory the allocator held, but neither the interpreter nor torch. With no swap every
    tensor written is resident, so it is at least the peak of live tensors.

    CPU only: a model on a GPU is not resident in this memory (bench.py reads
    torch.cuda.max_memory_allocated for that). threads: torch threads in the child (None:
    torch's default). An error in the child, or its death, is an OSError with its message."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(_peak_child, build, args, steps, threads).result()
        except Exception as e:  # the child's error, re-raised here; BrokenProcessPool if it died
            raise OSError(f"the memory probe failed in its process: {type(e).__name__}: {e}") \
                from None


def _peak_child(build, args, steps, threads) -> dict:
    """peak_training_memory's work, in the fresh process."""
    if threads is not None:
        torch.set_num_threads(threads)
    before = rss_now()
    step = build(*args)
    method = reset_peak_mark()
    for _ in range(steps):
        step()
    return dict(peak_bytes=peak_rss_since(before, method), memory_method=method)


# ---------------------------------------------------------------- the machine


def cpu_name() -> str:
    """The CPU's model name and architecture, from Linux's /proc/cpuinfo, else platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()
