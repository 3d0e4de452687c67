"""Timing and memory measurement shared by bench.py and experiments/methods.py: models timed in
alternation, paired ratios with 95% intervals, and the peak memory of a process.

    time_interleaved(fns, rounds, warmup, sync)   every callable once per round, order rotated
    paired_ratio(ts, base_ts), summarize(times)   geometric-mean ratio to a base, 95% interval

Why interleaved and paired: a shared machine swings one timing by 5-10%; a slow moment hits
every model of the same round, so a round's ratio to the base keeps little of it (bench.py's
docstring and docs/bench.md say more).

Reading order: the harness -> intervals -> cached decoding -> peak memory -> the machine's
name.
"""

import copy
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from model import KVCache

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


# ---------------------------------------------------------------- cached decoding


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
