"""LoRA: Low-Rank Adaptation (Hu et al. 2021, arXiv 2106.09685) of model.py's GPT-2.

The core reads like §4 of the paper:

    §4.1 eq. 3   h = W0 x + ΔW x = W0 x + (α/r) B A x       LoRALinear.forward
    §4.1         A random, B = 0, so ΔW = B A = 0 at first    LoRALinear.reset_lora_parameters
    §4.1         scale ΔW x by α/r                            LoRALinear.scaling
    §4.2         adapt W_q and W_v only (Table 5, Table 11)   apply_lora(targets=("q", "v"))
    §4.1         merge W = W0 + B A: no inference latency     merge_lora / unmerge_lora
    §5.1         |Θ| = 2 × L̂ × d_model × r                    paper_num_params

Below the divider, what practitioners need around it:

    adapter files, loaded strictly (base weights, settings, keys)   save_adapter / load_adapter
    §4.1 task switching: W0 - B A + B' A' on a merged model         switch_adapter
    §4.2 a different adapter for each row of one batch              load_adapters, use_adapters
    huggingface/peft files, both ways                               export_peft / import_peft
    a plain GPT with W0 + B A in its weights                        unload_lora
"""

import json
import math
import numbers
import re
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import _atomic_write, _short_list

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


class LoRALinear(nn.Linear):
    """A frozen nn.Linear W0 plus trainable low-rank updates ΔW = B A on chosen rows of its output.

    slices: {name: (start, stop)}: output rows start:stop of W0 get their own A (r, in_features)
    and B (stop - start, r). A whole matrix is one slice; GPT-2's fused c_attn gets separate "q",
    "k", "v" slices, so each is adapted on its own (§4.2) and a slice left out costs nothing.
    The layer *is* the nn.Linear (same weight and bias tensors, same state-dict keys); the LoRA
    tensors are added beside them as lora_A.<name> and lora_B.<name>.
    """

    def __init__(self, base: nn.Linear, slices: dict, rank: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False):
        nn.Module.__init__(self)  # not nn.Linear's: W0 is adopted, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # W0 itself: shared, not copied
        self.slices = dict(slices)
        self.rank, self.alpha = rank, alpha
        # §4.1: "We then scale ΔWx by α/r ... tuning α is roughly the same as tuning the learning
        # rate". rsLoRA (Kalajdzievski 2023) uses α/√r so that large ranks still learn.
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        f = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(rank, self.in_features, **f)) for n in self.slices})
        self.lora_B = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(b - a, rank, **f)) for n, (a, b) in self.slices.items()})
        self.lora_dropout = nn.Dropout(dropout)  # on the LoRA path only; W0 x is untouched
        self.merged = False
        self._merge_record = {}  # slice -> what unmerge needs to give W0 back bit for bit
        self.adapter_ids = None  # (B,) set by use_adapters: one adapter per row of a batch
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

    def reset_parameters(self):
        """What meta-device materialization and FSDP call on every module. nn.Linear's would
        re-draw W0, the pretrained weight: here W0 stays and only A and B start again (§4.1).
        A merged layer is unmerged first (W0 back bit for bit), so ΔW = 0 after, merged or not."""
        self.unmerge()
        self.reset_lora_parameters()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # W0 x (+ b); already W0 + ΔW when merged
        if self.merged:
            if (self.training and torch.is_grad_enabled()
                    and any(A.requires_grad for A in self.lora_A.values())):
                raise ValueError("LoRA is merged into the weights, so A and B would get no "
                                 "gradient: call unmerge_lora before training")
            return y
        x = self.lora_dropout(x)
        if torch.is_grad_enabled() and not y.requires_grad:
            # Nothing below this layer trains (e.g. W_o alone, or block 0): F.linear's y may be a
            # view of a tensor outside autograd, which refuses a trainable in-place update.
            y = y.clone()
        if self.adapter_ids is not None:
            return self._forward_per_row(x, y)
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)  # (N, in), (N, out)
        for n, (a, b) in self.slices.items():
            # eq. 3 on the slice: y += (α/r) B (A x), through the r-wide bottleneck (ΔW is never
            # formed), accumulated into y's rows a:b by one addmm
            xa = x2 @ self.lora_A[n].t()  # (N, r)
            y2[:, a:b].addmm_(xa, self.lora_B[n].t().to(xa.dtype), alpha=self.scaling)
        return y

    # merge / unmerge (§4.1: "we can explicitly compute and store W = W0 + BA")

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + ΔW in place, ΔW formed in fp32 (also for bf16/fp16 weights). Idempotent.

        To give W0 back bit for bit without keeping a copy of it, merge remembers A and B as they
        are now (tiny) and the entries of W0 that (W0 + ΔW) - ΔW does not round back to: a
        share roughly proportional to |ΔW| / |W0|, a few percent when ΔW is small next to W0.
        """
        if self.merged:
            return
        for n, (a, b) in self.slices.items():
            w0 = self.weight[a:b]
            A, B = self.lora_A[n].detach().clone(), self.lora_B[n].detach().clone()
            delta = _delta_weight(A, B, self.scaling)
            merged = (w0.float() + delta).to(w0.dtype)
            back = (merged.float() - delta).to(w0.dtype)
            lost = (_bits(back) != _bits(w0)).flatten().nonzero().squeeze(1)
            self._merge_record[n] = (A, B, lost.int(), w0.flatten()[lost].clone())
            w0.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W0 + ΔW -> W0, bit for bit (even if A or B changed since the merge). Idempotent."""
        if not self.merged:
            return
        self.weight.copy_(self.base_weight())
        self._merge_record.clear()
        self.merged = False

    @torch.no_grad()
    def base_weight(self):
        """W0, exactly: the weight itself when unmerged, else a copy rebuilt from the merge."""
        if not self.merged:
            return self.weight
        w0 = self.weight.detach().clone()
        for n, (a, b) in self.slices.items():
            A, B, lost, values = self._merge_record[n]
            if values.dtype != w0.dtype:
                raise ValueError(f"weights were merged in {values.dtype} and are now "
                                 f"{w0.dtype}: W0 cannot be restored exactly; unmerge before "
                                 f"changing dtype")
            dev = w0.device
            rows = (w0[a:b].float() - _delta_weight(A.to(dev), B.to(dev), self.scaling))
            rows = rows.to(w0.dtype)
            rows.view(-1)[lost.to(dev, torch.long)] = values.to(dev)
            w0[a:b] = rows
        return w0

    def _forward_per_row(self, x, y):
        """Row i of the batch adds the ΔW x of adapter adapter_ids[i] from the stacked bank that
        load_adapters filled (-1: no adapter). Batched matmuls, no loop over rows or adapters."""
        ids = self.adapter_ids
        if x.size(0) != ids.numel():
            raise ValueError(f"use_adapters was given {ids.numel()} adapter ids for a batch of "
                             f"{x.size(0)} rows: one id per row (decoding that expands each "
                             f"prompt into k rows repeats them with repeat_adapter_ids)")
        pick = ids.clamp(min=0)
        s = (self.bank_scaling[pick] * (ids >= 0))[:, None, None].to(x.dtype)  # (B, 1, 1)
        for n, (a, b) in self.slices.items():
            A = getattr(self, f"bank_A_{n}")[pick]  # (B, r, in): each row's own A
            B = getattr(self, f"bank_B_{n}")[pick]  # (B, out, r)
            y[..., a:b] += torch.bmm(torch.bmm(x, A.transpose(1, 2)) * s, B.transpose(1, 2))
        return y

    def extra_repr(self):
        return (f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}, "
                f"slices={self.slices}, merged={self.merged}")

    # What LoRALinear inherits from nn.Module would see only W0 + ΔW in a merged weight.

    def _apply(self, fn, recurse=True):
        """Under .to(), .half(), .cuda() and the like a merged layer is unmerged, converted and
        merged again: its weights are then what converting it unmerged and merging would give,
        and unmerge still restores the converted W0 bit for bit (the merge record follows)."""
        merged = self.merged
        self.unmerge()
        super()._apply(fn, recurse)
        if merged and not self.weight.is_meta:  # a meta tensor has no values to merge
            self.merge()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A merged layer saves W0, not W0 + ΔW: A and B are saved beside it, so loading the
        state dict into an unmerged model would otherwise add ΔW twice."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = self.base_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.merged:  # a state dict holds W0 (see above): loaded, merged would be a lie
            raise ValueError(f"load_state_dict into merged LoRA layer {prefix.rstrip('.')}: "
                             f"call unmerge_lora first")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _delta_weight(A, B, scaling):
    """ΔW = (α/r) B A in fp32, (out, in). Summed one rank-1 term at a time: IEEE elementwise ops
    whose bits depend on no BLAS kernel or TF32 setting, so unmerge recomputes exactly the ΔW
    that merge added, on any device."""
    A, B = A.float(), B.float() * scaling
    delta = torch.zeros(B.size(0), A.size(1), device=A.device)
    for j in range(A.size(0)):
        delta += B[:, j, None] * A[None, j]  # (out, 1) * (1, in)
    return delta


def _bits(t):
    """The raw bits of t, so that comparisons are exact (-0.0 != 0.0, NaN == same NaN)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def apply_lora(model, rank=4, alpha=32, targets=("q", "v"), dropout=0.1, bias="none",
               rslora=False):
    """Add LoRA to every block of a GPT (in place) and freeze everything else; returns the model.

    The defaults are the paper's GPT-2 setting (Table 11: r = 4, α = 32, dropout 0.1, W_q and
    W_v adapted, §4.2 and Table 5). targets: any of "q", "k", "v" (slices of the fused c_attn),
    "qkv" (the whole c_attn, one A shared by q, k, v), "o" (attn.c_proj, W_o) and "mlp" (c_fc
    and mlp.c_proj). bias: which biases also train: "none", "all", or "lora_only" (those of the
    adapted layers). rslora: scale by α/√r instead of α/r. The settings are kept in
    model.lora_config.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in targets if t not in _TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown}: choose among {', '.join(TARGETS)}")
    if "qkv" in targets and {"q", "k", "v"} & set(targets):
        raise ValueError("target 'qkv' already covers q, k and v: give 'qkv' or any of q, k, v")
    targets = tuple(t for t in TARGETS if t in targets)  # canonical order, no repeats
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    rank, dropout = int(rank), float(dropout)  # plain Python numbers: they go into JSON metadata
    alpha = alpha if isinstance(alpha, int) else float(alpha)
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias must be one of {', '.join(BIAS_OPTIONS)}, got {bias!r}")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has LoRA layers: apply_lora once per model")

    C = model.config.n_embd
    plan = {}  # module path inside a block -> {slice name: (first row, row after the last)}
    for t in targets:
        for path, d_in, a, b in _TARGETS[t]:
            plan.setdefault(path, {})[t] = (a * C, b * C)
            if rank > min(d_in * C, (b - a) * C):
                raise ValueError(f"LoRA rank {rank} is larger than the {path} matrix of target "
                                 f"'{t}' allows ({(b - a) * C} x {d_in * C})")
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


def lora_layers(model):
    """{name: LoRALinear} of the model; a ValueError if it has none."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRA layers: call apply_lora (or load_adapter) first")
    return layers


def merge_lora(model):
    """W = W0 + B A in every LoRA layer (§4.1): inference then costs exactly the base model's.
    Explicit and idempotent: merging a merged model changes nothing. Returns the model."""
    _refuse_inside_use_adapters(model, "merge_lora")
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


def unload_lora(model, merge=True):
    """Replace every LoRA layer by a plain nn.Linear holding W0 + ΔW (merge=True) or W0: the
    model is a plain GPT again (all parameters trainable, no LoRA keys), so save_pretrained
    writes a checkpoint that GPT.from_pretrained and transformers load. Returns the model."""
    _refuse_inside_use_adapters(model, "unload_lora")
    if merge:
        merge_lora(model)
    else:
        unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, plain.train(layer.training))
    for p in model.parameters():
        p.requires_grad = True
    del model.lora_config
    model.__dict__.pop("lora_adapters", None)
    return model


def lora_state_dict(model) -> dict:
    """The tensors an adapter consists of: every lora_A / lora_B, plus the biases that train
    under the bias option ("all", "lora_only")."""
    biases = _adapter_biases(model, _lora_config(model))
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n or n in biases}


def _adapter_biases(model, cfg) -> set:
    """Names of the biases that an adapter with settings cfg trains, and so carries: bias="all"
    every bias, "lora_only" those of the adapted modules, "none" none."""
    if cfg["bias"] == "none":
        return set()
    adapted = {path for t in cfg["targets"] for path, *_ in _TARGETS[t]}  # e.g. attn.c_attn
    return {n for n, _ in model.named_parameters() if n.endswith(".bias") and (
        cfg["bias"] == "all" or n.removesuffix(".bias").split(".", 2)[-1] in adapted)}


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
    cfg = _lora_config(model)
    n, total = count_trainable(model), sum(p.numel() for p in model.parameters())
    paper = paper_num_params(model.config, cfg["rank"], cfg["targets"])
    c = model.config
    n_mat = c.n_layer * sum(len(_TARGETS[t]) for t in cfg["targets"])
    if set(cfg["targets"]) <= {"q", "k", "v", "o"}:
        formula = f"2·L̂·d_model·r = 2·{n_mat}·{c.n_embd}·{cfg['rank']}"
    else:
        formula = f"Σ r·(d_in + d_out) over {n_mat} matrices"
    extra = f" (+ {n - paper:,} biases)" if n != paper else ""
    return (f"trainable parameters: {n:,} of {total:,} ({100 * n / total:.3f}%); "
            f"paper's |Θ| = {formula} = {paper:,}{extra}")


def _lora_config(model) -> dict:
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("the model has no LoRA layers: call apply_lora (or load_adapter) first")
    return cfg


# =====================================================================================
# Around the paper: adapter files, task switching, several adapters per batch, PEFT.
# =====================================================================================

_FINGERPRINT_SAMPLES = 8  # values of each base tensor recorded in an adapter file


def base_fingerprint(model, lora_config=None) -> dict:
    """A few values of every base tensor (W0, even when merged): {name: [floats]}.

    Base tensors are the weights and the biases, except A and B and the biases that an adapter
    with settings lora_config (default: the model's own) trains: those are the adapter's. So a
    bias="none" adapter does not load onto a base whose biases were fine-tuned (BitFit).
    Values rather than a hash, so that an adapter saved from an fp32 model still loads onto the
    same base in bf16 or fp16: they are compared up to the rounding of the coarser dtype."""
    cfg = lora_config or getattr(model, "lora_config", None) or {"bias": "none"}
    skip = _adapter_biases(model, cfg)
    out = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or name in skip:
                continue
            layer = layers.get(name.removesuffix(".weight"))
            flat = (layer.base_weight() if layer is not None else p).detach().flatten()
            k, n = _FINGERPRINT_SAMPLES, flat.numel()
            idx = torch.tensor([i * (n - 1) // (k - 1) for i in range(k)], device=flat.device)
            out[name] = flat[idx].float().tolist()  # k values evenly spread, first and last
    return out


def save_adapter(model, path, base_name=None):
    """Write the LoRA tensors (lora_state_dict) to a safetensors file, atomically, with the
    settings and the base model's identity as metadata: lora_config, base_name, base_config,
    base_fingerprint (of W0), base_dtype. About 0.6 MB for GPT-2 124M at r = 4 on q, v."""
    from safetensors.torch import save_file

    cfg = _lora_config(model)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    meta = {
        "format": "pt",
        "lora_config": json.dumps(cfg),
        "base_name": str(base_name or getattr(model, "name", "") or ""),
        "base_config": json.dumps(asdict(model.config)),
        "base_fingerprint": json.dumps(base_fingerprint(model)),
        "base_dtype": str(model.wte.weight.dtype).removeprefix("torch."),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))
    return path


def read_adapter(path):
    """(tensors, metadata) of an adapter file written by save_adapter; clear errors otherwise."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: cannot read the adapter, the file is truncated or corrupt "
                         f"({type(e).__name__})") from None
    need = ("lora_config", "base_config", "base_fingerprint")
    if any(k not in meta for k in need):
        raise ValueError(f"{path}: not a LoRA adapter written by save_adapter (its metadata lacks "
                         f"{[k for k in need if k not in meta]}; for a PEFT adapter directory "
                         f"use import_peft)")
    try:
        meta = {**meta, **{k: json.loads(meta[k]) for k in need}}
    except json.JSONDecodeError:
        raise ValueError(f"{path}: the adapter's metadata is corrupt") from None
    if set(meta["lora_config"]) != {"rank", "alpha", "targets", "dropout", "bias", "rslora"}:
        raise ValueError(f"{path}: the adapter's lora_config is not one save_adapter writes: "
                         f"{meta['lora_config']}")
    return tensors, meta


def _check_base(model, meta, source):
    """The adapter's base must be this model: same architecture, same W0 (fingerprint)."""
    theirs, ours = meta["base_config"], asdict(model.config)
    diff = [k for k in ours if k != "dropout" and theirs.get(k) != ours[k]]
    name = f" '{meta['base_name']}'" if meta.get("base_name") else ""
    if diff:
        raise ValueError(f"{source}: adapter is for another base model{name}: "
                         + ", ".join(f"{k}={theirs.get(k)} (this model: {ours[k]})" for k in diff))
    fp = base_fingerprint(model, meta["lora_config"])  # without the biases the adapter has
    dtypes = [getattr(torch, meta.get("base_dtype", "float32")), model.wte.weight.dtype]
    coarse = max((torch.finfo(d) for d in dtypes), key=lambda fi: fi.eps)
    for k, theirs_v in meta["base_fingerprint"].items():
        if k not in fp:
            raise ValueError(f"{source}: adapter is for another base model{name}: it has tensor "
                             f"{k}, this model does not")
        a, b = torch.tensor(theirs_v), torch.tensor(fp[k])
        if (a - b).abs().gt(coarse.eps * a.abs() + coarse.tiny).any():
            raise ValueError(f"{source}: adapter was trained on other base weights{name}: "
                             f"{k} differs (fingerprint mismatch)")


def _copy_lora(model, tensors, source):
    """Copy LoRA tensors into the model, strictly: same keys, same shapes. Keeps the merge state
    (a merged model is unmerged exactly, updated, and merged again)."""
    _refuse_inside_use_adapters(model, "loading an adapter")
    ours = lora_state_dict(model)
    _check_keys(set(ours), tensors, source)
    for k, v in tensors.items():
        if v.shape != ours[k].shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the model "
                             f"expects {tuple(ours[k].shape)}")
    merged = is_merged(model)
    unmerge_lora(model)
    with torch.no_grad():
        for k, v in tensors.items():
            ours[k].copy_(v)
    return merge_lora(model) if merged else model


def _check_keys(want, tensors, source):
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unexpected:
        parts = ([f"missing tensors {_short_list(missing)}"] if missing else []) + (
            [f"unexpected tensors {_short_list(unexpected)}"] if unexpected else [])
        raise ValueError(f"{source}: adapter does not fit this model: " + "; ".join(parts))


_SETTINGS = ("rank", "alpha", "targets", "bias", "rslora")  # what must match to share a model


def load_adapter(model, path):
    """Load an adapter file onto its base model; returns the model.

    A model without LoRA gets apply_lora with the file's settings first, so base model +
    load_adapter is all inference needs. Everything is checked and a mismatch is a ValueError
    that names it: the base's architecture and weights (fingerprint), the LoRA settings of a
    model that already has LoRA, the tensor names and shapes. A merged model stays merged.
    """
    tensors, meta = read_adapter(path)
    _check_base(model, meta, path)
    cfg = meta["lora_config"]
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, **cfg)
    else:
        diff = [k for k in _SETTINGS if model.lora_config[k] != cfg[k]]
        if diff:
            raise ValueError(f"{path}: adapter has other LoRA settings than the model: " + ", ".join(
                f"{k}={cfg[k]} (model: {model.lora_config[k]})" for k in diff))
    return _copy_lora(model, tensors, path)


def switch_adapter(model, path_or_state):
    """Task switching on a merged model in one call (§4.1: "recover W0 by subtracting BA and then
    adding a different B'A'"). path_or_state: an adapter file or a lora_state_dict. W0 is
    restored bit for bit before B'A' is added, so the result is exactly B'A' merged into a fresh
    base. Leaves the model merged; returns it."""
    if isinstance(path_or_state, dict):
        _copy_lora(model, path_or_state, "state dict")
    else:
        load_adapter(model, path_or_state)
    return merge_lora(model)


# Several adapters at once (§4.2: "dynamically choose the LoRA modules to use for samples in a
# batch"): each layer holds every adapter's A and B stacked, and each row picks its own.

def load_adapters(model, adapters: dict) -> list:
    """Load {name: adapter file} side by side for use_adapters; returns the names in the order
    their ids count (0, 1, ...). All must fit this base and share targets; ranks and α may
    differ (a smaller rank is zero-padded, which changes nothing). A model without LoRA gets it
    first (its own A and B are not used by use_adapters). The model must not be merged."""
    if not adapters:
        raise ValueError("load_adapters: give at least one adapter")
    _refuse_inside_use_adapters(model, "load_adapters")  # ids would point into another bank
    files = {name: read_adapter(p) for name, p in adapters.items()}
    for name, (_, meta) in files.items():
        _check_base(model, meta, adapters[name])
    cfgs = {name: meta["lora_config"] for name, (_, meta) in files.items()}
    first = next(iter(cfgs.values()))
    for name, cfg in cfgs.items():
        if cfg["targets"] != first["targets"]:
            raise ValueError(f"{adapters[name]}: targets {cfg['targets']} differ from "
                             f"{first['targets']}: adapters mixed per row must share targets")
        if cfg["bias"] != "none":
            raise ValueError(f"{adapters[name]}: trains biases (bias={cfg['bias']}), which "
                             f"cannot differ per row; mix adapters with bias='none'")
    rmax = max(cfg["rank"] for cfg in cfgs.values())
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, **{**first, "rank": rmax})
    elif model.lora_config["targets"] != first["targets"]:
        raise ValueError(f"the model's LoRA targets {model.lora_config['targets']} differ from "
                         f"the adapters' {first['targets']}")
    if is_merged(model):
        raise ValueError("load_adapters needs an unmerged model: call unmerge_lora first")

    layers = lora_layers(model)
    want = {f"{ln}.lora_{m}.{n}" for ln, layer in layers.items() for n in layer.slices for m in "AB"}
    for name, (tensors, _) in files.items():
        _check_keys(want, tensors, adapters[name])
    with torch.no_grad():
        for ln, layer in layers.items():
            f = dict(device=layer.weight.device, dtype=layer.weight.dtype)
            for n, (a, b) in layer.slices.items():
                A = torch.zeros(len(files), rmax, layer.in_features, **f)  # (N, r, in)
                B = torch.zeros(len(files), b - a, rmax, **f)  # (N, out, r)
                for i, (name, (tensors, _)) in enumerate(files.items()):
                    r = cfgs[name]["rank"]
                    tA, tB = tensors[f"{ln}.lora_A.{n}"], tensors[f"{ln}.lora_B.{n}"]
                    if tA.shape != (r, layer.in_features) or tB.shape != (b - a, r):
                        raise ValueError(f"{adapters[name]}: {ln} slice {n} has shapes "
                                         f"{tuple(tA.shape)}, {tuple(tB.shape)}, expected "
                                         f"{(r, layer.in_features)}, {(b - a, r)}")
                    A[i, :r], B[i, :, :r] = tA, tB
                layer.register_buffer(f"bank_A_{n}", A, persistent=False)
                layer.register_buffer(f"bank_B_{n}", B, persistent=False)
            scaling = [c["alpha"] / (math.sqrt(c["rank"]) if c["rslora"] else c["rank"])
                       for c in cfgs.values()]
            layer.register_buffer("bank_scaling", torch.tensor(scaling, device=f["device"]),
                                  persistent=False)
    model.lora_adapters = list(files)
    return model.lora_adapters


@contextmanager
def use_adapters(model, ids):
    """Inside the block, row i of every forward uses adapter ids[i]: an index into
    load_adapters' names, a name, or -1 for the base model alone.

        with use_adapters(model, ["e2e", "shakespeare", -1]):
            logits = model(idx)  # idx (3, T)
    """
    names = getattr(model, "lora_adapters", None)
    if not names:
        raise ValueError("no adapters loaded side by side: call load_adapters first")
    if is_merged(model):
        raise ValueError("use_adapters needs an unmerged model: call unmerge_lora first")
    if not torch.is_tensor(ids):
        unknown = [i for i in ids if isinstance(i, str) and i not in names]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}: loaded are {names}")
        ids = torch.tensor([names.index(i) if isinstance(i, str) else i for i in ids])
    if ids.dim() != 1 or ((ids < -1) | (ids >= len(names))).any():
        raise ValueError(f"adapter ids must be a 1-d list in -1 .. {len(names) - 1}")
    layers = list(lora_layers(model).values())
    with _adapter_ids(layers, ids.to(device=layers[0].weight.device, dtype=torch.long)):
        yield model


@contextmanager
def repeat_adapter_ids(model, k):
    """Inside the block, each row's adapter id (use_adapters) counts for k rows in a row: for
    decoding that expands every prompt row into k rows after use_adapters was entered (samples,
    beams), as PEFT's generate does. Does nothing outside use_adapters or without LoRA."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)
              and m.adapter_ids is not None]
    ids = layers[0].adapter_ids.repeat_interleave(k) if layers else None
    with _adapter_ids(layers, ids):
        yield model


@contextmanager
def _adapter_ids(layers, ids):
    """Set the layers' adapter ids inside the block and put back what was there before, so that
    leaving a nested block does not end the outer one's."""
    before = [layer.adapter_ids for layer in layers]
    for layer in layers:
        layer.adapter_ids = ids
    try:
        yield
    finally:
        for layer, old in zip(layers, before):
            layer.adapter_ids = old


def _refuse_inside_use_adapters(model, what):
    """Merging, unloading or loading inside use_adapters would make its ids silently stop
    applying (a merged layer skips them) or point at other adapters: refused."""
    if any(isinstance(m, LoRALinear) and m.adapter_ids is not None for m in model.modules()):
        raise ValueError(f"{what} inside a use_adapters block: leave the block first")


# PEFT (huggingface/peft) interoperability. PEFT keeps GPT-2's Conv1D modules and adapts whole
# modules, one rank for all, with keys base_model.model.transformer.<module>.lora_{A,B}.weight,
# A (r, d_in) and B (d_out, r): the same orientation as ours (fan_in_fan_out only changes how
# PEFT merges). Our modules are named like GPT-2's, so only the prefix differs.

_PEFT_PREFIX = "base_model.model.transformer."
_PEFT_TARGET = {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "mlp", "mlp.c_proj": "mlp"}
_PEFT_LORA_KEY = re.compile(r"(h\.\d+\.(?:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj))"
                            r"\.lora_([AB])(?:\.default)?\.weight")


def export_peft(model, directory):
    """Write adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained
    loads onto transformers' GPT2LMHeadModel, with the same ΔW; returns the directory.

    PEFT has one LoRA per module, so our slices of a module become one LoRA with A the slices'
    A stacked and B block-structured: q and v at rank r on c_attn is exactly a rank-2r LoRA of
    c_attn whose B is zero on the k rows. Every module is zero-padded to the largest such rank
    R (zeros add nothing) and lora_alpha = scaling × R, so PEFT's lora_alpha / R is our scaling.
    """
    cfg = _lora_config(model)
    layers = lora_layers(model)
    R = max(layer.rank * len(layer.slices) for layer in layers.values())
    tensors = {}
    for name, layer in layers.items():
        f = dict(dtype=layer.weight.dtype)
        A, B = torch.zeros(R, layer.in_features, **f), torch.zeros(layer.out_features, R, **f)
        for j, (n, (a, b)) in enumerate(layer.slices.items()):
            cols = slice(j * layer.rank, (j + 1) * layer.rank)
            A[cols], B[a:b, cols] = layer.lora_A[n].detach().cpu(), layer.lora_B[n].detach().cpu()
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B
    for k, v in lora_state_dict(model).items():
        if k.endswith(".bias"):  # PEFT names the bias of an adapted module base_layer.bias
            module = k[:-len(".bias")]
            key = module + (".base_layer.bias" if module in layers else ".bias")
            tensors[_PEFT_PREFIX + key] = v.contiguous().cpu()
    scaling = next(iter(layers.values())).scaling
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "name", None),
        "r": R, "lora_alpha": scaling * R, "lora_dropout": cfg["dropout"], "use_rslora": False,
        "target_modules": sorted({name.split(".", 2)[2] for name in layers}),  # e.g. attn.c_attn
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores W as (d_in, d_out)
        "bias": cfg["bias"], "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / "adapter_model.safetensors",
                  lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(d / "adapter_config.json",
                  lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return d


def import_peft(model, directory):
    """Load a PEFT LoRA adapter for GPT-2 (directory with adapter_config.json and
    adapter_model.safetensors or .bin) into a model without LoRA; returns the model.

    PEFT's whole-module LoRAs become our targets: c_attn -> "qkv", attn.c_proj -> "o", mlp.c_fc
    and mlp.c_proj -> "mlp"; scaling lora_alpha / r (lora_alpha / √r with use_rslora). A module
    the adapter leaves out (only c_fc, or some layers only) keeps B = 0, so ΔW = 0 there, as in
    PEFT. Per-module ranks (rank_pattern), DoRA and other PEFT methods are refused."""
    from model import _read_state_dict

    d = Path(directory)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{d}: a PEFT {cfg.get('peft_type')} adapter, only LORA can be imported")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if cfg.get(k)]
    if unsupported:
        raise ValueError(f"{d}: PEFT options {unsupported} are not supported")
    weights = next((d / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                    if (d / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{d}: no adapter_model.safetensors or adapter_model.bin")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("import_peft needs a model without LoRA layers (a fresh base model)")

    tensors, unknown = {}, []
    for k, v in _read_state_dict(weights).items():
        k = k.removeprefix("base_model.model.").removeprefix("transformer.")
        if m := _PEFT_LORA_KEY.fullmatch(k):
            module, which = m.groups()
            target = _PEFT_TARGET[module.split(".", 2)[2]]
            tensors[f"{module}.lora_{which}.{target}"] = v
        elif k.endswith(".bias") and cfg.get("bias", "none") != "none":
            tensors[k.replace(".base_layer.bias", ".bias")] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"{weights}: tensors this GPT-2 LoRA import does not know: "
                         f"{_short_list(sorted(unknown))}")
    targets = {k.rsplit(".", 1)[1] for k in tensors if ".lora_" in k}
    if not targets:
        raise ValueError(f"{weights}: no LoRA tensors in it")
    apply_lora(model, rank=cfg["r"], alpha=cfg["lora_alpha"], targets=targets,
               dropout=cfg.get("lora_dropout", 0.0), bias=cfg.get("bias", "none"),
               rslora=bool(cfg.get("use_rslora", False)))
    full = {k: v.clone() for k, v in lora_state_dict(model).items()}  # B = 0 where none is given
    return _copy_lora(model, {**full, **tensors}, weights)
