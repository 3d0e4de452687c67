"""Decoding: how tokens are chosen from GPT-2's next-token distribution.

    sample_next          argmax, or a sample after temperature, top-k and top-p
    generate             one prompt pass, then one token per step against the KV cache
    beam_search          the paper's E2E decoding: 10 beams, length penalty 0.9, no repeated
                         4-grams (LoRA Table 11), with transformers' semantics
    ban_repeated_ngrams  the n-gram ban beam search applies each step
    completions          the generated part of each row, cut at <|endoftext|>
    check_fits, check_sampling   bad lengths and settings: one ValueError, before any token

None of this depends on LoRA: a merged adapter is plain weights (§4.1), an unmerged one is part
of the model's forward. Only beam search needs to know about adapters, for one reason: under
adapters.use_adapters each row has its adapter id, and the beams it grows into must keep it.
Of the other methods (support/methods.py), only prefix tuning shows here: its special tokens
take positions of the context, which check_fits counts (support/prefix.py inserts them).

Reading order: sample_next -> generate -> beam_search -> ban_repeated_ngrams.
"""

import math
import numbers

import torch
import torch.nn.functional as F

from model import KVCache
from support.adapters import repeat_adapter_ids
from support.common import EOT_TOKEN
from support.prefix import special_positions


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_fits(model, prompt_len, max_new_tokens, special=None):
    """Bad lengths as one clear ValueError, before any token is generated (or printed): an empty
    prompt, max_new_tokens not an integer >= 1, or prompt + new tokens + special tokens longer
    than the model's block_size. special: the context positions a prefix method's special
    tokens take (l_p + l_i, LoRA §3); None: those of the method on the model
    (prefix.special_positions), 0 without one. A caller that checks before it loads the method
    passes the file's count."""
    if special is None:
        special = special_positions(getattr(model, "method_config", None))
    if prompt_len == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prompt_len + max_new_tokens + special > model.config.block_size:
        tokens = f" + the method's special tokens (l_p + l_i = {special})" if special else ""
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens})"
                         f"{tokens} exceeds the model's block_size {model.config.block_size}")


def check_sampling(temperature=1.0, top_k=None, top_p=None, greedy=False):
    """Sampling settings out of range as one clear ValueError: temperature >= 0 and finite
    (unless greedy, which ignores it), top_k an integer >= 1, top_p in (0, 1] (None: off)."""
    if not greedy and not (isinstance(temperature, numbers.Real) and 0 <= temperature < math.inf):
        raise ValueError(f"temperature must be >= 0 and finite (0: argmax), got {temperature}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1 (None: off), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (None: off), got {top_p!r}")


def sample_next(logits, *, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """Pick the next token of each row from logits (B, vocab) -> (B,): argmax (greedy, or
    temperature 0), or a sample after temperature, top-k (keep the k largest) and top-p (keep the
    smallest set of the most likely tokens whose probability reaches p, to within 1e-6). Bad
    settings: ValueError (check_sampling); so are nan or inf logits (a model whose weights
    diverged), which would otherwise pick garbage."""
    check_sampling(temperature, top_k, top_p, greedy)
    _refuse_nonfinite(~logits.isfinite().all())
    return _choose(logits, temperature, top_k, top_p, greedy, generator)


def _refuse_nonfinite(bad):
    if bool(bad):  # a host sync: done once where it matters, not for every token
        raise ValueError("the model's logits are nan or inf: its weights are broken (a run that "
                         "diverged?); train it again with a lower --lr")


def _choose(logits, temperature, top_k, top_p, greedy, generator):
    """sample_next without its checks, and without a host sync."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.double().softmax(dim=-1)  # float64: the sums round off ~1e-16
        before = probs.cumsum(dim=-1) - probs  # the mass of the more likely tokens
        # p already reached: drop. The 1e-6 absorbs the float32 logits' rounding (~1e-7), so an
        # exact boundary (.5 + .3 = .8) cannot keep one token too many; the first is always kept.
        drop_sorted = before >= top_p - 1e-6
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
             greedy=False, eos_token=None, use_cache=True, generator=None, stream=None):
    """Continue each row of idx (B, T) by up to max_new_tokens tokens; returns (B, T + n).

    With the cache (default) the prompt runs once and each step feeds only the new token;
    use_cache=False recomputes the whole sequence every step: the slow, obvious reference.
    A row that emits eos_token keeps emitting it; generation stops when every row has.
    stream: optional callable given each new column of tokens (B,) as it is produced.
    Bad lengths (check_fits) and sampling settings (check_sampling) are a ValueError, raised
    before the prompt runs; so are nan or inf logits, checked without a host sync a token: on
    the prompt's logits, before each column is streamed, and once at the end.
    """
    B, T = idx.size()
    check_fits(model, T, max_new_tokens)
    check_sampling(temperature, top_k, top_p, greedy)
    cache = None
    if use_cache:
        cache = KVCache(model.config, B, T + max_new_tokens, idx.device,
                        model.wte.weight.dtype)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    bad = torch.zeros((), dtype=torch.bool, device=idx.device)  # a nan or inf logit so far
    step_input = idx
    for step in range(max_new_tokens):
        if cache is None:
            step_input = idx
        logits = model(step_input, cache=cache, last_only=True)[:, -1, :]  # (B, vocab)
        finite = logits.isfinite().all(dim=-1, keepdim=True)  # (B, 1)
        bad |= ~finite.all()
        if step == 0 or stream is not None:  # before any token chosen from them leaves
            _refuse_nonfinite(bad)
        # A row refused later must not crash torch.multinomial meanwhile: it samples from zeros.
        nxt = _choose(logits.where(finite, 0.0), temperature, top_k, top_p, greedy,
                      generator)  # (B,)
        if eos_token is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token), nxt)
            done |= nxt == eos_token
        idx = torch.cat([idx, nxt[:, None]], dim=1)  # (B, T + steps so far)
        step_input = nxt[:, None]  # (B, 1)
        if stream is not None:
            stream(nxt)
        if eos_token is not None and bool(done.all()):
            break
    _refuse_nonfinite(bad)
    return idx


@torch.no_grad()
def beam_search(model, idx, beams, max_new_tokens, length_penalty=1.0, no_repeat_ngram_size=0,
                eos_token=EOT_TOKEN, early_stopping=False):
    """Beam search for one prompt idx (1, T) -> the best sequence (1, T + n), its eos_token
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
      (under adapters.use_adapters, every beam keeps the prompt's adapter id);
    - stop when `beams` hypotheses exist and (early_stopping, or the best running beam's score
      divided by its current length**length_penalty is no better than the worst hypothesis).
    no_repeat_ngram_size n > 0: a token that would repeat an n-gram of the sequence (prompt
    included) gets probability 0. With beams=1 and no n-gram ban this is greedy decoding.
    ValueError: idx not (1, T), beams not an integer >= 1, length_penalty not finite,
    no_repeat_ngram_size not an integer >= 0, or bad lengths (check_fits). Memory grows with
    beams: each has its own KV cache and row of logits.
    """
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ValueError("beam_search takes one prompt: idx of shape (1, T)")
    if not (_is_int(beams) and beams >= 1):
        raise ValueError(f"beams must be an integer >= 1, got {beams!r}")
    if not (isinstance(length_penalty, numbers.Real) and math.isfinite(length_penalty)):
        raise ValueError(f"length_penalty must be finite, got {length_penalty!r}")
    if not (_is_int(no_repeat_ngram_size) and no_repeat_ngram_size >= 0):
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0: off), got "
                         f"{no_repeat_ngram_size!r}")
    T = idx.size(1)
    check_fits(model, T, max_new_tokens)
    cache = KVCache(model.config, 1, T + max_new_tokens, idx.device, model.wte.weight.dtype)
    logits = model(idx, cache=cache, last_only=True)[:, -1]  # (1, V): the prompt runs once
    bad = ~logits.isfinite().all()  # a nan or inf logit so far: refused at the end
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
        # The step's one host sync: scores, ends and sources of the candidates, for the
        # hypotheses and the stop test (float64 holds the float32 scores and the ids exactly).
        cand_h, ends_h, src_h = torch.stack([cand.double(), ends.double(), src.double()]).tolist()
        for r in range(beams):  # only the best `beams` continuations may become hypotheses
            if ends_h[r]:
                hyps.append((cand_h[r] / step ** length_penalty,
                             torch.cat([seqs[int(src_h[r])], tok[r:r + 1]])))
        hyps = sorted(hyps, key=lambda h: h[0], reverse=True)[:beams]
        if last:
            break
        # The best continuations that go on: at most `beams` end (one eos per beam), so there
        # are `beams` others; a stable sort puts them first, in their order.
        keep = ends.int().argsort(stable=True)[:beams]
        scores = cand[keep]
        seqs = torch.cat([seqs[src[keep]], tok[keep, None]], dim=1)  # (beams, T + step)
        cache.reorder(src[keep])
        best = next(c for c, e in zip(cand_h, ends_h) if not e)  # scores[0], on the host
        if len(hyps) == beams and (early_stopping
                                   or best / step ** length_penalty <= hyps[-1][0]):
            break
        # The prompt ran as one row; its adapter id (use_adapters) must follow all its beams.
        with repeat_adapter_ids(model, beams):
            logits = model(tok[keep, None], cache=cache, last_only=True)[:, -1]  # (beams, V)
        bad |= ~logits.isfinite().all()
    _refuse_nonfinite(bad)
    return hyps[0][1][None]


def ban_repeated_ngrams(seqs, logp, n):
    """seqs (B, T), logp (B, V) -> logp with -inf for every token that would complete an n-gram
    already in the row's sequence (transformers' NoRepeatNGramLogitsProcessor; Table 11 bans
    repeated 4-grams). On the device, without a host sync; logp is not modified in place."""
    T = seqs.size(1)
    if T < n:  # no n-gram yet
        return logp
    grams = seqs.unfold(1, n, 1)  # (B, T - n + 1, n): every n-gram of each row
    seen = (grams[:, :, :-1] == seqs[:, None, T - n + 1:]).all(dim=-1)  # (B, T - n + 1):
    # the n-grams that start with the row's last n - 1 tokens; their last tokens are banned
    banned = torch.zeros_like(logp).scatter_add_(1, grams[:, :, -1], seen.to(logp.dtype))
    return logp.masked_fill(banned > 0, float("-inf"))  # (B, V)


def completions(out, prompt_len, eos_token=EOT_TOKEN):
    """The generated part of each row of out (B, prompt_len + n) -> (completions, n_generated):
    each row's new tokens as a list, cut before eos_token, and how many tokens were produced in
    all (an eos_token that ends a row counts; the eos_token generate repeats after it does not)."""
    comps, n_generated = [], 0
    for row in out[:, prompt_len:].tolist():
        end = row.index(eos_token) if eos_token in row else len(row)
        comps.append(row[:end])
        n_generated += min(end + 1, len(row))
    return comps, n_generated
