"""LoRA: Low-Rank Adaptation (Hu et al. 2021, arXiv 2106.09685) of model.py's GPT-2: §4 of the
paper, top to bottom.

    §4.1 eq. 3  h = W0 x + ΔW x = W0 x + B A x                 LoRALinear.forward
    §4.1        A random, B = 0, so ΔW = B A = 0 at first       LoRALinear.reset_lora_parameters
    §4.1        then (text after eq. 3) scale ΔW x by α/r       LoRALinear.scaling
    §4.2        adapt attention weights only; W_q and W_v in    apply_lora(targets=("q", "v"))
                Table 5 (and GPT-2's Table 11)
    §4.1        merge W = W0 + B A: no inference latency        merge_lora / unmerge_lora
    §4.1        a small task-specific state                     lora_state_dict
    §5.1        |Θ| = 2 × L̂ × d_model × r                       paper_num_params

What practitioners need around it is built on this module's public names: adapter files, task
switching and several adapters in one batch in support/adapters.py, PEFT's adapter files in
support/peft_io.py.
"""

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.exact_merge import ExactMerge, fp32_delta

# What each target adapts inside every block: (module, its input width, first row, row after the
# last) in units of C = n_embd. GPT-2 fuses W_q, W_k, W_v into one (3C, C) matrix, c_attn; each of
# q, k, v is a slice of its rows with its own A and B. "qkv" is one LoRA over the whole fused
# matrix (what PEFT does on GPT-2: one A shared by q, k and v). "mlp" adapts both MLP matrices.
_TARGETS = {
    "q": [("attn.c_attn", 1, 0, 1)],
    "k": [("attn.c_attn", 1, 1, 2)],
    "v": [("attn.c_attn", 1, 2, 3)],
    "qkv": [("attn.c_attn", 1, 0, 3)],
    "o": [("attn.c_proj", 1, 0, 1)],
    "mlp": [("mlp.c_fc", 1, 0, 4), ("mlp.c_proj", 4, 0, 1)],
}
TARGETS = tuple(_TARGETS)
BIAS_OPTIONS = ("none", "all", "lora_only")
_HALF = (torch.float16, torch.bfloat16)


class LoRALinear(nn.Linear):
    """A frozen nn.Linear W0 plus trainable low-rank updates ΔW = B A on chosen rows of its output.

    slices: {name: (start, stop)}: output rows start:stop of W0 get their own A (r, in_features)
    and B (stop - start, r). A whole matrix is one slice; GPT-2's fused c_attn gets separate "q",
    "k", "v" slices, so each is adapted on its own and a slice left out costs nothing. The layer
    *is* the nn.Linear (same weight and bias tensors, same state-dict keys); the LoRA tensors
    are added beside them as lora_A.<name> and lora_B.<name>, in fp32 whatever W0's dtype.
    """

    def __init__(self, base: nn.Linear, slices: dict, rank: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False):
        nn.Module.__init__(self)  # not nn.Linear's: W0 is adopted, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # W0 itself: shared, not copied
        self.slices, self.rank, self.alpha = dict(slices), rank, alpha
        # §4.1: "We then scale ΔWx by α/r ... tuning α is roughly the same as tuning the learning
        # rate". rsLoRA (Kalajdzievski 2023) uses α/√r so that large ranks still learn.
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        # A and B in fp32 also on a bf16/fp16 W0, as PEFT makes them: in half precision AdamW's
        # small updates would round away (float64 stays float64).
        f = dict(device=base.weight.device,
                 dtype=torch.promote_types(base.weight.dtype, torch.float32))
        self.lora_A = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(rank, self.in_features, **f)) for n in self.slices})
        self.lora_B = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(b - a, rank, **f)) for n, (a, b) in self.slices.items()})
        self.lora_dropout = nn.Dropout(dropout)  # on the LoRA path only; W0 x is untouched
        self.merged = False
        self._merges = {}  # slice -> what unmerge needs to give W0 back bit for bit
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self):
        """A ~ U(-1/√in_features, 1/√in_features) and B = 0, so ΔW = B A = 0 at the start (§4.1).

        The paper says "a random Gaussian initialization for A"; its released code (loralib,
        which produced its tables) draws A with kaiming_uniform_(a=√5), which is this uniform
        distribution, and so does PEFT by default. We follow the code.
        """
        for A in self.lora_A.values():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # bound = √(6 / (1 + 5)) / √in = 1/√in
        for B in self.lora_B.values():
            nn.init.zeros_(B)

    def forward(self, x):
        h = F.linear(x, self.weight, self.bias)  # W0 x (+ b); W0 x + ΔW x already when merged
        if self.merged:
            if (self.training and torch.is_grad_enabled()
                    and any(A.requires_grad for A in self.lora_A.values())):
                raise ValueError("LoRA is merged into the weights, so A and B would get no "
                                 "gradient: call unmerge_lora before training")
            return h
        x = self.lora_dropout(x.to(self.lora_dtype))  # the LoRA path in A and B's fp32
        if torch.is_grad_enabled() and not h.requires_grad:
            h = h.clone()  # W0 x may be a view outside autograd: no trainable update in place
        for n, (a, b) in self.slices.items():
            # eq. 3 on rows a:b, with §4.1's α/r: h = W0 x + (α/r) B A x, as B (A x) through the
            # r-wide bottleneck (ΔW is never formed); added in h's dtype
            h[..., a:b] += self.scaling * (x @ self.lora_A[n].t() @ self.lora_B[n].t())
        return h

    # merge / unmerge (§4.1: "we can explicitly compute and store W = W0 + BA")

    def delta_weight(self, name) -> torch.Tensor:
        """ΔW = (α/r) B A of slice `name`, in fp32: (stop - start, in_features)."""
        return fp32_delta(self.lora_A[name].detach(), self.lora_B[name].detach(), self.scaling)

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + ΔW in place, ΔW formed in fp32 (also for bf16/fp16 weights). Idempotent.
        exact_merge.ExactMerge keeps what unmerge needs to give W0 back bit for bit."""
        if not self.merged:
            for n, (a, b) in self.slices.items():
                self._merges[n] = ExactMerge(self.weight[a:b], self.lora_A[n], self.lora_B[n],
                                             self.scaling)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W0 + ΔW -> W0, bit for bit (even if A or B changed since the merge). Idempotent."""
        if self.merged:
            for n, (a, b) in self.slices.items():
                self._merges.pop(n).undo(self.weight[a:b])
            self.merged = False

    @torch.no_grad()
    def base_weight(self):
        """W0, exactly: the weight itself when unmerged, else a copy rebuilt from the merge."""
        if not self.merged:
            return self.weight
        w0 = self.weight.detach().clone()
        for n, (a, b) in self.slices.items():
            self._merges[n].undo(w0[a:b])
        return w0

    @property
    def lora_dtype(self):
        """The dtype of A and B, and of the LoRA path in forward: fp32 (fp64 on an fp64 W0)."""
        return next(iter(self.lora_A.values())).dtype

    def extra_repr(self):
        return (f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}, "
                f"slices={self.slices}, merged={self.merged}")

    # ---- What nn.Module needs so that W0 stays exact: nn.Linear and nn.Module would re-draw
    # the weight (reset), convert the merged sum (.to), or save W0 + ΔW as if it were W0.

    def reset_parameters(self):
        """(Meta-device materialization, FSDP) W0 stays, unmerged; only A and B restart."""
        self.unmerge()
        self.reset_lora_parameters()

    def _apply(self, fn, recurse=True):
        """.to(), .half(), .cuda(): unmerge, convert, merge again (so W0 stays restorable). A and
        B (and their gradients) never go below fp32: AdamW's small steps would round away."""
        merged = self.merged
        self.unmerge()
        lora = {id(t) for d in (self.lora_A, self.lora_B) for p in d.values() for t in (p, p.grad)}

        def keep_fp32(t):
            out = fn(t)
            return out.float() if id(t) in lora and out.dtype in _HALF else out

        super()._apply(keep_fp32, recurse)
        if merged and not self.weight.is_meta:  # a meta tensor has no values to merge
            self.merge()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Saves W0, not W0 + ΔW: A and B are beside it (loaded, ΔW would count twice)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = self.base_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.merged:  # a state dict holds W0 (see above): loaded, merged would be a lie
            raise ValueError(f"load_state_dict into merged LoRA layer {prefix.rstrip('.')}: "
                             f"call unmerge_lora first")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def apply_lora(model, rank=4, alpha=32, targets=("q", "v"), dropout=0.1, bias="none",
               rslora=False, *, rank_limit=True):
    """Add LoRA to every block of a GPT (in place) and freeze everything else; returns the model.

    The defaults are the paper's GPT-2 setting (Table 11: r = 4, α = 32, dropout 0.1, W_q and
    W_v adapted, as in Table 5; §4.2 limits the study to attention weights). targets: any of
    "q", "k", "v" (slices of the fused c_attn), "qkv" (the whole c_attn, one A shared by q, k,
    v), "o" (attn.c_proj, W_o) and "mlp" (c_fc and mlp.c_proj). bias: which biases also train:
    "none", "all", or "lora_only" (those of the adapted layers). rslora: scale by α/√r instead
    of α/r. The settings are kept in model.lora_config. Bad settings are a ValueError and leave
    the model unchanged. rank_limit: refuse a rank above the width of an adapted matrix (ΔW's
    rank cannot exceed it, so the rest only adds parameters); loading an adapter trained
    elsewhere turns it off (PEFT runs such ranks).
    """
    rank, alpha, targets, dropout = _checked(model, rank, alpha, targets, dropout, bias,
                                             rank_limit)
    C = model.config.n_embd
    plan = {}  # module path inside a block -> {slice name: (first row, row after the last)}
    for t in targets:
        for path, _, a, b in _TARGETS[t]:
            plan.setdefault(path, {})[t] = (a * C, b * C)
    for block in model.h:
        for path, slices in plan.items():
            parent, name = path.split(".")
            parent = getattr(block, parent)
            layer = LoRALinear(getattr(parent, name), slices, rank, alpha, dropout, rslora)
            setattr(parent, name, layer.train(model.training))  # eval() model: no LoRA dropout

    model.lora_config = dict(rank=rank, alpha=alpha, targets=list(targets), dropout=dropout,
                             bias=bias, rslora=rslora)
    # §4.1: "W0 is frozen and does not receive gradient updates, while A and B contain trainable
    # parameters" (plus biases if asked).
    adapter = lora_state_dict(model)
    for name, p in model.named_parameters():
        p.requires_grad = name in adapter
    return model


def _checked(model, rank, alpha, targets, dropout, bias, rank_limit):
    """apply_lora's settings, checked (a ValueError naming the bad one) and made plain Python
    values for JSON metadata: (rank, alpha, targets in TARGETS' order, dropout)."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in targets if t not in _TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown}: choose among {', '.join(TARGETS)}")
    if "qkv" in targets and {"q", "k", "v"} & set(targets):
        raise ValueError("target 'qkv' already covers q, k and v: give 'qkv' or any of q, k, v")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(f"LoRA alpha must be positive and finite, got {alpha!r}")
    if not 0 <= float(dropout) < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias must be one of {', '.join(BIAS_OPTIONS)}, got {bias!r}")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has LoRA layers: apply_lora once per model")
    C = model.config.n_embd
    for t in targets:
        for path, d_in, a, b in _TARGETS[t]:
            if rank_limit and rank > min(d_in * C, (b - a) * C):
                raise ValueError(f"LoRA rank {rank} is larger than the {path} matrix of target "
                                 f"'{t}' allows ({(b - a) * C} x {d_in * C})")
    alpha = alpha if isinstance(alpha, int) else float(alpha)
    return int(rank), alpha, tuple(t for t in TARGETS if t in targets), float(dropout)


def lora_layers(model) -> dict:
    """{name: LoRALinear} of the model; a ValueError if it has none."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRA layers: call apply_lora (or load_adapter) first")
    return layers


def merge_lora(model):
    """W = W0 + B A in every LoRA layer (§4.1): inference then costs exactly the base model's.
    Explicit and idempotent: merging a merged model changes nothing. Returns the model."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model):
    """Undo merge_lora: every W0 back bit for bit, LoRA on its own path again. Idempotent."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def is_merged(model) -> bool:
    return any(layer.merged for layer in lora_layers(model).values())


def lora_state_dict(model) -> dict:
    """The tensors an adapter consists of (§4.1: "a small set of task-specific parameters"):
    every lora_A / lora_B, plus the biases that train under the bias option."""
    biases = adapter_biases(model, lora_config(model))
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n or n in biases}


def adapter_biases(model, cfg) -> set:
    """Names of the biases that LoRA with settings cfg trains, and so carries: bias="all" every
    bias, "lora_only" those of the adapted modules, "none" none."""
    if cfg["bias"] == "none":
        return set()
    adapted = {path for t in cfg["targets"] for path, *_ in _TARGETS[t]}  # e.g. attn.c_attn
    return {n for n, _ in model.named_parameters() if n.endswith(".bias") and (
        cfg["bias"] == "all" or n.removesuffix(".bias").split(".", 2)[-1] in adapted)}


def lora_config(model) -> dict:
    """The settings apply_lora recorded; a ValueError for a model without LoRA."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("the model has no LoRA layers: call apply_lora (or load_adapter) first")
    return cfg


def count_trainable(model) -> int:
    """Parameters the optimizer will update (requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def paper_num_params(config, rank, targets=("q", "v")) -> int:
    """|Θ| = 2 × L̂ × d_model × r (§5.1), L̂ the number of adapted weight matrices, when every
    adapted matrix is d_model x d_model (q, k, v, o). In general each adapted matrix adds
    r × (d_in + d_out): 4 d_model r for the fused "qkv", 10 d_model r per block for "mlp"."""
    targets = (targets,) if isinstance(targets, str) else set(targets)
    C = config.n_embd
    per_block = sum(rank * (d_in + b - a) * C for t in targets for _, d_in, a, b in _TARGETS[t])
    return config.n_layer * per_block


def describe_trainable(model) -> str:
    """One line: trainable parameters, their share of all, and the paper's |Θ| beside them."""
    cfg, c = lora_config(model), model.config
    n, total = count_trainable(model), sum(p.numel() for p in model.parameters())
    paper = paper_num_params(c, cfg["rank"], cfg["targets"])
    n_mat = c.n_layer * sum(len(_TARGETS[t]) for t in cfg["targets"])
    if set(cfg["targets"]) <= {"q", "k", "v", "o"}:
        formula = f"2·L̂·d_model·r = 2·{n_mat}·{c.n_embd}·{cfg['rank']}"
    else:
        formula = f"Σ r·(d_in + d_out) over {n_mat} matrices"
    extra = f" (+ {n - paper:,} biases)" if n != paper else ""
    return (f"trainable parameters: {n:,} of {total:,} ({100 * n / total:.3f}%); "
            f"paper's |Θ| = {formula} = {paper:,}{extra}")
