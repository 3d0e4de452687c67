"""PEFT interoperability both ways, checked by running huggingface/peft on transformers' GPT-2."""
import json

import pytest
import torch
from test_lora import randomize_lora

import lora
from model import GPT, GPTConfig
from support import peft_io

peft = pytest.importorskip("peft")  # a test requirement (requirements-test.txt)


def idx():
    return torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))


def hf_logits(model):
    with torch.no_grad():
        return model(idx()).logits


def randomize_biases(model, names, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kwargs", [
    dict(targets=("q", "v")),  # the paper's default, slices of the fused c_attn
    dict(targets=("k", "o", "mlp"), rank=3, alpha=5, bias="lora_only"),
    dict(targets=("q", "v", "mlp"), rank=2, bias="all", rslora=True),
])
def test_export_loads_in_peft_with_the_same_logits(tiny_base, tmp_path, kwargs):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    ours = lora.apply_lora(GPT.from_pretrained(tiny_base).eval(), **kwargs)
    randomize_lora(ours)
    randomize_biases(ours, {n for n in lora.lora_state_dict(ours) if n.endswith(".bias")})
    peft_io.export_peft(ours, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    if kwargs["targets"] == ("q", "v"):
        assert cfg["r"] == 8 and cfg["lora_alpha"] == 64  # rank 2r on c_attn, same α/r
        from safetensors.torch import load_file
        B = load_file(tmp_path / "peft" / "adapter_model.safetensors")[
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
        assert B.shape == (96, 8) and torch.count_nonzero(B[32:64]) == 0  # k rows: zero
    theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_base),
                                       tmp_path / "peft")
    theirs.eval()
    with torch.no_grad():
        want = ours(idx())
    assert (hf_logits(theirs) - want).abs().max() <= 1e-4
    assert (hf_logits(GPT2LMHeadModel.from_pretrained(tiny_base).eval()) - want).abs().max() > 1e-2


@pytest.mark.parametrize("peft_kwargs", [
    dict(target_modules=["c_attn", "c_proj", "c_fc"]),  # c_proj: attn.c_proj and mlp.c_proj
    dict(target_modules=["c_attn"], use_rslora=True, bias="lora_only"),
    dict(target_modules=["c_fc"], layers_to_transform=[1]),  # leaves modules out
])
def test_import_of_a_peft_adapter_gives_peft_logits(tiny_base, tmp_path, peft_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, fan_in_fan_out=True, init_lora_weights=False,
                        task_type="CAUSAL_LM", **peft_kwargs)  # False: random B, ΔW != 0
    theirs = get_peft_model(GPT2LMHeadModel.from_pretrained(tiny_base), config).eval()
    randomize_biases(theirs, {n for n, p in theirs.named_parameters()
                              if p.requires_grad and n.endswith(".bias")})
    theirs.save_pretrained(tmp_path / "peft")
    ours = peft_io.import_peft(GPT.from_pretrained(tiny_base).eval(), tmp_path / "peft")
    with torch.no_grad():
        got = ours(idx())
    assert (got - hf_logits(theirs)).abs().max() <= 1e-4
    assert lora.count_trainable(ours) >= sum(p.numel() for p in theirs.parameters()
                                             if p.requires_grad)


def test_export_then_import_round_trip(tiny_base, tmp_path):
    ours = randomize_lora(lora.apply_lora(GPT.from_pretrained(tiny_base).eval()))
    peft_io.export_peft(ours, tmp_path / "p")
    back = peft_io.import_peft(GPT.from_pretrained(tiny_base).eval(), tmp_path / "p")
    assert back.lora_config["targets"] == ["qkv"]  # PEFT's one LoRA over the fused c_attn
    with torch.no_grad():
        assert (back(idx()) - ours(idx())).abs().max() <= 1e-5


def test_import_errors(tiny_base, tmp_path):
    base = GPT.from_pretrained(tiny_base).eval()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peft_io.import_peft(base, tmp_path)
    d = peft_io.export_peft(randomize_lora(lora.apply_lora(GPT.from_pretrained(tiny_base))),
                         tmp_path / "p")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        peft_io.import_peft(base, d)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"c_attn": 2}}))
    with pytest.raises(ValueError, match="rank_pattern"):
        peft_io.import_peft(base, d)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only LORA"):
        peft_io.import_peft(base, d)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="without LoRA"):
        peft_io.import_peft(lora.apply_lora(GPT.from_pretrained(tiny_base)), d)
    with pytest.raises(ValueError, match=r"has shape \(8, 32\), the model expects \(8, 64\)"):
        peft_io.import_peft(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64)), d)
    (d / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        peft_io.import_peft(base, d)


def test_peft_default_A_init_is_the_same_uniform_as_ours():
    """reset_lora_parameters' docstring: PEFT's default init of A is ours, U(±1/√d_in)."""
    import math

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(768, 768))
    net = get_peft_model(net, LoraConfig(r=64, lora_alpha=64, target_modules=["0"]))
    A = net.base_model.model[0].lora_A["default"].weight.detach()
    bound = 1 / math.sqrt(768)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.02 * bound


def test_bad_config_or_tensors_name_the_file_and_leave_the_model_as_it_came(tiny_base, tmp_path):
    from test_lora_adapters import snapshot

    d = peft_io.export_peft(randomize_lora(lora.apply_lora(GPT.from_pretrained(tiny_base))),
                            tmp_path / "p")
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cases = [({k: v for k, v in cfg.items() if k != "r"}, ValueError,
              f"^{cfg_path}: no 'r' in it"),
             ({k: v for k, v in cfg.items() if k not in ("r", "lora_alpha")}, ValueError,
              f"^{cfg_path}: no 'r' or 'lora_alpha' in it"),
             ({**cfg, "lora_alpha": None}, ValueError, f"^{cfg_path}: "),
             ({**cfg, "lora_alpha": float("inf")}, ValueError, f"^{cfg_path}: .*alpha"),
             ({**cfg, "r": 0}, ValueError, f"^{cfg_path}: .*rank must be a positive integer"),
             ({**cfg, "r": cfg["r"] + 1}, ValueError, r"has shape \(8, 32\), the model expects "
                                                      r"\(9, 32\)"),
             ([cfg], ValueError, "not a PEFT adapter config")]
    base = GPT.from_pretrained(tiny_base).eval()
    before = snapshot(base)
    for bad, error, message in cases:
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(error, match=message):
            peft_io.import_peft(base, d)
        assert snapshot(base) == before
    cfg_path.write_text(json.dumps(cfg))
    assert peft_io.import_peft(base, d).lora_config["rank"] == cfg["r"]  # and then it loads


def test_import_of_a_peft_adapter_whose_rank_exceeds_a_layers_width(tiny_base, tmp_path):
    """PEFT runs r = 40 on 32-wide matrices (ΔW's rank is at most 32 there, the rest adds only
    parameters): import_peft gives PEFT's logits, and the adapter goes through our own file.
    apply_lora keeps refusing such a rank for a new adapter (a choice for training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    from support import adapters
    torch.manual_seed(0)
    config = LoraConfig(r=40, lora_alpha=16, fan_in_fan_out=True, init_lora_weights=False,
                        task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"])
    theirs = get_peft_model(GPT2LMHeadModel.from_pretrained(tiny_base), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = peft_io.import_peft(GPT.from_pretrained(tiny_base).eval(), tmp_path / "peft")
    assert ours.lora_config["rank"] == 40
    with torch.no_grad():
        got = ours(idx())
    assert (got - hf_logits(theirs)).abs().max() <= 1e-4
    path = adapters.save_adapter(ours, tmp_path / "a.safetensors")
    again = adapters.load_adapter(GPT.from_pretrained(tiny_base).eval(), path)
    with torch.no_grad():
        assert torch.equal(again(idx()), got)
    with pytest.raises(ValueError, match="larger than"):
        lora.apply_lora(GPT.from_pretrained(tiny_base), rank=40)
