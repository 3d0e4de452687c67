"""The methods LoRA is compared against in §5.1 of Hu et al. (2021), except prefix tuning
(support/prefix.py) and full fine-tuning (train.py --init).

    FT^Top2     only the last two transformer blocks train (Li & Liang 2021)     ft_top2
    BitFit      only the bias vectors train (Zaken et al. 2021)                  bitfit
    Adapter^H   two adapters per block, after attention and after the MLP        adapter_h
                (Houlsby et al. 2019)
    Adapter^L   one adapter per block, after the MLP and a new LayerNorm         adapter_l
                (Lin et al. 2020)

Each method function freezes the base, adds or unfreezes the method's tensors (requires_grad),
records its settings in model.method_config, and returns the model: train.train's one loop then
trains it unchanged (its optimizer sees only requires_grad parameters). On a bf16 or fp16 base
the trainable tensors are fp32 (as LoRA's A and B are): AdamW's small steps would round away in
half precision. support/methods.py saves and loads the result.

§3 of the LoRA paper ("Adapter Layers Introduce Inference Latency") times the two adapter
designs; bench.py times them with add_adapters, in the model's own dtype.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT

_HALF = (torch.float16, torch.bfloat16)

# The two adapter designs: per block, how many adapters, and what each block adds besides 2*C*m.
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
    """|Θ| of adapters of bottleneck m in every block of the model (LoRA §5.1): L̂_Adpt = 2L
    and L̂_LN = 0 for H, L̂_Adpt = L̂_LN = L for L."""
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
    """Insert Adapter^H or Adapter^L into every block of model, in place, in the model's dtype
    (what bench.py times); returns model. Trains nothing: adapter_h / adapter_l do."""
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


# ---------------------------------------------------------------- the methods, trainable

def ft_top2(model: GPT) -> GPT:
    """FT^Top2 (LoRA §5.1; Li & Liang 2021's FT-top2): only the last two transformer blocks
    train, every tensor in them (their Linear weights and biases, ln_1 and ln_2); the
    embeddings, the other blocks and ln_f stay frozen. Init: the pretrained weights.
    |Θ| = 2 × (12 × d_model² + 13 × d_model) with GPT-2's biases (ft_top2_params); in place,
    returns the model."""
    freeze_base(model)
    L = model.config.n_layer
    if L < 2:
        raise ValueError(f"FT^Top2 trains the last two blocks; the model has {L}")
    top = (f"h.{L - 2}.", f"h.{L - 1}.")
    return _finish(model, [n for n, _ in model.named_parameters() if n.startswith(top)],
                   "ft_top2", {})


def ft_top2_params(config) -> int:
    """|Θ| of FT^Top2: two blocks of 12 d² weights (c_attn 3d², attn.c_proj d², c_fc 4d²,
    mlp.c_proj 4d²) and 13 d vectors (9 d Linear biases, 4 d LayerNorm weights and biases)."""
    d = config.n_embd
    return 2 * (12 * d * d + (13 if config.bias else 2) * d)


def bitfit(model: GPT) -> GPT:
    """BitFit (LoRA §5.1; Zaken et al. 2021, "BitFit: simple parameter-efficient fine-tuning"):
    only the bias vectors train: every Linear bias (attn.c_attn, attn.c_proj, mlp.c_fc,
    mlp.c_proj) and every LayerNorm bias (ln_1, ln_2, ln_f); weights, LayerNorm gains and the
    embeddings stay frozen. Init: the pretrained biases (Zaken et al. start from the model).
    |Θ| = (11 × L + 1) × d_model (bitfit_params); in place, returns the model."""
    freeze_base(model)
    names = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    if not names:
        raise ValueError("BitFit trains the biases; this model has none (GPTConfig bias=False)")
    return _finish(model, names, "bitfit", {})


def bitfit_params(config) -> int:
    """|Θ| of BitFit: per block 3d + d + 4d + d Linear biases and 2d LayerNorm biases, + ln_f."""
    return (11 * config.n_layer + 1) * config.n_embd if config.bias else 0


def adapter_h(model: GPT, bottleneck: int) -> GPT:
    """Adapter^H (LoRA §5.1; Houlsby et al. 2019): an adapter of width r = bottleneck after
    attention's output projection and after the MLP of every block, inside the residual branch.
    Only the adapters train (Houlsby et al. also train the LayerNorms; §5.1's count with
    L̂_LN = 0 does not, and neither do we). Init: down as nn.Linear's default, up = 0, so the
    model starts as the base model (Houlsby et al.'s near-identity start, made exact).
    |Θ| = L̂_Adpt × (2 × d_model × r + r + d_model), L̂_Adpt = 2 L (adapter_param_count)."""
    return _adapters(model, "H", bottleneck)


def adapter_l(model: GPT, bottleneck: int) -> GPT:
    """Adapter^L (LoRA §5.1; Lin et al. 2020): one adapter of width r = bottleneck, with its own
    LayerNorm, on the output of every block (after the MLP). Only the adapters train. Init: as
    adapter_h (up = 0: the identity), the LayerNorm as nn.LayerNorm's (gain 1, bias 0).
    |Θ| = L̂_Adpt × (2 × d_model × r + r + d_model) + 2 × L̂_LN × d_model, L̂_Adpt = L̂_LN = L."""
    return _adapters(model, "L", bottleneck)


def _adapters(model, kind, bottleneck):
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"adapter bottleneck must be an integer >= 1, got {bottleneck!r}")
    freeze_base(model)
    add_adapters(model, kind, bottleneck)
    names = [n for n, p in model.named_parameters() if ".adapter." in n]
    return _finish(model, names, f"adapter_{kind.lower()}", {"bottleneck": bottleneck})


def freeze_base(model):
    """One method per model; then every base tensor frozen (LoRA §4.1's W0, for each method)."""
    if getattr(model, "lora_config", None) is not None or \
            getattr(model, "method_config", None) is not None:
        raise ValueError("the model already has LoRA or another method: one method per model")
    for p in model.parameters():
        p.requires_grad = False


def _finish(model, names, method: str, settings: dict):
    """Make the parameters `names` trainable and record the method; on a bf16 or fp16 base they
    become fp32 and their modules MasterLinear / MasterLayerNorm, which round them on use."""
    modules = dict(model.named_modules())
    half = model.wte.weight.dtype in _HALF
    for path in dict.fromkeys(n.rsplit(".", 1)[0] for n in names):  # each module once, in order
        module = modules[path]
        for attr, p in module.named_parameters(recurse=False):
            if f"{path}.{attr}" in names:
                if half:
                    p = nn.Parameter(p.detach().float())
                    setattr(module, attr, p)
                p.requires_grad = True
        if half:
            parent, _, child = path.rpartition(".")  # "" is the model (ln_f)
            setattr(modules[parent], child, _master(module))
    model.method_config = {"method": method, **settings}
    return model


class MasterLinear(nn.Linear):
    """An nn.Linear whose tensors may be fp32 on a bf16/fp16 model: rounded to the input's dtype
    on use (mixed precision's master weights), so the forward runs in the model's precision and
    AdamW updates the fp32 copies."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class MasterLayerNorm(nn.LayerNorm):
    """nn.LayerNorm with possibly fp32 gain and bias on a half-precision model (MasterLinear)."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), bias, self.eps)


def _master(module):
    """module's Master twin, holding module's very tensors (same names in the state dict)."""
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        twin = MasterLinear(module.in_features, module.out_features, bias=bias, device="meta")
    elif isinstance(module, nn.LayerNorm):
        twin = MasterLayerNorm(module.normalized_shape, module.eps, bias=bias, device="meta")
    else:
        raise TypeError(f"no fp32-master twin for {type(module).__name__}")
    twin.weight, twin.bias = module.weight, module.bias
    return twin.train(module.training)
