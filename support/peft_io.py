"""PEFT (huggingface/peft) adapter files, both ways: a LoRA trained here runs in PEFT on
transformers' GPT-2, and a PEFT LoRA of GPT-2 loads here. Not in the paper; built on lora.py.
"""

import json
import re
from pathlib import Path

import torch

from lora import lora_config, lora_layers, lora_state_dict
from model import _read_state_dict
from support.adapters import _copy_lora, _lora_applied
from support.common import atomic_write, short_list

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
    cfg = lora_config(model)
    layers = lora_layers(model)
    R = max(layer.rank * len(layer.slices) for layer in layers.values())
    tensors = {}
    for name, layer in layers.items():
        f = dict(dtype=layer.lora_dtype)  # fp32 also on a bf16 base (PEFT keeps it)
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
    atomic_write(d / "adapter_model.safetensors",
                  lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(d / "adapter_config.json",
                  lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return d


def import_peft(model, directory):
    """Load a PEFT LoRA adapter for GPT-2 (directory with adapter_config.json and
    adapter_model.safetensors or .bin) into a model without LoRA; returns the model.

    PEFT's whole-module LoRAs become our targets: c_attn -> "qkv", attn.c_proj -> "o", mlp.c_fc
    and mlp.c_proj -> "mlp"; scaling lora_alpha / r (lora_alpha / √r with use_rslora). A module
    the adapter leaves out (only c_fc, or some layers only) keeps B = 0, so ΔW = 0 there, as in
    PEFT. A rank above a module's width is accepted, as PEFT runs it (apply_lora refuses it
    for a new adapter). Per-module ranks (rank_pattern), DoRA and other PEFT methods are
    refused. A bad file is a ValueError (FileNotFoundError when one is missing) that names it,
    and leaves the model as it came."""
    d = Path(directory)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: not a PEFT adapter config (a JSON object)")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{d}: a PEFT {cfg.get('peft_type')} adapter, only LORA can be imported")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if cfg.get(k)]
    if unsupported:
        raise ValueError(f"{d}: PEFT options {unsupported} are not supported")
    missing = [k for k in ("r", "lora_alpha") if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_path}: no {' or '.join(map(repr, missing))} in it (a PEFT LoRA "
                         f"config has the rank r and lora_alpha)")
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
                         f"{short_list(sorted(unknown))}")
    targets = {k.rsplit(".", 1)[1] for k in tensors if ".lora_" in k}
    if not targets:
        raise ValueError(f"{weights}: no LoRA tensors in it")
    settings = dict(rank=cfg["r"], alpha=cfg["lora_alpha"], targets=targets,
                    dropout=cfg.get("lora_dropout", 0.0), bias=cfg.get("bias", "none"),
                    rslora=bool(cfg.get("use_rslora", False)))
    with _lora_applied(model, settings, cfg_path):  # taken off again if the tensors do not fit
        full = {k: v.clone() for k, v in lora_state_dict(model).items()}  # B = 0 where not given
        return _copy_lora(model, {**full, **tensors}, weights)
