"""GPT-2 in one file: the model LoRA adapts, exactly the function of OpenAI's GPT-2.

Module names follow GPT-2's checkpoints (wte, wpe, h.N.ln_1, h.N.attn.c_attn, h.N.attn.c_proj,
h.N.ln_2, h.N.mlp.c_fc, h.N.mlp.c_proj, ln_f), so a checkpoint loads by name and lora.py can point
at the matrices the paper adapts: `attn.c_attn` is W_q, W_k and W_v fused into one (C, 3C) linear
map, `attn.c_proj` is W_o (LoRA §4.2, Table 5).

Reading order: GPTConfig -> CausalSelfAttention -> MLP -> Block -> KVCache -> GPT.forward ->
checkpoints. Choosing tokens is support/decoding.py's; `transformers` is used only by the tests.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from support.common import (EOT_TOKEN, atomic_write_set, check_finite, check_manifest, check_range,
                            check_tensors)


@dataclass
class GPTConfig:
    block_size: int = 1024  # n_positions: the longest sequence the model can see
    vocab_size: int = 50257  # GPT-2's BPE vocabulary (tiktoken "gpt2")
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # GPT-2 was trained with 0.1; 0.0 for fine-tuning and inference
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        _check_config(self)  # a field of the wrong type or range: one ValueError naming it


PRETRAINED = {  # the four released sizes; head size is 64 in all of them
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.layer = layer  # its index in the model: its buffers in a KVCache
        # q, k and v of all heads in one matrix: the output is [q | k | v], each n_embd wide.
        # LoRA adapts slices of it (lora.py), by default the q and v slices (paper §4.2).
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # W_o
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        nh, hs = self.n_head, C // self.n_head
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # a KVCache: this layer's past keys and values, then these
            k, v = cache.append(self.layer, k, v)  # (B, nh, S, hs): all positions so far, S >= T
        S = k.size(2)
        # Query t (at absolute position S - T + t) may attend to keys 0 .. S - T + t.
        if T == S:  # no past: the usual causal mask
            mask, is_causal = None, True
        elif T == 1:  # one new token: it sees every cached position
            mask, is_causal = None, False
        else:  # a chunk after a past: causal mask aligned to the bottom-right
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of the positions seen so far, one buffer pair per layer: generation runs
    the prompt once (prefill), then each new token attends to them, not to a recomputed prefix."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled, the same in every layer: (B, nh, T_max, hs) each

    def append(self, layer: int, k, v):
        """Store layer's k, v (B, nh, T, hs) of the new positions; -> those of all so far."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer][:, :, start:end], self.v[layer][:, :, start:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, S, hs)

    def reorder(self, index: torch.Tensor):
        """Keep rows `index` of the batch (beam search keeps the best beams)."""
        self.k, self.v = [k[index] for k in self.k], [v[index] for v in self.v]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: GPT-2 reads logits off the token embedding matrix (one tensor, two uses).
        self.lm_head.weight = self.wte.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """GPT-2's init for training from scratch: N(0, 0.02) weights, zero biases, and the two
        projections that write into the residual stream (attn.c_proj, mlp.c_proj) scaled by
        1/sqrt(2 * n_layer), because each block adds two of them to the stream (GPT-2 paper §2.3).
        Loading a checkpoint overwrites all of it."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            elif name.endswith(".weight") and p.dim() == 2:  # Linear and Embedding
                nn.init.normal_(p, 0.0, std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:  # LayerNorm weight
                nn.init.ones_(p)

    def num_params(self) -> int:
        """Parameters counted once (a tied lm_head shares wte's tensor)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, *, label_smoothing=0.0, reduction="mean", cache=None,
                last_only=False, target_index=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size), or the loss if targets is given.

        targets (B, T): the next token at each position, -100 where no loss is taken (E2E: the
        prompt: only the target text y is learned, LoRA eq. 2); only the targets are projected to
        the vocabulary (the largest matmul), gathered by target_index (N,): their flat positions
        in B*T, found here if not given (a GPU sync). reduction: "mean", "sum" or "none" (per
        target). cache: a KVCache; idx continues its positions. last_only: last position only."""
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's "
                             f"block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x, cache)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x)  # (B, T or 1, vocab_size)
        if target_index is None:  # E2E: a third of the positions or fewer; nonzero waits for a GPU
            target_index = (targets.flatten() != -100).nonzero().squeeze(1)  # (N,)
        logits = self.lm_head(x.flatten(0, 1)[target_index]).float()  # (N, vocab); fp32 loss
        return F.cross_entropy(logits, targets.flatten()[target_index],
                               label_smoothing=label_smoothing, reduction=reduction)

    # ---------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, source, *, device="cpu", dtype=torch.float32, **overrides):
        """Load GPT-2 weights from a released size ("gpt2", "gpt2-medium", "gpt2-large",
        "gpt2-xl", through huggingface_hub and its cache), a directory with config.json and
        model.safetensors or pytorch_model.bin (as transformers' or our save_pretrained write
        them), or a single .safetensors or .bin file (config from its metadata or tensor shapes).
        device, dtype: of the model returned. overrides: GPTConfig fields to set (dropout=0.1;
        n_head for a bare file whose head size is not GPT-2's 64). A bad file: one ValueError."""
        config_file, path = _resolve(str(source))  # config.json (None: there is none), weights
        # Both layouts in the wild -> our names: no `transformer.` prefix (save_pretrained's),
        # no attention-mask buffers, the Conv1D weights transposed; lm_head.weight, if any, kept.
        sd = {k.removeprefix("transformer."): v.t() if k.endswith(_CONV1D) else v
              for k, v in _read_state_dict(path).items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        fields_ = _config_from_json(config_file) if config_file else _infer_config(sd, path)
        tie = fields_.pop("tie_word_embeddings", None)  # None: no config.json
        try:
            config = GPTConfig(**fields_)
        except (TypeError, ValueError) as e:  # a field of the wrong type, out of range, unknown
            raise ValueError(f"{config_file or path}: {e}") from None
        model = cls(replace(config, **overrides))  # a bad override: its own ValueError
        # The head is wte, or the file's own lm_head.weight where it differs from wte (refused if
        # config.json says tied: transformers 4 then uses wte, 5 the stored head).
        head = sd.get("lm_head.weight")
        if head is not None and torch.equal(head, sd.get("wte.weight", head)):
            del sd["lm_head.weight"]  # a stored copy of wte
        elif head is not None and tie:
            raise ValueError(f"{path}: lm_head.weight differs from wte.weight, but config.json "
                             f"has tie_word_embeddings true")
        elif head is not None or tie is False:
            model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())  # untie
        tied = model.lm_head.weight is model.wte.weight  # then loaded as wte.weight
        check_tensors({k: v.shape for k, v in model.state_dict().items()
                       if not (tied and k == "lm_head.weight")}, sd, path)  # names every mismatch
        check_finite(sd, path)  # a nan in, a nan loss later, blamed on the learning rate
        model.load_state_dict(sd, strict=False)  # exactly ours but a tied lm_head (checked)
        model.name = str(source)
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, directory):
        """Write config.json and model.safetensors in the layout of transformers' GPT2LMHeadModel
        (transformer. prefix, Conv1D orientation): it loads here and there. A model with LoRA
        layers (lora.py), merged or not, is written as the function it computes: W0 + ΔW in each
        weight, no A or B (the model itself is not changed). The two files are one set
        (common.atomic_write_set): a failure while writing leaves the old pair, never a mix."""
        directory, c = Path(directory), self.config
        directory.mkdir(parents=True, exist_ok=True)
        tied = self.lm_head.weight is self.wte.weight
        hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                     "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                     "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
                     "layer_norm_epsilon": c.layer_norm_epsilon, "activation_function": "gelu_new",
                     "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
                     "tie_word_embeddings": tied}
        if c.vocab_size > EOT_TOKEN:  # GPT-2's vocabulary: <|endoftext|> starts and ends texts
            hf_config.update(bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN)
        sd = {}
        for k, v in _lora_merged_state_dict(self).items():
            if not (tied and k == "lm_head.weight"):  # a tied head: transformers ties it back
                v = (v.t() if k.endswith(_CONV1D) else v).detach().contiguous().cpu()
                sd[k if k == "lm_head.weight" else "transformer." + k] = v
        text = json.dumps(hf_config, indent=2) + "\n"
        meta = {"format": "pt", "gpt_config": json.dumps(asdict(c))}
        atomic_write_set({directory / "config.json": lambda p: Path(p).write_text(text),
                          directory / "model.safetensors": partial(save_file, sd, metadata=meta)})


def _check_config(c: GPTConfig):
    """Each field of its type (an int where a float is asked: JSON writes 0.0 as 0) and range,
    n_embd a multiple of n_head: one ValueError naming the field, not an error inside a layer."""
    for f in fields(c):
        v, spec = getattr(c, f.name), {"dropout": "[0, 1)", "layer_norm_epsilon": "> 0"}
        if not isinstance(v, (int, float) if f.type is float else f.type) or \
                isinstance(v, bool) != (f.type is bool):  # to Python, True is an int
            raise ValueError(f"{f.name} must be of type {f.type.__name__}, got {v!r}")
        if f.type is not bool:
            check_range(f.name, v, spec.get(f.name, ">= 1"))  # the sizes: >= 1
    if c.n_embd % c.n_head:
        raise ValueError(f"n_embd {c.n_embd} is not a multiple of n_head {c.n_head}")


# ---------------------------------------------------------------- checkpoint helpers

def _lora_merged_state_dict(model) -> dict:
    """model.state_dict() as the function it computes: W0 + ΔW in each LoRA layer's weight (as
    merge_lora makes it), no lora_A / lora_B. The model is not changed."""
    from lora import LoRALinear  # imported here: lora.py builds on GPT-2, not the reverse
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            w = m.weight.detach().to(torch.float32, copy=True)  # a copy: W0 stays as it is
            for n, (a, b) in m.slices.items() if not m.merged else ():  # merged: W0 + ΔW now
                w[a:b] += m.delta_weight(n)
            sd[name + ".weight"] = w.to(m.weight.dtype)
    return sd


# GPT-2 checkpoints store these four as Conv1D weights, (in, out); nn.Linear is (out, in).
# They are transposed here, once, at load time (and back in save_pretrained).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _resolve(source: str):
    """-> (path of config.json, or None where there is none; path of the weights file)."""
    if source in PRETRAINED:
        return _from_hub(source)
    p = Path(source)
    if p.is_dir():
        found = [p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).exists()]
        if not found:
            raise FileNotFoundError(f"{p}: no model.safetensors or pytorch_model.bin in it")
        check_manifest(p, ("config.json", found[0].name))  # a torn set is refused
        return (p / "config.json" if (p / "config.json").exists() else None), found[0]
    if p.is_file():
        return None, p
    if os.sep in source or source.startswith(".") or p.suffix in (".safetensors", ".bin"):
        raise FileNotFoundError(f"{source}: no such file or directory")
    raise ValueError(f"unknown model '{source}': use one of {', '.join(PRETRAINED)}, "
                     f"a directory with config.json + model.safetensors, or a weights file")


def _from_hub(name: str):
    """Paths of config.json and model.safetensors of a released size through huggingface_hub
    alone (its cache, offline mode, proxies, endpoint); a failure: one OSError, how to go on."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError
    try:
        return tuple(Path(hf_hub_download(name, f)) for f in ("config.json", "model.safetensors"))
    except Exception as e:  # offline and not cached, no network, a gated repo, a full disk, ...
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "not in the cache, and "
               "the hub could not be reached" if isinstance(e, LocalEntryNotFoundError)
               else (str(e).strip() or repr(e)).splitlines()[0])  # the library's own words
        raise OSError(f"could not get '{name}' from the Hugging Face hub or its cache ({why}). "
                      f"Ways forward: download it once where online (it is cached), pass a "
                      f"local checkpoint (--init DIR or FILE), or train one: train.py") from None


# config.json fields that change transformers' GPT-2 and that this model does not implement, with
# the values it computes (GPT-2's first); any other value is refused, not silently ignored.
# No logit depends on dropouts, init, token ids, summary_* or reorder_and_upcast_attn (same math).
_GPT2_VALUES = {
    "model_type": ("gpt2",),
    "activation_function": ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate",
                            "gelu_python_tanh"),  # five names of the same tanh GELU
    "scale_attn_weights": (True,),  # q.k / sqrt(head size) ...
    "scale_attn_by_inverse_layer_idx": (False,),  # ... and not also / (layer index + 1)
    "add_cross_attention": (False,),  # a decoder reading an encoder, not a language model
    "n_inner": (None,),  # null (or 4 * n_embd written out): GPT-2's MLP width
}


def _config_from_json(path: Path) -> dict:
    """-> GPTConfig fields (types and ranges checked there) and tie_word_embeddings."""
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
        out = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                   block_size=c["n_positions"], vocab_size=c["vocab_size"],
                   tie_word_embeddings=c.get("tie_word_embeddings", True),
                   layer_norm_epsilon=c.get("layer_norm_epsilon", GPTConfig.layer_norm_epsilon))
        c["n_inner"] = None if c.get("n_inner") == 4 * c["n_embd"] else c.get("n_inner")
    except (ValueError, KeyError, TypeError) as e:  # not UTF-8, not JSON, not an object, ...
        raise ValueError(f"{path}: not a GPT-2 config.json ({type(e).__name__}: {e})") from None
    for field, ok in _GPT2_VALUES.items():
        if c.get(field, ok[0]) not in ok:
            raise ValueError(f"{path}: {field}={json.dumps(c[field])} is not supported "
                             f"(GPT-2: {json.dumps(ok[0])})")
    return out


def _read_state_dict(path: Path) -> dict:
    try:
        return load_file(str(path)) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights, the file is truncated or corrupt "
                         f"({type(e).__name__})") from None


def _infer_config(sd: dict, path: Path) -> dict:
    """Config of a bare weights file: from the safetensors metadata save_pretrained writes, else
    from the tensor shapes (n_head from GPT-2's head size of 64, else 1: override it)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            if "gpt_config" in (f.metadata() or {}):
                return json.loads(f.metadata()["gpt_config"])
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        raise ValueError(f"{path}: not a GPT-2 checkpoint (no wte.weight / wpe.weight)")
    vocab_size, n_embd = sd["wte.weight"].shape
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("h.")})
    return dict(n_layer=n_layer, n_head=1 if n_embd % 64 else n_embd // 64, n_embd=n_embd,
                block_size=sd["wpe.weight"].shape[0], vocab_size=vocab_size)
