"""The adapter layers LoRA is compared against (Hu et al. 2021, §3 and Table 1; §5.1).

§3 of the LoRA paper ("Adapter Layers Introduce Inference Latency") measures two designs on
GPT-2 medium, and §5.1 defines them:

  Adapter^H (Houlsby et al. 2019): "inserts adapter layers between the self-attention module
      (and the MLP module) and the subsequent residual connection. There are two fully connected
      layers with biases in an adapter layer with a nonlinearity in between."
  Adapter^L (Lin et al. 2020): "the adapter layer applied only after the MLP module and after a
      LayerNorm".

Adapters sit in the forward path and run one after another, so they add depth a merged LoRA does
not (Table 1: up to +30% latency at batch 1). bench.py times them against LoRA; this module only
builds them: Adapter, Then (an adapter after a module), add_adapters, and the parameter count
|Θ| of §5.1 with the bottleneck that reaches a given |Θ| (Table 1 fixes |Θ| at 0.5M and 11M).
"""

import torch.nn as nn

from model import GPT

# The two designs: per block, how many adapters, and what each block adds besides 2*C*m.
#   H (Houlsby): two adapters, after attention's output projection and after the MLP, inside the
#     residual branch (before the residual add), with the model's own nonlinearity, a GELU:
#     2 * (2*C*m + m + C).
#   L (Lin): one adapter with its own LayerNorm on the block's output, after the MLP, with a
#     ReLU: 2*C*m + m + 3*C (the LayerNorm's weight and bias are the extra 2*C).
ADAPTER_KINDS = ("H", "L")


class Adapter(nn.Module):
    """Bottleneck adapter: h + up(f(down(norm(h)))), with C -> m -> C linear maps.

    Houlsby et al. (2019) start adapters near the identity; here up is exactly zero (weights and
    bias), so a fresh adapter is the identity and the adapted model starts as the base model.
    Parameters: 2*C*m + m + C, plus 2*C for the LayerNorm of Adapter^L (LoRA §5.1's
    |Θ| = L̂_Adpt × (2 × d_model × r + r + d_model) + 2 × L̂_LN × d_model, with r = m).
    """

    def __init__(self, n_embd: int, bottleneck: int, act: nn.Module, layer_norm: bool = False):
        super().__init__()
        self.ln = nn.LayerNorm(n_embd) if layer_norm else nn.Identity()
        self.down = nn.Linear(n_embd, bottleneck)
        self.act = act
        self.up = nn.Linear(bottleneck, n_embd)
        nn.init.zeros_(self.up.weight)  # identity at init: the adapted model is the base model
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(self.act(self.down(self.ln(h))))  # (B, T, C)


class Then(nn.Module):
    """module, then adapter on its output: inserts an adapter without editing model.py."""

    def __init__(self, module: nn.Module, adapter: Adapter):
        super().__init__()
        self.module = module
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.module(*args, **kwargs))


def _check_kind(kind: str):
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}: use one of {ADAPTER_KINDS}")


def adapter_param_count(kind: str, n_layer: int, n_embd: int, bottleneck: int) -> int:
    """|Θ| of adapters of bottleneck m in every block of the model (LoRA §5.1)."""
    _check_kind(kind)
    C, m = n_embd, bottleneck
    if kind == "H":
        return n_layer * 2 * (2 * C * m + m + C)
    return n_layer * (2 * C * m + m + 3 * C)


def bottleneck_for(kind: str, n_layer: int, n_embd: int, target: int) -> int:
    """The bottleneck m whose parameter count is nearest to target (Table 1 fixes |Θ|, 0.5M or
    11M, and the bottleneck follows). The count is linear in m, count(m) = a*m + b, so
    m = round((target - b) / a), at least 1."""
    b = adapter_param_count(kind, n_layer, n_embd, 0)
    a = adapter_param_count(kind, n_layer, n_embd, 1) - b
    return max(1, round((target - b) / a))


def add_adapters(model: GPT, kind: str, bottleneck: int) -> GPT:
    """Insert Adapter^H or Adapter^L into every block of model, in place; returns model."""
    _check_kind(kind)
    C = model.config.n_embd
    like = dict(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
    for i, block in enumerate(model.h):
        if kind == "H":
            for parent in (block.attn, block.mlp):
                adapter = Adapter(C, bottleneck, nn.GELU()).to(**like)
                parent.c_proj = Then(parent.c_proj, adapter)
        else:
            adapter = Adapter(C, bottleneck, nn.ReLU(), layer_norm=True).to(**like)
            model.h[i] = Then(block, adapter)
    return model


def adapter_params(model: nn.Module) -> int:
    """Parameters of every Adapter inside model (what add_adapters added)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, Adapter) for p in m.parameters())
