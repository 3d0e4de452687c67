"""model.py is the same function as OpenAI's GPT-2 (transformers' GPT2LMHeadModel as the
reference)."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, make_hf_gpt2
from safetensors.torch import load_file, save_file

from model import GPT, PRETRAINED, GPTConfig, KVCache
from support.decoding import generate

TOL = 1e-4


def _logits_match(ours, hf, idx):
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < TOL, diff


def _hub_layout(hf):
    """The hub's original gpt2 files: no `transformer.` prefix, no lm_head, attn.bias buffers."""
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
          if k != "lm_head.weight"}
    T = hf.config.n_positions
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


@pytest.fixture(scope="module")
def hf():
    return make_hf_gpt2(n_layer=2, n_head=2, n_embd=128, n_positions=64, vocab_size=300, seed=1)


@pytest.mark.parametrize("layout", ["save_pretrained", "pytorch_model.bin", "hub_dir",
                                    "bare_safetensors", "bare_bin"])
def test_loads_every_layout_with_logit_parity(hf, tmp_path, layout):
    if layout == "save_pretrained":
        hf.save_pretrained(tmp_path)
        src = tmp_path
    elif layout == "pytorch_model.bin":
        hf.save_pretrained(tmp_path)
        sd = load_file(tmp_path / "model.safetensors")
        (tmp_path / "model.safetensors").unlink()
        torch.save(sd, tmp_path / "pytorch_model.bin")
        src = tmp_path
    elif layout == "hub_dir":
        hf.config.to_json_file(tmp_path / "config.json")
        save_file(_hub_layout(hf), tmp_path / "model.safetensors")
        src = tmp_path
    elif layout == "bare_safetensors":  # config inferred from shapes (head size 64)
        src = tmp_path / "weights.safetensors"
        save_file(_hub_layout(hf), src)
    else:
        src = tmp_path / "weights.bin"
        torch.save(_hub_layout(hf), src)
    model = GPT.from_pretrained(src).eval()
    assert model.config.n_layer == 2 and model.config.n_head == 2 and model.config.block_size == 64
    idx = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    _logits_match(model, hf, idx)


def test_greedy_generation_matches_transformers_with_and_without_cache(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, 20, greedy=True)
    uncached = generate(model, prompt, 20, greedy=True, use_cache=False)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                      do_sample=False, pad_token_id=0)
    assert cached.shape == (2, 27)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)


def test_kv_cache_chunks_equal_one_full_forward(hf, tmp_path):
    """Prefill, a multi-token chunk (bottom-right causal mask) and single steps through the cache
    give the same logits as one pass over the whole sequence."""
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 12, "cpu", torch.float32)
        parts = [model(idx[:, :5], cache=cache), model(idx[:, 5:9], cache=cache),
                 model(idx[:, 9:10], cache=cache), model(idx[:, 10:], cache=cache)]
    assert cache.length == 12
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5
    with torch.no_grad():  # last_only projects just the last position
        last = model(idx, last_only=True)
    assert last.shape == (2, 1, 300) and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_attention_equals_plain_math_oracle():
    """The fast path (scaled_dot_product_attention) against attention written out by hand."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=4, n_embd=32, block_size=16, vocab_size=50)
    attn = GPT(cfg).h[0].attn.eval()
    x = torch.randn(2, 10, 32)
    q, k, v = attn.c_attn(x).split(32, dim=2)
    q, k, v = (t.view(2, 10, 4, 8).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(8)  # (B, nh, T, T)
    att = att.masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(2, 10, 32)
    with torch.no_grad():
        assert (attn(x) - attn.c_proj(y)).abs().max() < 1e-6


def test_loss_with_masked_targets_matches_transformers(hf, tmp_path):
    """-100 targets take no loss (the prompt in LoRA eq. 2); the rest is GPT-2's LM loss."""
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    labels = idx.clone()
    labels[:, :6] = -100  # a "prompt" of 6 tokens
    targets = torch.full_like(idx, -100)
    targets[:, :-1] = labels[:, 1:]  # ours takes next-token targets, transformers shifts inside
    with torch.no_grad():
        ours = model(idx, targets)
        ref = hf(idx, labels=labels).loss
    assert abs(ours.item() - ref.item()) < 1e-5
    with torch.no_grad():  # label smoothing is F.cross_entropy's, on the kept positions only
        smoothed = model(idx, targets, label_smoothing=0.1)
        logits = model(idx)
    keep = targets != -100
    manual = F.cross_entropy(logits[keep], targets[keep], label_smoothing=0.1)
    assert abs(smoothed.item() - manual.item()) < 1e-5
    with torch.no_grad():  # the sum train_step weighs micro-batches by: over the targets only
        summed = model(idx, targets, label_smoothing=0.1, reduction="sum")
    assert abs(summed.item() - manual.item() * int(keep.sum())) < 1e-3
    with torch.no_grad():  # one loss per target, row by row (metrics.loss_by_kind reads them so)
        each = model(idx, targets, reduction="none")
    manual_each = F.cross_entropy(logits[keep], targets[keep], reduction="none")
    assert each.shape == (int(keep.sum()),) and torch.allclose(each, manual_each, atol=1e-5)
    seen = []  # and only the target positions reach the vocabulary projection (eq. 2)
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        model(idx, targets)
    hook.remove()
    assert seen == [torch.Size([int(keep.sum()), model.config.n_embd])]


@pytest.mark.parametrize("name,expected", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                           ("gpt2-large", 774_030_080),
                                           ("gpt2-xl", 1_557_611_200)])
def test_released_sizes_are_known_without_download(name, expected):
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(GPTConfig(**PRETRAINED[name]))
    assert model.num_params() == expected
    assert model.lm_head.weight is model.wte.weight  # tied: counted once


def test_save_pretrained_round_trip_and_transformers_loads_it(tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=120)).eval()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "manifest.json", "model.safetensors"]
    back = GPT.from_pretrained(tmp_path).eval()
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 120, (2, 20))
    _logits_match(model, hf, idx)


@pytest.mark.parametrize("merged", [False, True])
def test_save_pretrained_of_a_lora_model_writes_the_adapted_model(tmp_path, merged):
    """save_pretrained on a model with LoRA (merged or not: PEFT and TRL users merge, then save
    to deploy) writes a plain GPT-2 checkpoint of W0 + ΔW, no LoRA keys, that our loader and
    transformers both read as the adapted model; the model in memory is left as it was."""
    from transformers import GPT2LMHeadModel

    from lora import apply_lora, merge_lora

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=120)).eval()
    idx = torch.randint(0, 120, (2, 20))
    with torch.no_grad():
        base_logits = model(idx)
        apply_lora(model, rank=4, alpha=32, targets=("q", "v", "mlp"), bias="all")
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith("attn.bias"):
                p.add_(torch.randn_like(p) * 0.5)  # a trained adapter, its biases trained too
        if merged:
            merge_lora(model)
        adapted = model(idx)
    assert (adapted - base_logits).abs().max() > 100 * TOL  # the adapter changes the function
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = [p.detach().clone() for p in model.parameters()]
    model.save_pretrained(tmp_path)
    assert not [k for k in load_file(tmp_path / "model.safetensors") if "lora" in k]
    for back in (GPT.from_pretrained(tmp_path).eval(),
                 GPT2LMHeadModel.from_pretrained(tmp_path).eval()):
        with torch.no_grad():
            out = back(idx)
        assert (getattr(out, "logits", out) - adapted).abs().max() < TOL
    assert all(layer.merged == merged for layer in model.modules() if hasattr(layer, "merged"))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_init_matches_its_docstring():
    """N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 n_layer), zero biases."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000)
    m = GPT(cfg)
    assert abs(m.h[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    assert abs(m.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(m.h[0].attn.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4
    assert abs(m.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4
    assert m.h[0].attn.c_attn.bias.abs().max() == 0 and torch.all(m.ln_f.weight == 1)


# ---------------------------------------------------------------- GPT2Config fields


def _hf_with(d, **fields):
    """A tiny GPT2LMHeadModel with GPT2Config `fields` set, written to d by transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=100,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                     eos_token_id=None, **fields)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(d)
    return hf


IDX = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("field,value", [
    ("tie_word_embeddings", False),  # the file has its own lm_head.weight
    ("layer_norm_epsilon", 1e-2),
    ("n_inner", 128),  # 4 * n_embd written out
    ("attn_implementation", "eager"), ("reorder_and_upcast_attn", True),  # with eager attention
    *[("activation_function", a) for a in ("gelu_pytorch_tanh", "gelu_fast", "gelu_accurate",
                                          "gelu_python_tanh")],  # gelu_new under other names
])
def test_config_fields_load_with_logit_parity(tmp_path, field, value):
    extra = {"attn_implementation": "eager"} if field == "reorder_and_upcast_attn" else {}
    hf = _hf_with(tmp_path, **{field: value}, **extra)
    assert field == "attn_implementation" or getattr(hf.config, field) == value
    model = GPT.from_pretrained(tmp_path).eval()
    _logits_match(model, hf, IDX)
    assert (model.lm_head.weight is model.wte.weight) == (field != "tie_word_embeddings")


def test_untied_head_round_trips_through_save_pretrained(tmp_path):
    from transformers import GPT2LMHeadModel

    hf = _hf_with(tmp_path / "hf", tie_word_embeddings=False)
    model = GPT.from_pretrained(tmp_path / "hf").eval()
    model.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(tmp_path / "ours" / "model.safetensors")
    _logits_match(model, GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval(), IDX)
    for src in (tmp_path / "ours", tmp_path / "ours" / "model.safetensors"):  # dir, bare file
        back = GPT.from_pretrained(src).eval()
        assert back.lm_head.weight is not back.wte.weight
        _logits_match(back, hf, IDX)
    tied = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    tied.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")


@pytest.mark.parametrize("head", ["copy of wte", "different"])
def test_tied_config_with_a_stored_head(tmp_path, head):
    """tie_word_embeddings true and the file holds lm_head.weight: a copy of wte is the tied head;
    a different matrix is refused (transformers 5 uses it as the head, 4 ties wte over it)."""
    from transformers import GPT2LMHeadModel

    _hf_with(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    wte = sd["transformer.wte.weight"]
    sd["lm_head.weight"] = wte.clone() if head == "copy of wte" else torch.randn_like(wte)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    if head == "different":
        _expect(ValueError, "lm_head.weight differs from wte.weight, but config.json has "
                            "tie_word_embeddings true", tmp_path)
        return
    model = GPT.from_pretrained(tmp_path).eval()
    assert model.lm_head.weight is model.wte.weight
    _logits_match(model, GPT2LMHeadModel.from_pretrained(tmp_path).eval(), IDX)


def test_untied_config_without_a_stored_head_is_refused(tmp_path):
    """transformers would start such a head from random numbers; here it is a missing tensor."""
    _hf_with(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _expect(ValueError, r"missing tensors lm_head\.weight", tmp_path)


@pytest.mark.parametrize("field,value", [
    ("activation_function", "gelu"), ("activation_function", "relu"),
    ("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
    ("add_cross_attention", True), ("n_inner", 64), ("model_type", "gptj"),
])
def test_config_fields_this_model_does_not_compute_are_refused(tmp_path, field, value):
    if field == "model_type":  # not a GPT2Config argument: edit the file
        _hf_with(tmp_path)
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    else:
        _hf_with(tmp_path, **{field: value})
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(tmp_path)
    assert f"{field}={json.dumps(value)} is not supported" in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- bad input


def _expect(exc, match, source, **kw):
    with pytest.raises(exc, match=match):
        GPT.from_pretrained(source, **kw)


def test_unknown_name_lists_the_valid_ones():
    _expect(ValueError, "gpt2, gpt2-medium, gpt2-large, gpt2-xl", "gpt3")


def test_missing_path(tmp_path):
    _expect(FileNotFoundError, "no such file", str(tmp_path / "nope.safetensors"))
    _expect(FileNotFoundError, "no model.safetensors", tmp_path)


def test_missing_and_unexpected_tensors_are_named(hf, tmp_path):
    sd = _hub_layout(hf)
    del sd["h.1.mlp.c_fc.weight"]
    sd["h.0.attn.extra"] = torch.zeros(1)
    save_file(sd, tmp_path / "w.safetensors")
    _expect(ValueError, r"missing tensors h\.1\.mlp\.c_fc\.weight; unexpected tensors "
                        r"h\.0\.attn\.extra", tmp_path / "w.safetensors")


def test_wrong_shape_names_tensor_expected_and_found(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_positions"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _expect(ValueError, r"wpe\.weight has shape \(64, 128\), the model expects \(32, 128\)",
            tmp_path)


def test_truncated_file(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect(ValueError, "truncated or corrupt", tmp_path)


def test_sequence_longer_than_block_size(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="longer than the model's block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's block_size 64"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 5)


def _hub_cache(home, hf):
    """A Hugging Face cache holding 'gpt2' as huggingface_hub lays it out (tiny weights)."""
    snap = home / "hub" / "models--gpt2" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (home / "hub" / "models--gpt2" / "refs").mkdir()
    (home / "hub" / "models--gpt2" / "refs" / "main").write_text("0" * 40)
    hf.config.to_json_file(snap / "config.json")
    save_file(_hub_layout(hf), snap / "model.safetensors")


def test_hub_name_loads_from_the_hf_cache_offline(hf, tmp_path, monkeypatch):
    _hub_cache(tmp_path, hf)
    code = ("import torch; from model import GPT; m = GPT.from_pretrained('gpt2').eval(); "
            "print(m.config.n_embd, m.name)")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["128", "gpt2"]


def test_hub_unreachable_without_cache_says_how_to_work_offline(tmp_path):
    code = ("from model import GPT; from support.common import run_main; "
            "run_main(lambda: GPT.from_pretrained('gpt2'))")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "could not get 'gpt2'" in lines[0] and "--init" in lines[0] and "train.py" in lines[0]


@pytest.fixture
def hub(monkeypatch):
    """Online as far as huggingface_hub's offline switch goes, with its download function
    replaced by hub.download (set by the test) and every socket connection a test failure: a
    released size must go through huggingface_hub alone (its proxies, endpoint and cache)."""
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    def no_socket(*args, **kwargs):
        pytest.fail("model.py opened a connection of its own")

    monkeypatch.setattr(socket, "create_connection", no_socket)
    monkeypatch.setattr(socket.socket, "connect", no_socket)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    state = SimpleNamespace(calls=[], download=None)

    def download(repo_id, filename, **kwargs):
        state.calls.append((repo_id, filename, kwargs.get("local_files_only", False)))
        return state.download(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return state


def test_a_released_size_not_cached_is_downloaded_by_huggingface_hub_alone(hf, tmp_path, hub):
    from huggingface_hub.utils import LocalEntryNotFoundError

    hf.save_pretrained(tmp_path)

    def download(repo_id, filename, local_files_only=False):
        if local_files_only:  # as huggingface_hub says it for a file not in its cache
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
        return str(tmp_path / filename)

    hub.download = download
    model = GPT.from_pretrained("gpt2").eval()
    assert model.config.n_embd == 128 and model.name == "gpt2"
    assert ("gpt2", "model.safetensors", False) in hub.calls
    _logits_match(model, hf, torch.randint(0, 300, (2, 16)))


@pytest.mark.parametrize("error, why", [
    ("unreachable", "not in the cache, and the hub could not be reached"),
    ("gated", "Access to model gpt2 is restricted"),
])
def test_huggingface_hub_errors_become_one_line_without_jargon(hub, error, why):
    from huggingface_hub.utils import LocalEntryNotFoundError

    def download(repo_id, filename, local_files_only=False):
        if error == "gated":
            raise PermissionError("Access to model gpt2 is restricted.\nVisit the page to ask.")
        try:  # how huggingface_hub reports a DNS failure when the file is not cached
            raise OSError(-3, "Temporary failure in name resolution")
        except OSError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on "
                                          "the Hub and we cannot find it in the cache.") from e

    hub.download = download
    with pytest.raises(OSError) as e:
        GPT.from_pretrained("gpt2")
    message = str(e.value)
    assert "\n" not in message and "could not get 'gpt2'" in message and why in message
    assert "Error" not in message and "gaierror" not in message, message


@pytest.mark.parametrize("case", ["unknown name", "truncated file"])
def test_scripts_report_a_bad_checkpoint_in_one_line(hf, tmp_path, case):
    if case == "unknown name":
        init, expected = "gpt3", "use one of gpt2, gpt2-medium, gpt2-large, gpt2-xl"
    else:
        hf.save_pretrained(tmp_path)
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[:100])
        init, expected = str(tmp_path), "truncated or corrupt"
    r = subprocess.run([sys.executable, "sample.py", "--init", init, "--no-adapter"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and expected in r.stderr, r.stderr
