"""What practitioners need around LoRA, built on lora.py's public names.

    adapter files, loaded strictly (base weights, settings, keys)   save_adapter / load_adapter
    §4.1 task switching: W0 - B A + B' A' on a merged model         switch_adapter
    a plain GPT with W0 + B A in its weights                        unload_lora
    §4.2 a different adapter for each row of one batch              load_adapters, use_adapters
                                                                    (MixedLoRALinear)
    the task's prompt format, recorded for sample.py                in_prompt_format

PEFT's adapter files, both ways, are in support/peft_io.py.
"""

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from lora import (BIAS_OPTIONS, TARGETS, LoRALinear, adapter_biases, apply_lora, is_merged,
                  lora_config, lora_layers, lora_state_dict, merge_lora, unmerge_lora)
from support.common import atomic_write, check_finite, check_tensors, short_list

_FINGERPRINT_SAMPLES = 8  # values of each base tensor recorded in an adapter file
_CONFIG_KEYS = ("rank", "alpha", "targets", "dropout", "bias", "rslora")  # apply_lora's settings


def base_fingerprint(model, settings=None) -> dict:
    """A few values of every base tensor (W0, even when merged): {name: [floats]}.

    Base tensors are the weights and the biases, except A and B and the biases that an adapter
    with these LoRA settings (default: the model's own) trains: those are the adapter's. So a
    bias="none" adapter does not load onto a base whose biases were fine-tuned (BitFit).
    Values rather than a hash, so that an adapter saved from an fp32 model still loads onto the
    same base in bf16 or fp16: they are compared up to the rounding of both dtypes."""
    cfg = settings or getattr(model, "lora_config", None) or {"bias": "none"}
    skip = adapter_biases(model, cfg)
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


def save_adapter(model, path, base_name=None, prompt_format=None):
    """Write the LoRA tensors (lora_state_dict) to a safetensors file, atomically, with the
    settings and the base model's identity as metadata: lora_config, base_name, base_config,
    base_fingerprint (of W0), base_dtype, and lora_dtype (of A and B: float32 also on a bf16 or
    fp16 base). About 0.6 MB for GPT-2 124M at r = 4 on q, v.
    prompt_format: the form of the task's prompts the adapter was trained on, PROMPT_SLOT where
    the input goes (E2E: "{prompt} ||"), recorded for sample.py (in_prompt_format); None (a
    plain-text or .jsonl run) records none. A format without exactly one PROMPT_SLOT is a
    ValueError."""
    from safetensors.torch import save_file

    if prompt_format is not None:
        check_prompt_format(prompt_format, "prompt_format")
    cfg = lora_config(model)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    meta = {
        "format": "pt",
        "lora_config": json.dumps(cfg),
        "base_name": str(base_name or getattr(model, "name", "") or ""),
        "base_config": json.dumps(asdict(model.config)),
        "base_fingerprint": json.dumps(base_fingerprint(model)),
        "base_dtype": str(model.wte.weight.dtype).removeprefix("torch."),
        "lora_dtype": str(next(iter(lora_layers(model).values())).lora_dtype)
        .removeprefix("torch."),
    } | ({} if prompt_format is None else {"prompt_format": prompt_format})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))
    return path


def read_adapter(path):
    """(tensors, metadata) of an adapter file written by save_adapter; a one-line ValueError
    otherwise, also for metadata another tool left missing, empty, partial or malformed (it is
    refused, never loaded in part: there is no flag to load it anyway)."""
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
    check_finite(tensors, path)
    need = ("lora_config", "base_config", "base_fingerprint")  # JSON; base_dtype is a name
    if any(k not in meta for k in (*need, "base_dtype")):
        raise ValueError(f"{path}: not a LoRA adapter written by save_adapter (its metadata lacks "
                         f"{[k for k in (*need, 'base_dtype') if k not in meta]}; for a PEFT "
                         f"adapter directory use import_peft)")
    try:
        meta = {**meta, **{k: json.loads(meta[k]) for k in need}}
    except json.JSONDecodeError:
        raise ValueError(f"{path}: the adapter's metadata is corrupt") from None
    _check_base_metadata(meta, tensors, path)
    cfg = meta["lora_config"]  # its numbers are apply_lora's to check (load_adapter)
    if not (isinstance(cfg, dict) and set(cfg) == set(_CONFIG_KEYS) and cfg["bias"] in BIAS_OPTIONS
            and isinstance(cfg["targets"], list) and all(t in TARGETS for t in cfg["targets"])):
        raise ValueError(f"{path}: the adapter's lora_config is not one save_adapter writes: "
                         f"{cfg}")
    if "prompt_format" in meta:
        check_prompt_format(meta["prompt_format"], f"{path}: the adapter's prompt_format")
    return tensors, meta



def _check_base_metadata(meta, tensors, path):
    """Metadata edited or written by another tool is refused, not trusted in part: an empty or
    partial fingerprint would pass any base, a guessed dtype would set the wrong tolerance."""
    fp, k = meta["base_fingerprint"], _FINGERPRINT_SAMPLES
    if fp == {}:
        raise ValueError(f"{path}: the adapter's base_fingerprint is empty")
    if not isinstance(fp, dict):
        raise ValueError(f"{path}: the adapter's base_fingerprint is malformed (not a JSON "
                         f"object of tensor name: [{k} numbers])")
    bad = [n for n, v in fp.items() if not (isinstance(v, list) and len(v) == k and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))]
    if bad:
        raise ValueError(f"{path}: the adapter's base_fingerprint is malformed: "
                         f"{short_list(bad, 3)} (each must be {k} finite numbers)")
    dtype = getattr(torch, str(meta["base_dtype"]), None)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{path}: the adapter's base_dtype {meta['base_dtype']!r} is not a "
                         f"floating-point dtype")
    lora = {str(t.dtype).removeprefix("torch.") for n, t in tensors.items() if ".lora_" in n}
    if "lora_dtype" in meta and lora != {meta["lora_dtype"]}:  # older files do not state it
        raise ValueError(f"{path}: the adapter's lora_dtype is {meta['lora_dtype']} but its "
                         f"tensors are {', '.join(sorted(lora))}")


def _check_base(model, meta, source):
    """The adapter's base must be this model: same architecture, same W0 (fingerprint)."""
    theirs, ours = meta["base_config"], asdict(model.config)
    diff = [k for k in ours if k != "dropout" and theirs.get(k) != ours[k]]
    name = f" '{meta['base_name']}'" if meta.get("base_name") else ""
    if diff:
        raise ValueError(f"{source}: adapter is for another base model{name}: "
                         + ", ".join(f"{k}={theirs.get(k)} (this model: {ours[k]})" for k in diff))
    fp = base_fingerprint(model, meta["lora_config"])  # without the biases the adapter has
    dtypes = [torch.finfo(getattr(torch, meta["base_dtype"])), torch.finfo(model.wte.weight.dtype)]
    missing = [k for k in fp if k not in meta["base_fingerprint"]]
    if missing:
        raise ValueError(f"{source}: the adapter's base_fingerprint lacks {len(missing)} of the "
                         f"{len(fp)} base tensors: {short_list(missing, 3)}")
    for k, theirs_v in meta["base_fingerprint"].items():
        if k not in fp:
            raise ValueError(f"{source}: adapter is for another base model{name}: it has tensor "
                             f"{k}, this model does not")
        a, b = torch.tensor(theirs_v), torch.tensor(fp[k])
        # Each side is one base value rounded to its dtype: off by at most eps/2 of the value,
        # or half the subnormal spacing (tiny · eps) below tiny; eps, not eps/2, for margin.
        v = torch.maximum(a.abs(), b.abs())
        if (a - b).abs().gt(sum(fi.eps * (v + fi.tiny) for fi in dtypes)).any():
            raise ValueError(f"{source}: adapter was trained on other base weights{name}: "
                             f"{k} differs (fingerprint mismatch)")


def _copy_lora(model, tensors, source):
    """Copy LoRA tensors into the model, strictly: same keys, same shapes, finite values. Keeps
    the merge state (a merged model is unmerged exactly, updated, and merged again)."""
    _refuse_inside_use_adapters(model, "loading an adapter")
    ours = lora_state_dict(model)
    check_tensors({k: v.shape for k, v in ours.items()}, tensors,
                  f"{source}: adapter does not fit this model")
    check_finite(tensors, source)
    merged = is_merged(model)
    unmerge_lora(model)
    with torch.no_grad():
        for k, v in tensors.items():
            ours[k].copy_(v)
    return merge_lora(model) if merged else model


_SETTINGS = ("rank", "alpha", "targets", "bias", "rslora")  # what must match to share a model


def load_adapter(model, path):
    """Load an adapter file onto its base model; returns the model.

    A model without LoRA gets apply_lora with the file's settings first, so base model +
    load_adapter is all inference needs. Everything is checked and a mismatch is a ValueError
    that names it: the base's architecture and weights (fingerprint), the LoRA settings of a
    model that already has LoRA, the tensor names, shapes and values. A merged model stays
    merged. A failed load leaves the model as it came (the LoRA it added taken off again).
    """
    tensors, meta = read_adapter(path)
    _check_base(model, meta, path)
    cfg = meta["lora_config"]
    if getattr(model, "lora_config", None) is not None:
        diff = [k for k in _SETTINGS if model.lora_config[k] != cfg[k]]
        if diff:
            raise ValueError(f"{path}: adapter has other LoRA settings than the model: "
                             + ", ".join(f"{k}={cfg[k]} (model: {model.lora_config[k]})"
                                         for k in diff))
        return _copy_lora(model, tensors, path)
    with _lora_applied(model, cfg, path):
        return _copy_lora(model, tensors, path)


@contextmanager
def _lora_applied(model, settings: dict, source):
    """apply_lora(model, **settings) for the block (bad settings: a ValueError naming source;
    a rank above a matrix's width is accepted: the adapter exists, apply_lora's limit is for
    training a new one);
    an error inside the block takes the LoRA off again: the model's own modules back in their
    places, its requires_grad flags as they were, no lora_config. A failed load then leaves the
    model exactly as it came, and the next load starts from the same base."""
    modules = dict(model.named_modules())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        apply_lora(model, **settings, rank_limit=False)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None
    try:
        yield model
    except BaseException:
        for name in lora_layers(model):  # LoRALinear (or MixedLoRALinear) -> what was there
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, modules[name])
        for n, p in model.named_parameters():
            p.requires_grad = grads[n]
        del model.lora_config
        model.__dict__.pop("lora_adapters", None)
        raise


def switch_adapter(model, path_or_state):
    """Task switching on a merged model in one call (§4.1: "recover W0 by subtracting BA and then
    adding a different B'A'"). path_or_state: an adapter file or a lora_state_dict. W0 is
    restored bit for bit before B'A' is added, so the result is exactly B'A' merged into a fresh
    base. Leaves the model merged; returns it. Tensors that do not fit, or hold nan or inf, are a
    ValueError that leaves the model as it was (still merged with the old adapter)."""
    if isinstance(path_or_state, dict):
        _copy_lora(model, path_or_state, "state dict")
    else:
        load_adapter(model, path_or_state)
    return merge_lora(model)


def unload_lora(model, merge=True):
    """Replace every LoRA layer by a plain nn.Linear holding W0 + ΔW (merge=True) or W0: the
    model is a plain GPT again (all parameters trainable, no LoRA keys), so save_pretrained
    writes a checkpoint that GPT.from_pretrained and transformers load. Returns the model."""
    _refuse_inside_use_adapters(model, "unload_lora")
    (merge_lora if merge else unmerge_lora)(model)
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


# Several adapters at once (§4.2: "dynamically choose the LoRA modules to use for samples in a
# batch"): each layer holds every adapter's A and B stacked, and each row picks its own.

class MixedLoRALinear(LoRALinear):
    """A LoRALinear that also holds a bank of adapters, N of them, stacked: A (N, r, in) and
    B (N, out, r) per slice, and their scalings (N,). Inside use_adapters, row i of the batch
    adds the ΔW x of adapter adapter_ids[i] (-1: none) instead of the layer's own; outside, it is
    the plain LoRALinear. Built from a LoRALinear, it adopts its tensors: same W0, same A and B,
    same state-dict keys. Batched matmuls, no loop over rows or adapters."""

    def __init__(self, layer: LoRALinear, banks: dict, scalings: torch.Tensor):
        if layer.merged:  # load_adapters refuses a merged model before it comes here
            raise ValueError("MixedLoRALinear needs an unmerged LoRALinear")
        nn.Module.__init__(self)
        # The layer's public state, adopted: the same tensors and modules, not copies.
        for name in ("in_features", "out_features", "slices", "rank", "alpha", "scaling"):
            setattr(self, name, getattr(layer, name))
        self.weight, self.bias = layer.weight, layer.bias  # W0 (and b)
        self.lora_A, self.lora_B, self.lora_dropout = layer.lora_A, layer.lora_B, layer.lora_dropout
        self.merged, self._merges = False, {}
        self.train(layer.training)
        for n, (A, B) in banks.items():
            self.register_buffer(f"bank_A_{n}", A, persistent=False)  # (N, r, in)
            self.register_buffer(f"bank_B_{n}", B, persistent=False)  # (N, out, r)
        self.register_buffer("bank_scaling", scalings, persistent=False)  # (N,)
        self.adapter_ids = None  # (B,) long, set by use_adapters

    def forward(self, x):
        ids = self.adapter_ids
        if ids is None:
            return super().forward(x)
        if x.size(0) != ids.numel():
            raise ValueError(f"use_adapters was given {ids.numel()} adapter ids for a batch of "
                             f"{x.size(0)} rows: one id per row (decoding that expands each "
                             f"prompt into k rows repeats them with repeat_adapter_ids)")
        y = torch.nn.functional.linear(x, self.weight, self.bias)  # W0 x (+ b), (B, T, out)
        pick = ids.clamp(min=0)
        s = (self.bank_scaling[pick] * (ids >= 0))[:, None, None]  # (B, 1, 1)
        for n, (a, b) in self.slices.items():
            A = getattr(self, f"bank_A_{n}")[pick]  # (B, r, in): each row's own A
            B = getattr(self, f"bank_B_{n}")[pick]  # (B, out, r)
            # the LoRA path in the bank's dtype (fp32 on a bf16 base too, as LoRALinear's)
            xa = torch.bmm(x.to(A.dtype), A.transpose(1, 2)) * s.to(A.dtype)  # (B, T, r)
            y[..., a:b] += torch.bmm(xa, B.transpose(1, 2))
        return y

    def merge(self):
        if self.adapter_ids is not None:  # a merged layer would skip the ids silently
            raise ValueError("merge_lora inside a use_adapters block: leave the block first")
        super().merge()


def load_adapters(model, adapters: dict) -> list:
    """Load {name: adapter file} side by side for use_adapters; returns the names in the order
    their ids count (0, 1, ...). All must fit this base and share targets; ranks and α may
    differ (a smaller rank is zero-padded, which changes nothing). A model without LoRA gets it
    first (its own A and B are not used by use_adapters). The model must not be merged. Every
    LoRA layer becomes a MixedLoRALinear holding the adapters' bank. Every file is checked
    before the model changes; an error leaves it as it came."""
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
    if getattr(model, "lora_config", None) is not None:
        if model.lora_config["targets"] != first["targets"]:
            raise ValueError(f"the model's LoRA targets {model.lora_config['targets']} differ "
                             f"from the adapters' {first['targets']}")
        if is_merged(model):
            raise ValueError("load_adapters needs an unmerged model: call unmerge_lora first")
    rmax = max(cfg["rank"] for cfg in cfgs.values())
    bare = getattr(model, "lora_config", None) is None  # then LoRA is added, and on error removed
    with _lora_applied(model, {**first, "rank": rmax}, "load_adapters") if bare else nullcontext():
        layers = lora_layers(model)
        for name, (tensors, _) in files.items():  # every file checked before a layer changes
            shapes = {f"{ln}.lora_{m}.{n}": (cfgs[name]["rank"], layer.in_features) if m == "A"
                      else (b - a, cfgs[name]["rank"])
                      for ln, layer in layers.items() for n, (a, b) in layer.slices.items()
                      for m in "AB"}
            check_tensors(shapes, tensors, f"{adapters[name]}: adapter does not fit this model")
        scalings = [c["alpha"] / (math.sqrt(c["rank"]) if c["rslora"] else c["rank"])
                    for c in cfgs.values()]
        for ln, layer in layers.items():
            f = dict(device=layer.weight.device, dtype=layer.lora_dtype)  # fp32 (LoRALinear)
            banks = {}
            for n, (a, b) in layer.slices.items():
                A = torch.zeros(len(files), rmax, layer.in_features, **f)  # (N, r, in)
                B = torch.zeros(len(files), b - a, rmax, **f)  # (N, out, r)
                for i, (name, (tensors, _)) in enumerate(files.items()):
                    r = cfgs[name]["rank"]
                    A[i, :r] = tensors[f"{ln}.lora_A.{n}"]
                    B[i, :, :r] = tensors[f"{ln}.lora_B.{n}"]
                banks[n] = (A, B)
            parent, child = ln.rsplit(".", 1)
            mixed = MixedLoRALinear(layer, banks, torch.tensor(scalings, device=f["device"]))
            setattr(model.get_submodule(parent), child, mixed)
        model.lora_adapters = list(files)
    return model.lora_adapters


@contextmanager
def use_adapters(model, ids):
    """Inside the block, row i of every forward uses adapter ids[i]: an index into
    load_adapters' names, a name, or -1 for the base model alone. The batch must have exactly
    len(ids) rows (a ValueError otherwise); decoding that expands rows uses repeat_adapter_ids.

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
    layers = _mixed_layers(model)
    with _adapter_ids(layers, ids.to(device=layers[0].weight.device, dtype=torch.long)):
        yield model


@contextmanager
def repeat_adapter_ids(model, k):
    """Inside the block, each row's adapter id (use_adapters) counts for k rows in a row: for
    decoding that expands every prompt row into k rows after use_adapters was entered (samples,
    beams), as PEFT's generate does. Does nothing outside use_adapters or without LoRA."""
    layers = [m for m in _mixed_layers(model) if m.adapter_ids is not None]
    ids = layers[0].adapter_ids.repeat_interleave(k) if layers else None
    with _adapter_ids(layers, ids):
        yield model


def _mixed_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, MixedLoRALinear)]


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
    """Unloading or loading inside use_adapters would make its ids silently stop applying or
    point at other adapters: refused (merging is refused by MixedLoRALinear.merge)."""
    if any(m.adapter_ids is not None for m in _mixed_layers(model)):
        raise ValueError(f"{what} inside a use_adapters block: leave the block first")


# ---------------------------------------------------------------- the task's prompt format

PROMPT_SLOT = "{prompt}"  # where the input goes in a recorded prompt format


def check_prompt_format(prompt_format, source):
    if not isinstance(prompt_format, str) or prompt_format.count(PROMPT_SLOT) != 1:
        raise ValueError(f"{source} must hold {PROMPT_SLOT} exactly once, got {prompt_format!r}")


def in_prompt_format(prompt_format, text: str) -> str:
    """text put into a recorded prompt format: in_prompt_format("{prompt} ||", "name[X]") ->
    "name[X] ||". Text that already has the format's fixed parts around it ("name[X] ||") is
    returned as it is, so a prompt typed in the trained form is not formatted twice. None:
    plain prompts, text as it is."""
    if prompt_format is None:
        return text
    before, after = prompt_format.split(PROMPT_SLOT)
    if (before or after) and text.startswith(before) and text.endswith(after) and \
            len(text) >= len(before) + len(after):
        return text
    return before + text + after
