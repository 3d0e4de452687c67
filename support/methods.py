"""Every adaptation method of LoRA §5.1 besides full fine-tuning, by one name each: apply it,
count it, save it, load it. The methods themselves are in support/baselines.py (FT^Top2,
BitFit, Adapter^H, Adapter^L) and support/prefix.py (PreEmbed, PreLayer); LoRA is lora.py's.

    apply_method(model, name, **settings)   freeze the base, add the method (trainable)
    paper_params(name, config, **settings)  |Θ| by the paper's formula (§5.1)
    method_state_dict(model)                the method's tensors: those with requires_grad
    save_method(model, path)                a small safetensors file: only those tensors, with
                                            method, settings, base (and prompt format) as metadata
    read_method(path)                       such a file's metadata, or a LoRA adapter file's,
                                            without a model: method, settings, base, prompt format
    load_method(model, path)                any such file, or a LoRA adapter file, onto its base
    method_label(method, settings)          how reports name it: "PreLayer (l_p=8, l_i=8)"

sample.py loads every file through read_method and load_method, LoRA's included.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from lora import paper_num_params
from model import GPT
from support.adapters import (base_fingerprint, check_prompt_format, load_adapter,
                              read_adapter)
from support.baselines import (adapter_h, adapter_l, adapter_param_count, bitfit, bitfit_params,
                               ft_top2, ft_top2_params)
from support.common import atomic_write, check_finite, check_tensors, short_list
from support.prefix import pre_embed, pre_layer, prefix_params

METHODS = {"ft_top2": ft_top2, "bitfit": bitfit, "adapter_h": adapter_h,
           "adapter_l": adapter_l, "pre_embed": pre_embed, "pre_layer": pre_layer}
# Each method's name as §5.1 and Table 3 write it, for labels and reports.
PAPER_NAMES = {"ft": "FT", "lora": "LoRA", "ft_top2": "FT^Top2", "bitfit": "BitFit",
               "adapter_h": "Adapter^H", "adapter_l": "Adapter^L", "pre_embed": "PreEmbed",
               "pre_layer": "PreLayer"}


def apply_method(model, method: str, **settings):
    """METHODS[method](model, **settings): the base frozen, only the method's tensors trainable
    (fp32 on a half-precision base); returns the model. Unknown method or settings: ValueError."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    try:
        return METHODS[method](model, **settings)
    except TypeError as e:  # a setting the method does not take, or one it needs
        raise ValueError(f"{method}: {e}") from None


def paper_params(method: str, config, **settings) -> int:
    """|Θ| of §5.1's formulas for a GPT-2 of config: FT^Top2 and BitFit count their tensors,
    Adapter^H/L L̂_Adpt × (2 d r + r + d) + 2 L̂_LN d, PreEmbed d (l_p + l_i), PreLayer
    L d (l_p + l_i), "lora" 2 L̂ d r (lora.paper_num_params: rank, targets)."""
    if method == "lora":
        return paper_num_params(config, settings["rank"], settings.get("targets", ("q", "v")))
    if method in ("adapter_h", "adapter_l"):
        return adapter_param_count(method[-1].upper(), config.n_layer, config.n_embd,
                                   settings["bottleneck"])
    if method in ("pre_embed", "pre_layer"):
        return prefix_params(method, config, settings["l_p"], settings["l_i"])
    counts = {"ft_top2": ft_top2_params, "bitfit": bitfit_params}
    if method not in counts:
        raise ValueError(f"unknown method {method!r}: use lora or one of {', '.join(METHODS)}")
    return counts[method](config)


def method_state_dict(model) -> dict:
    """The method's tensors {name: tensor}: the parameters with requires_grad (the method made
    them, and only them, trainable; the optimizer sees the same set)."""
    if getattr(model, "method_config", None) is None:
        raise ValueError("the model has no method: call apply_method (or load_method) first")
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_method(model, path, base_name=None, prompt_format=None):
    """Write the method's tensors to a safetensors file, atomically, with metadata
    method_config (method and settings), base_name, base_config, base_fingerprint (of the
    frozen base tensors, support.adapters.base_fingerprint) and base_dtype. Non-finite tensors
    are a ValueError, nothing written. Returns the path.
    prompt_format: the form of the task's prompts, as save_adapter records it (E2E:
    "{prompt} ||", support.adapters.PROMPT_SLOT where the input goes), for sample.py; None
    records none. A format without exactly one PROMPT_SLOT is a ValueError."""
    from safetensors.torch import save_file

    if prompt_format is not None:
        check_prompt_format(prompt_format, "prompt_format")
    tensors = {k: v.contiguous().cpu() for k, v in method_state_dict(model).items()}
    check_finite(tensors, path)
    meta = {"format": "pt", "method_config": json.dumps(model.method_config),
            "base_name": str(base_name or getattr(model, "name", "") or ""),
            "base_config": json.dumps(asdict(model.config)),
            "base_fingerprint": json.dumps(_fingerprint(model, set(tensors))),
            "base_dtype": str(model.wte.weight.dtype).removeprefix("torch.")}
    if prompt_format is not None:
        meta["prompt_format"] = prompt_format
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))
    return path


def read_method(path) -> dict:
    """The metadata of a file of save_method or save_adapter, read and checked without a model
    (sample.py needs the base and the method before it builds the model):
    {"method": a name of METHODS or "lora", "settings": {...} (apply_method's, or LoRA's
    lora_config), "base_name": str or None (none recorded), "base_config": {...},
    "prompt_format": str or None}. A file that is neither, or whose metadata is malformed, is
    a ValueError; a missing file a FileNotFoundError. Whether the file fits a base model is
    load_method's to check."""
    meta = _metadata(path)
    if "lora_config" in meta:
        _, meta = read_adapter(path)
        cfg = {"method": "lora", **meta["lora_config"]}
        base = {"name": meta.get("base_name", ""), "config": meta["base_config"]}
    else:
        _, cfg, base = _read(path, meta)
    return {"method": cfg["method"], "settings": {k: v for k, v in cfg.items() if k != "method"},
            "base_name": base["name"] or None, "base_config": base["config"],
            "prompt_format": meta.get("prompt_format")}


def method_label(method: str, settings: dict) -> str:
    """How a report names a method: its name in the paper and its main settings,
    "PreLayer (l_p=8, l_i=8)", "Adapter^H (r=8)" (r: the bottleneck, §5.1's name for it),
    "LoRA (r=4, alpha=32, q,v)", "BitFit"."""
    shown = {"lora": ("rank", "alpha", "targets"), "adapter_h": ("bottleneck",),
             "adapter_l": ("bottleneck",), "pre_embed": ("l_p", "l_i"),
             "pre_layer": ("l_p", "l_i")}.get(method, ())
    names = {"rank": "r", "bottleneck": "r"}
    parts = [",".join(settings[k]) if k == "targets" else f"{names.get(k, k)}={settings[k]}"
             for k in shown]
    name = PAPER_NAMES.get(method, method)
    return f"{name} ({', '.join(parts)})" if parts else name


def load_method(model, path):
    """Load a file of save_method, or a LoRA adapter file (support.adapters.load_adapter), onto
    its base model, a plain GPT; returns the model with the method applied and its tensors.

    Strict, and checked before the model is touched (a failed load leaves it as it came): the
    method and its settings, the base's architecture and weights (fingerprint, up to the
    rounding of both dtypes), the tensors' names, shapes and finiteness. One ValueError each."""
    meta = _metadata(path)
    if "lora_config" in meta:
        return load_adapter(model, path)
    tensors, cfg, base = _read(path, meta)
    if getattr(model, "lora_config", None) is not None or \
            getattr(model, "method_config", None) is not None:
        raise ValueError(f"{path}: the model already has LoRA or another method")
    ours = asdict(model.config)
    diff = [k for k in ours if k != "dropout" and base["config"].get(k) != ours[k]]
    if diff:
        raise ValueError(f"{path}: the method is for another base model: " + ", ".join(
            f"{k}={base['config'].get(k)} (this model: {ours[k]})" for k in diff))
    settings = {k: v for k, v in cfg.items() if k != "method"}
    with torch.device("meta"):  # the method on a weightless copy: its tensors' names, shapes
        probe = apply_method(GPT(model.config), cfg["method"], **settings)
    check_tensors({n: p.shape for n, p in probe.named_parameters() if p.requires_grad},
                  tensors, f"{path}: the method's tensors do not fit this model")
    frozen = {n.replace(".module.", ".") for n, _ in probe.named_parameters() if n not in tensors}
    _check_base(model, base, frozen, path)
    apply_method(model, cfg["method"], **settings)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in tensors:
                p.copy_(tensors[n])
    return model


def _fingerprint(model, trained: set) -> dict:
    """base_fingerprint of the tensors not in trained, by their names in a plain GPT (Then,
    which inserts adapters, adds "module." to the names of what it wraps)."""
    return {k.replace(".module.", "."): v for k, v in base_fingerprint(model).items()
            if k not in trained}


def _metadata(path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such method file")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path}: cannot read the adapter or method file, the file is "
                         f"truncated or corrupt ({type(e).__name__})") from None


def _read(path, meta):
    """(tensors, method_config, {config, fingerprint, dtype, name}) of a save_method file."""
    from safetensors.torch import load_file

    need = ("method_config", "base_config", "base_fingerprint", "base_dtype")
    if any(k not in meta for k in need):
        raise ValueError(f"{path}: not a file of save_method or save_adapter (its metadata lacks "
                         f"{[k for k in need if k not in meta]})")
    try:
        cfg, config, fp = (json.loads(meta[k]) for k in need[:3])
    except json.JSONDecodeError:
        raise ValueError(f"{path}: the file's metadata is corrupt") from None
    if not (isinstance(cfg, dict) and cfg.get("method") in METHODS):
        raise ValueError(f"{path}: unknown method_config {cfg!r}: methods are "
                         f"{', '.join(METHODS)}")
    dtype = getattr(torch, str(meta["base_dtype"]), None)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and isinstance(fp, dict)
            and isinstance(config, dict)):
        raise ValueError(f"{path}: the file's base metadata is malformed")
    if "prompt_format" in meta:
        check_prompt_format(meta["prompt_format"], f"{path}: the file's prompt_format")
    tensors = load_file(str(path))
    check_finite(tensors, path)
    return tensors, cfg, dict(config=config, fingerprint=fp, dtype=dtype,
                              name=meta.get("base_name", ""))


def _check_base(model, base: dict, names, path):
    """The file's base must be this model's weights: the fingerprint of every frozen tensor,
    each value equal up to the rounding of the file's and the model's dtypes."""
    theirs, ours = base["fingerprint"], base_fingerprint(model)
    if set(theirs) != set(names):
        raise ValueError(f"{path}: the file's base_fingerprint does not list the base tensors: "
                         f"{short_list(sorted(set(theirs) ^ set(names)), 3)}")
    dtypes = [torch.finfo(base["dtype"]), torch.finfo(model.wte.weight.dtype)]
    for k in names:
        try:
            a, b = torch.tensor(theirs[k], dtype=torch.float64), torch.tensor(ours[k])
            v = torch.maximum(a.abs(), b.abs())
            same = a.shape == b.shape and bool(
                (a - b).abs().le(sum(f.eps * (v + f.tiny) for f in dtypes)).all())
        except (TypeError, ValueError, RuntimeError):  # not a list of numbers
            raise ValueError(f"{path}: the file's base_fingerprint is malformed at {k}") from None
        if not same:
            name = f" '{base['name']}'" if base["name"] else ""
            raise ValueError(f"{path}: the method was trained on other base weights{name}: "
                             f"{k} differs (fingerprint mismatch)")
