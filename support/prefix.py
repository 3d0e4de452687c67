"""Prefix tuning as §5.1 of the LoRA paper (Hu et al. 2021) defines it: PreEmbed and PreLayer.

§5.1: PreEmbed "inserts special tokens among the input tokens. These special tokens have
trainable word embeddings and are generally not in the model's vocabulary"; l_p of them are
prepended to the prompt ("prefixing"), l_i appended to it ("infixing"), both from Li & Liang
(2021), "Prefix-Tuning: Optimizing Continuous Prompts for Generation". PreLayer learns "the
activations after every Transformer layer. The activations computed from previous layers are
simply replaced by trainable ones."

Where the special tokens go. The prefix takes positions 0 .. l_p - 1; the infix follows the
prompt, which ends at the first `separator` token of each row: E2E's " ||"
(data/e2e/prepare.format_prompt). So a row of the training data, prompt + completion, and a
prompt alone in generation both find their place without being told the prompt's length. The
special tokens take positions of the model's context, l_p + l_i of them (§3: prefix tuning
"reserves a part of the sequence length").

How, without editing model.py: hooks on the model from outside. A forward pre-hook on the GPT
inserts the special tokens into idx (their targets -100) and the forward hook takes them out of
the logits again, so the model keeps its contract: idx (B, T) -> logits (B, T, vocab). The
replacement itself is a forward hook on wte (PreEmbed) or a forward pre-hook on every block
(PreLayer); they read `slots`, where the special tokens of the running forward are. With a
KVCache the special tokens run once, in the first chunk (the prefill), and stay in the cache;
the prefill adds l_p + l_i positions to it, since its caller sized it for its own tokens.
"""

import numbers

import torch
import torch.nn as nn

from data.datasets import IGNORE
from support.baselines import freeze_base

SEPARATOR = 8614  # " ||", the last token of every E2E prompt in GPT-2's BPE
# " table-to-text" in GPT-2's BPE: Li & Liang initialize prefixes from real words and found
# task-relevant ones better; "table-to-text" is their word for E2E. Cycled to l_p + l_i tokens.
INIT_TOKENS = (3084, 12, 1462, 12, 5239)


class _SpecialTokens(nn.Module):
    """Where the l_p prefix and l_i infix special tokens go, for PreEmbed and PreLayer."""

    def __init__(self, l_p: int, l_i: int, separator: int):
        super().__init__()
        self.l_p, self.l_i, self.separator = l_p, l_i, separator
        self.n = l_p + l_i
        self.slots = None  # (B, T + n) of the running forward: k at special token k, else -1
        self.dest = None  # (B, T): where each input token went

    def attach(self, model):
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, model, args, kwargs):
        """GPT.forward's arguments with the special tokens inserted (not after the prefill)."""
        idx = args[0]
        targets = args[1] if len(args) > 1 else kwargs.pop("targets", None)
        cache = kwargs.get("cache")
        self.slots = self.dest = None
        if cache is not None and cache.length > 0:  # decoding: the special tokens are cached
            return (idx, targets), kwargs
        idx, targets, kwargs["target_index"] = self.insert(idx, targets,
                                                           kwargs.get("target_index"))
        if cache is not None:
            _make_room(cache, self.n)
        return (idx, targets), kwargs

    def _after(self, model, args, kwargs, out):
        """Logits of the input tokens only, (B, T, vocab), where all positions were asked for."""
        dest, self.slots, self.dest = self.dest, None, None
        if dest is None or args[1] is not None or kwargs.get("last_only"):
            return out  # a loss (its targets were moved), the last position, or decoding
        return out.gather(1, dest[..., None].expand(-1, -1, out.size(-1)))  # (B, T, V)

    def insert(self, idx, targets=None, target_index=None):
        """idx (B, T) -> (idx (B, T + n), targets (B, T + n) or None, target_index or None)
        with the special tokens in place: placeholders 0 in idx (their embeddings or
        activations are replaced), targets -100 on them. A target moves with its token's
        prediction: the one on the prompt's last token moves to the last infix token, which now
        predicts the completion's first token. Sets self.slots and self.dest."""
        B, T = idx.shape
        dev = idx.device
        j = torch.arange(T, device=dev)
        q = self.prompt_end(idx)  # (B, 1): first position after the prompt
        self.dest = j + self.l_p + self.l_i * (j >= q)  # (B, T): where token j goes
        new = torch.zeros(B, T + self.n, dtype=idx.dtype, device=dev).scatter_(1, self.dest, idx)
        where = torch.cat([torch.arange(self.l_p, device=dev).expand(B, -1),
                           q + self.l_p + torch.arange(self.l_i, device=dev)], dim=1)  # (B, n)
        self.slots = torch.full((B, T + self.n), -1, device=dev).scatter_(
            1, where, torch.arange(self.n, device=dev).expand(B, -1))
        if targets is None:
            return new, None, None
        ydest = j + self.l_p + self.l_i * (j >= q - 1)  # (B, T): where token j's target goes
        new_y = torch.full_like(new, IGNORE).scatter_(1, ydest, targets)
        if target_index is not None:  # flat positions of the targets in B*T -> in B*(T + n)
            b, t = target_index // T, target_index % T
            target_index = b * (T + self.n) + ydest[b, t]
        return new, new_y, target_index

    def prompt_end(self, idx):
        """(B, 1): the position after the first separator of each row (0 without infix)."""
        if self.l_i == 0:
            return torch.zeros(idx.size(0), 1, dtype=torch.long, device=idx.device)
        is_sep = idx == self.separator
        if not bool(is_sep.any(dim=1).all()):  # a host sync, once per forward
            row = int((~is_sep.any(dim=1)).nonzero()[0])
            raise ValueError(f"row {row} has no separator token {self.separator}: the infix "
                             f"goes after the prompt, which ends at the first separator")
        return is_sep.int().argmax(dim=1, keepdim=True) + 1

    def _replace(self, x, tensor):
        """x (B, T + n, C) with tensor[k] (n, C) at special token k's positions."""
        if self.slots is None:
            return x
        special = tensor[self.slots.clamp(min=0)].to(x.dtype)  # (B, T + n, C)
        return torch.where(self.slots[..., None] >= 0, special, x)


class PreEmbed(_SpecialTokens):
    """PreEmbed's tensor: `embeddings` (l_p + l_i, d_model), the special tokens' word embeddings
    (position embeddings are added to them as to any token's)."""

    def __init__(self, model, l_p, l_i, separator, init_tokens):
        super().__init__(l_p, l_i, separator)
        ids = _cycled(init_tokens, self.n, model.wte.weight.device)
        # Li & Liang: real words' embeddings, not noise (random init trains worse, less stably)
        self.embeddings = nn.Parameter(_fp32(model.wte.weight[ids]))  # (n, C)
        self.attach(model)
        model.wte.register_forward_hook(lambda m, args, out: self._replace(out, self.embeddings))


class PreLayer(_SpecialTokens):
    """PreLayer's tensor: `activations` (L, l_p + l_i, d_model). activations[i] replaces the
    special tokens' input to block i: the activation after the embedding layer (wte + wpe) for
    i = 0, after block i - 1 otherwise. These are the L activations that matter: the last
    block's output at a special position reaches only that position's logits, which nothing
    reads. Since a special token's input is replaced in every block, its keys and values there
    depend only on activations[i] (through the frozen ln_1 and c_attn), never on the prompt.

    Li & Liang's prefix-tuning differs: it trains each layer's keys and values of the prefix
    directly (2 × L × d_model per token, "past_key_values"), and through a reparametrization,
    P = MLP(P') with a larger P', during training only, for stability. §5.1 counts and replaces
    activations instead, L × d_model per token, with no MLP; here they start from real
    activations, which Li & Liang also found to stabilize training."""

    def __init__(self, model, l_p, l_i, separator, init_tokens):
        super().__init__(l_p, l_i, separator)
        ids = _cycled(init_tokens, self.n, model.wte.weight.device)
        self.activations = nn.Parameter(_fp32(_block_inputs(model, ids)))  # (L, n, C)
        self.attach(model)
        for i, block in enumerate(model.h):
            block.register_forward_pre_hook(
                lambda m, args, i=i: (self._replace(args[0], self.activations[i]), *args[1:]))


def pre_embed(model, l_p: int, l_i: int, separator: int = SEPARATOR,
              init_tokens=INIT_TOKENS):
    """PreEmbed (LoRA §5.1; Li & Liang 2021): l_p prefix and l_i infix special tokens with
    trainable embeddings; everything else frozen. |Θ| = d_model × (l_p + l_i).
    Init: the embeddings of init_tokens (default " table-to-text"), cycled to l_p + l_i. In
    place; returns the model. model.prefix holds the PreEmbed."""
    return _prefix(PreEmbed, "pre_embed", model, l_p, l_i, separator, init_tokens)


def pre_layer(model, l_p: int, l_i: int, separator: int = SEPARATOR,
              init_tokens=INIT_TOKENS):
    """PreLayer (LoRA §5.1): the special tokens' activations at the input of every block are
    trainable (see PreLayer); everything else frozen. |Θ| = L × d_model × (l_p + l_i).
    Init: the activations the base computes on init_tokens (default " table-to-text"), cycled
    to l_p + l_i tokens and run as one sequence. In place; returns the model."""
    return _prefix(PreLayer, "pre_layer", model, l_p, l_i, separator, init_tokens)


def prefix_params(method: str, config, l_p: int, l_i: int) -> int:
    """|Θ| of §5.1: d_model × (l_p + l_i) for PreEmbed, L times that for PreLayer."""
    n = config.n_embd * (l_p + l_i)
    return n * config.n_layer if method == "pre_layer" else n


def special_positions(method_config) -> int:
    """How many positions of the model's context a method's special tokens take: l_p + l_i
    for PreEmbed and PreLayer, 0 for every other method and for None (LoRA §3: "reserving a
    part of the sequence length for adaptation necessarily reduces the sequence length
    available to process a downstream task"). method_config: a model's, or what a method file
    records ({"method": name, **settings}, support.methods.read_method)."""
    if not method_config or method_config.get("method") not in ("pre_embed", "pre_layer"):
        return 0
    return method_config["l_p"] + method_config["l_i"]


def check_separator(method_config, ids):
    """ids (a prompt's token ids) must hold the separator when the method has infix tokens
    (l_i > 0), which go after it: one ValueError, for a caller to raise before it prints or
    generates anything (the forward refuses such a row too, but only once it runs)."""
    if special_positions(method_config) and method_config["l_i"] and \
            method_config["separator"] not in ids:
        raise ValueError(f"the prompt has no separator token {method_config['separator']}: "
                         f"the method's {method_config['l_i']} infix tokens go after it (E2E: "
                         f"end the prompt with ' ||')")


def _prefix(cls, method, model, l_p, l_i, separator, init_tokens):
    c = model.config
    for name, v, low in (("l_p", l_p, 0), ("l_i", l_i, 0), ("separator", separator, 0)):
        if not _is_int(v) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if not 1 <= l_p + l_i < c.block_size:
        raise ValueError(f"l_p + l_i must be in [1, block_size {c.block_size}), got {l_p + l_i}")
    init_tokens = list(init_tokens)
    ids = (*init_tokens, separator) if l_i else init_tokens  # no infix: no separator needed
    if not init_tokens or not all(_is_int(t) and 0 <= t < c.vocab_size for t in ids):
        raise ValueError(f"init_tokens (not empty) and the separator (with an infix) must be "
                         f"token ids in [0, {c.vocab_size}): got {init_tokens!r}, {separator!r}")
    freeze_base(model)
    model.prefix = cls(model, l_p, l_i, separator, init_tokens)  # its tensor: requires_grad
    model.method_config = dict(method=method, l_p=l_p, l_i=l_i, separator=separator,
                               init_tokens=[int(t) for t in init_tokens])
    return model


@torch.no_grad()
def _block_inputs(model, ids):
    """ids (n,) run through the base as one sequence, in eval mode (no dropout) -> each block's
    input (L, n, C), as GPT.forward computes them."""
    was = model.training
    model.eval()
    x = model.wte(ids[None]) + model.wpe(torch.arange(len(ids), device=ids.device))  # (1, n, C)
    out = []
    for block in model.h:
        out.append(x[0])
        x = block(x)
    model.train(was)
    return torch.stack(out)  # (L, n, C)


def _make_room(cache, n: int):
    """n more positions in every buffer of a KVCache (model.KVCache: (B, nh, max_len, hs))."""
    grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], n, t.shape[3])], dim=2)  # noqa
    cache.k, cache.v = [grow(t) for t in cache.k], [grow(t) for t in cache.v]


def _cycled(tokens, n: int, device):
    return torch.tensor([tokens[k % len(tokens)] for k in range(n)], device=device)


def _fp32(t):
    """A new fp32 copy (fp64 stays fp64): trainable tensors stay fp32 on a half base."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32), copy=True)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
