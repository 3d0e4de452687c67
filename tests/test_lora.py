"""LoRA core invariants (lora.py above the divider): eq. 3, init, scaling, freezing, merge,
parameter counts. Tiny models (n_embd 32, 2 layers) so everything runs in seconds on a CPU."""
import math

import pytest
import torch
import torch.nn as nn
from conftest import TINY as TINY_SIZES
from conftest import tiny_gpt
from torch.utils.flop_counter import FlopCounterMode

import lora
from model import GPT, GPTConfig
from support import adapters

TINY = GPTConfig(**TINY_SIZES)


def randomize_lora(model, seed=1, std=0.05):
    """Non-zero A and B, so ΔW != 0 (right after apply_lora B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lora_") or ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def ids(batch=2, T=16, seed=0):
    return torch.randint(0, TINY.vocab_size, (batch, T),
                         generator=torch.Generator().manual_seed(seed))


def test_logits_equal_base_right_after_apply():
    model = tiny_gpt()
    idx = ids()
    base = model(idx)
    lora.apply_lora(model, targets=("q", "k", "v", "o", "mlp"))
    assert torch.equal(model(idx), base)
    model.train()  # LoRA dropout on: B = 0 still makes the LoRA path exactly zero
    torch.manual_seed(0)
    assert torch.equal(model(idx), base)


def test_init_A_uniform_kaiming_B_zero():
    """The docstring: A ~ U(-1/√in, 1/√in) (loralib's kaiming_uniform_(a=√5)), B = 0."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(768, 768), {"q": (0, 768)}, rank=64, alpha=64)
    A, B = layer.lora_A["q"].detach(), layer.lora_B["q"].detach()
    bound = 1 / math.sqrt(768)
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.99 * bound  # fills the interval...
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # ...uniformly: std b/√3
    assert abs((A.abs() < bound / 2).float().mean().item() - 0.5) < 0.01  # not Gaussian (0.38)
    assert abs(A.mean().item()) < 0.01 * bound
    assert torch.count_nonzero(B) == 0


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_eq3_with_alpha_over_r_scaling(rslora):
    """h = W0 x + (α/r) B A x on each adapted slice (α/√r with rslora); other rows untouched."""
    torch.manual_seed(0)
    base = nn.Linear(16, 48)
    layer = lora.LoRALinear(base, {"q": (0, 16), "v": (32, 48)}, rank=4, alpha=8, rslora=rslora)
    assert layer.scaling == (8 / 2 if rslora else 8 / 4)
    randomize_lora(layer)
    x = torch.randn(3, 5, 16)
    W0x = x @ base.weight.t() + base.bias
    want = W0x.clone()
    for n, (a, b) in layer.slices.items():
        want[..., a:b] += layer.scaling * x @ (layer.lora_B[n] @ layer.lora_A[n]).t()
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got[..., 16:32], W0x[..., 16:32])  # k: not adapted


def test_disabled_slices_cost_no_flops():
    """q, v adapted on c_attn: the LoRA path costs exactly the two r-wide bottlenecks, with no
    matmul for the k slice and no (3C x C) delta formed."""
    torch.manual_seed(0)
    C, r, N = 32, 4, 10  # N = B * T tokens
    base = nn.Linear(C, 3 * C)
    layer = lora.LoRALinear(base, {"q": (0, C), "v": (2 * C, 3 * C)}, rank=r, alpha=8)
    x = torch.randn(N, C)
    with FlopCounterMode(display=False) as fc:
        layer(x)
    base_flops = 2 * N * C * 3 * C
    lora_flops = 2 * (2 * N * C * r + 2 * N * r * C)  # two slices: x A^T, then (.) B^T
    assert fc.get_total_flops() == base_flops + lora_flops


def test_dropout_only_on_lora_path():
    torch.manual_seed(0)
    base = nn.Linear(16, 48)
    layer = randomize_lora(lora.LoRALinear(base, {"q": (0, 16)}, rank=4, alpha=8, dropout=0.5))
    x = torch.randn(4, 16)
    W0x = base(x).detach()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1[:, 16:], W0x[:, 16:])  # no dropout on W0 x
    assert not torch.equal(y1[:, :16], y2[:, :16])  # dropout on the LoRA input
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("targets", [("q", "v", "o"), ("o",), ("k",), ("mlp",), ("qkv",)])
def test_only_A_and_B_change_after_optimizer_steps(targets):
    model = tiny_gpt()
    lora.apply_lora(model, targets=targets)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    idx = ids(T=17)
    for _ in range(2):  # B = 0 at step 1, so A only gets a gradient from step 2 on
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # W0 bit-identical


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_parameters_and_bias_option(bias):
    model = lora.apply_lora(tiny_gpt(), bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_names = {n for n, _ in model.named_parameters() if ".lora_" in n}
    biases = {
        "none": set(),
        "all": {n for n, _ in model.named_parameters() if n.endswith(".bias")},
        "lora_only": {f"h.{i}.attn.c_attn.bias" for i in range(TINY.n_layer)},
    }[bias]
    assert trainable == lora_names | biases
    assert set(lora.lora_state_dict(model)) == trainable
    assert lora.count_trainable(model) == (lora.paper_num_params(TINY, 4, ("q", "v"))
                                           + sum(model.get_parameter(n).numel() for n in biases))


def test_gpt2_124m_q_v_r4_has_147456_trainable_parameters():
    with torch.device("meta"):  # the real 124M shapes, no memory
        model = GPT(GPTConfig())
    lora.apply_lora(model, rank=4, alpha=32, targets=("q", "v"))
    assert lora.count_trainable(model) == 147_456 == 2 * 24 * 768 * 4
    assert lora.paper_num_params(model.config, 4, ("q", "v")) == 147_456
    line = lora.describe_trainable(model)
    assert "147,456" in line and "2·24·768·4" in line and "0.118%" in line


@pytest.mark.parametrize("targets,rank", [
    (("q",), 1), (("q", "v"), 8), (("q", "k", "v", "o"), 2), (("qkv",), 4), (("mlp",), 2),
    (("k", "o", "mlp"), 3),
])
def test_count_matches_paper_formula(targets, rank):
    """|Θ| = 2·L̂·d_model·r for square matrices; r·(d_in + d_out) per matrix in general."""
    model = lora.apply_lora(tiny_gpt(), rank=rank, targets=targets)
    C, L = TINY.n_embd, TINY.n_layer
    per_block = {"q": 2 * C, "k": 2 * C, "v": 2 * C, "o": 2 * C, "qkv": C + 3 * C,
                 "mlp": (C + 4 * C) + (4 * C + C)}
    want = L * rank * sum(per_block[t] for t in targets)
    assert lora.count_trainable(model) == lora.paper_num_params(TINY, rank, targets) == want
    if "mlp" not in targets and "qkv" not in targets:
        assert want == 2 * (L * len(targets)) * C * rank  # the paper's 2·L̂·d_model·r


def test_merge_unmerge_exact_and_idempotent():
    model = tiny_gpt()
    lora.apply_lora(model, targets=("q", "v", "o", "mlp"))
    randomize_lora(model)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = ids()
    unmerged = model(idx)
    lora.merge_lora(model)
    assert lora.is_merged(model)
    once = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.equal(once["h.0.attn.c_attn.weight"], W0["h.0.attn.c_attn.weight"])
    assert torch.equal(once["h.0.attn.c_attn.weight"][32:64], W0["h.0.attn.c_attn.weight"][32:64])
    merged = model(idx)
    assert (merged - unmerged).abs().max() <= 1e-5
    lora.merge_lora(model)  # twice = once, never a double add
    assert all(torch.equal(p, once[n]) for n, p in model.named_parameters())
    lora.unmerge_lora(model)
    lora.unmerge_lora(model)
    assert all(torch.equal(p, W0[n]) for n, p in model.named_parameters())  # bit for bit
    assert torch.equal(model(idx), unmerged)


def test_unmerge_exact_even_if_A_B_change_while_merged():
    model = randomize_lora(lora.apply_lora(tiny_gpt()))
    W0 = model.h[0].attn.c_attn.weight.detach().clone()
    lora.merge_lora(model)
    randomize_lora(model, seed=7)
    lora.unmerge_lora(model)
    assert torch.equal(model.h[0].attn.c_attn.weight, W0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_forms_delta_in_fp32_and_unmerges_exactly(dtype):
    model = randomize_lora(lora.apply_lora(tiny_gpt()), std=0.02).to(dtype)
    layer = model.h[0].attn.c_attn
    W0 = layer.weight.detach().clone()
    A, B = layer.lora_A["q"].float(), layer.lora_B["q"].float()
    exact = W0[:32].double() + layer.scaling * (B.double() @ A.double())
    naive = W0[:32] + layer.scaling * (B.to(dtype) @ A.to(dtype))  # all in dtype
    lora.merge_lora(model)
    got = layer.weight[:32].detach()
    assert torch.equal(got, exact.to(dtype))  # W0 + ΔW rounded once
    assert not torch.equal(naive.detach(), exact.to(dtype))  # what a half-precision B·A loses
    lora.unmerge_lora(model)
    assert torch.equal(layer.weight, W0)


@pytest.mark.parametrize("convert", [lambda m: m.to(torch.bfloat16), lambda m: m.half()],
                         ids=["to_bfloat16", "half"])
def test_dtype_change_of_a_merged_model_keeps_W0_restorable(convert):
    """.to(dtype) on a merged model: the weights are what converting it unmerged and merging
    would give, and unmerge gives back the converted W0 bit for bit (the record follows)."""
    model = lora.merge_lora(randomize_lora(lora.apply_lora(tiny_gpt())))
    want = lora.merge_lora(convert(randomize_lora(lora.apply_lora(tiny_gpt()))))
    convert(model)
    assert lora.is_merged(model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), want.parameters()))
    lora.unmerge_lora(model)
    W0 = convert(tiny_gpt()).h[0].attn.c_attn.weight
    assert W0.dtype != torch.float32 and torch.equal(model.h[0].attn.c_attn.weight, W0)


def test_unmerge_refuses_after_dtype_change_behind_its_back():
    """A weight swapped without Module.to (so without the merge record) cannot give W0 back."""
    model = lora.merge_lora(randomize_lora(lora.apply_lora(tiny_gpt())))
    layer = model.h[0].attn.c_attn
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    with pytest.raises(ValueError, match="unmerge before changing dtype"):
        lora.unmerge_lora(model)


@pytest.mark.parametrize("merged", [False, True])
def test_reset_parameters_keeps_W0_and_restarts_A_and_B(merged):
    """Meta-device materialization and FSDP call reset_parameters on every module: nn.Linear's
    would re-draw W0, the pretrained weight. Here W0 stays and only A and B restart (§4.1)."""
    model = randomize_lora(lora.apply_lora(tiny_gpt(), targets=("q", "v", "mlp")))
    if merged:
        lora.merge_lora(model)
    A = model.h[0].attn.c_attn.lora_A["q"].detach().clone()
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            m.reset_parameters()
    base = tiny_gpt()
    assert not lora.is_merged(model)
    assert all(torch.equal(model.get_parameter(n), p) for n, p in base.named_parameters())
    layer = model.h[0].attn.c_attn
    assert all(torch.count_nonzero(B) == 0 for B in layer.lora_B.values())  # ΔW = 0
    A2 = layer.lora_A["q"].detach()
    assert not torch.equal(A2, A) and A2.abs().max() <= 1 / math.sqrt(32)  # redrawn, U(±1/√in)
    assert torch.equal(model(ids()), base(ids()))


def test_state_dict_of_a_merged_model_holds_W0():
    """A merged layer's weight is W0 + ΔW, and its A and B are saved too: saving that weight
    would add ΔW twice in a model that loads the state dict unmerged."""
    model = randomize_lora(lora.apply_lora(tiny_gpt(), targets=("q", "v", "o")))
    unmerged_sd = {k: v.clone() for k, v in model.state_dict().items()}
    want = model(ids())
    lora.merge_lora(model)
    W = model.h[0].attn.c_attn.weight.detach().clone()
    sd = model.state_dict()
    assert torch.equal(model.h[0].attn.c_attn.weight, W) and lora.is_merged(model)
    assert sd.keys() == unmerged_sd.keys()
    assert all(torch.equal(sd[k], unmerged_sd[k]) for k in sd)
    fresh = lora.apply_lora(tiny_gpt(seed=3), targets=("q", "v", "o"))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(ids()), want)
    with pytest.raises(ValueError, match="merged LoRA layer h.0.attn.c_attn: call unmerge_lora"):
        model.load_state_dict(sd)  # W0 copied into a layer that says it holds W0 + ΔW
    lora.unmerge_lora(model).load_state_dict(sd)
    assert torch.equal(model(ids()), want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "positive integer"),
    (dict(rank=33), "larger than"),
    (dict(targets=("q", "x")), "unknown LoRA targets"),
    (dict(targets=("qkv", "q")), "already covers"),
    (dict(bias="some"), "bias must be"),
    (dict(alpha=0), "alpha must be positive"),
    (dict(dropout=1.0), "dropout"),
])
def test_apply_lora_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.apply_lora(tiny_gpt(), **kwargs)


def test_apply_twice_and_merge_without_lora_are_errors():
    model = lora.apply_lora(tiny_gpt())
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.merge_lora(tiny_gpt())  # silently doing nothing is the bug (microsoft/LoRA #34)


def test_state_dict_keys_of_base_unchanged():
    """LoRALinear is the nn.Linear: W0 keeps its key, LoRA tensors sit beside it."""
    model = tiny_gpt()
    keys = set(model.state_dict())
    lora.apply_lora(model)
    new = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert new == {f"h.{i}.attn.c_attn.lora_{m}.{s}" for i in range(2) for m in "AB" for s in "qv"}


def test_training_a_merged_model_is_an_error_not_a_silent_no_op():
    model = lora.merge_lora(randomize_lora(lora.apply_lora(tiny_gpt())))
    model.train()
    idx = ids(T=9)
    with pytest.raises(ValueError, match="unmerge_lora before training"):
        model(idx[:, :-1], idx[:, 1:])
    with torch.no_grad():
        model(idx)  # inference in train mode is fine


def test_unload_lora_gives_a_plain_gpt_with_merged_weights(tmp_path):
    model = randomize_lora(lora.apply_lora(tiny_gpt(), targets=("q", "v", "mlp")))
    want = model(ids())
    plain_keys = set(tiny_gpt().state_dict())
    adapters.unload_lora(model)
    assert set(model.state_dict()) == plain_keys
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert (model(ids()) - want).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "merged")
    again = GPT.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(again(ids()), model(ids()))
    base = tiny_gpt()
    adapters.unload_lora(randomize_lora(lora.apply_lora(base)), merge=False)
    assert torch.equal(base(ids()), tiny_gpt()(ids()))  # merge=False: W0 exactly


def test_defaults_are_the_papers_gpt2_setting():
    """apply_lora's docstring: Table 11's r = 4, α = 32, dropout 0.1 on W_q and W_v."""
    model = lora.apply_lora(tiny_gpt())
    assert model.lora_config == dict(rank=4, alpha=32, targets=["q", "v"], dropout=0.1,
                                     bias="none", rslora=False)
    layer = model.h[0].attn.c_attn
    assert layer.scaling == 8 and layer.lora_dropout.p == 0.1 and set(layer.slices) == {"q", "v"}


def test_merged_model_costs_exactly_the_base_flops():
    idx = ids()
    with FlopCounterMode(display=False) as fc:
        tiny_gpt()(idx)
    base = fc.get_total_flops()
    model = lora.merge_lora(randomize_lora(lora.apply_lora(tiny_gpt(), targets=("q", "v", "o"))))
    with FlopCounterMode(display=False) as fc:
        model(idx)
    assert fc.get_total_flops() == base


def test_merge_keeps_only_a_few_percent_of_W0():
    """merge's docstring: with ΔW small next to W0, a few percent of the entries are recorded."""
    model = lora.apply_lora(tiny_gpt(n_embd=128), targets=("q", "v"))
    randomize_lora(model, std=3e-3)  # mean |ΔW| ~ 1e-4 next to mean |W0| ~ 0.016
    lora.merge_lora(model)
    for layer in lora.lora_layers(model).values():
        for n, (a, b) in layer.slices.items():
            assert 0 < len(layer._merges[n].lost) < 0.05 * (b - a) * layer.in_features


def train_lora(model, steps=40, lr=2e-4):
    """apply_lora (seeded) and `steps` AdamW steps on random batches -> (model, initial A)."""
    torch.manual_seed(1)
    lora.apply_lora(model, dropout=0.0)
    A0 = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, TINY.vocab_size, (4, 17), generator=g)
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, A0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_trains_its_adapter_in_fp32_like_an_fp32_base(dtype):
    """A and B are fp32 whatever the base's dtype: in bf16, AdamW's small steps (lr 2e-4, the
    paper's) would round away on about half of A's entries in 40 steps."""
    ref, A0_ref = train_lora(tiny_gpt(n_embd=64))
    half, A0 = train_lora(tiny_gpt(n_embd=64).to(dtype))
    assert half.h[0].attn.c_attn.weight.dtype == dtype  # W0 stays in the base's dtype
    for n, A in A0.items():
        A1, A1_ref = half.get_parameter(n).detach(), ref.get_parameter(n).detach()
        assert A1.dtype == torch.float32 and torch.equal(A, A0_ref[n])  # same start
        assert (A1 != A).float().mean() > 0.99, n  # almost every entry moved
        step, step_ref = A1 - A, A1_ref - A0_ref[n]
        assert (step - step_ref).norm() < 0.1 * step_ref.norm(), n  # and as in fp32
    for n, p in ref.named_parameters():
        if ".lora_B" in n:
            B = half.get_parameter(n).detach()
            assert B.dtype == torch.float32 and (B - p).norm() < 0.1 * p.norm(), n


@pytest.mark.parametrize("convert", [lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                                     lambda m: m.double()], ids=["to_bfloat16", "half", "double"])
def test_dtype_conversion_converts_the_base_and_keeps_A_and_B_at_least_fp32(convert):
    """Module.to(dtype), .half(): W0 (and the rest of the base) converted, A and B never below
    fp32 (their gradients neither), so that training after it still moves them; the logits are
    in the base's dtype."""
    model = randomize_lora(lora.apply_lora(tiny_gpt()))
    model.train()
    model(ids()[:, :-1], ids()[:, 1:]).backward()  # gradients exist and are converted too
    convert(model)
    layer = model.h[0].attn.c_attn
    base = model.wte.weight.dtype
    assert base != torch.float32 and layer.weight.dtype == base
    want = torch.float64 if base == torch.float64 else torch.float32
    for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
        assert p.dtype == want and p.grad.dtype == want
    model.eval()
    assert model(ids()).dtype == base
