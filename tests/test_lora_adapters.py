"""Adapter files, task switching and several adapters per batch (lora.py below the divider)."""
import json

import pytest
import torch
from conftest import tiny_gpt
from test_lora import TINY, ids, randomize_lora
from torch.utils._python_dispatch import TorchDispatchMode

import lora
from support import adapters


@pytest.fixture
def trained(tmp_path):
    """(model with a random non-zero adapter, its file, logits on ids())."""
    model = randomize_lora(lora.apply_lora(tiny_gpt(), rank=4, targets=("q", "v", "o")))
    path = adapters.save_adapter(model, tmp_path / "a.safetensors")
    return model, path, model(ids())


def test_save_then_load_on_fresh_base_reproduces_logits(trained):
    model, path, logits = trained
    fresh = tiny_gpt()  # same seed: the same base weights, no LoRA yet
    adapters.load_adapter(fresh, path)
    assert fresh.lora_config == model.lora_config
    assert torch.equal(fresh(ids()), logits)


def test_adapter_file_holds_only_lora_tensors_and_metadata(trained):
    from safetensors import safe_open

    model, path, _ = trained
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(lora.lora_state_dict(model)) and all(".lora_" in k for k in keys)
    assert json.loads(meta["lora_config"]) == dict(rank=4, alpha=32, targets=["q", "v", "o"],
                                                   dropout=0.1, bias="none", rslora=False)
    assert json.loads(meta["base_config"])["n_embd"] == TINY.n_embd
    assert "h.0.attn.c_attn.weight" in json.loads(meta["base_fingerprint"])
    n_bytes = 4 * lora.count_trainable(model)  # fp32 tensors; the rest is the JSON header
    assert n_bytes < path.stat().st_size < n_bytes + 16_000


def test_saving_a_merged_model_writes_the_same_adapter(trained, tmp_path):
    model, path, _ = trained
    lora.merge_lora(model)
    W = model.h[1].attn.c_attn.weight.detach().clone()
    p2 = adapters.save_adapter(model, tmp_path / "merged.safetensors")
    assert torch.equal(model.h[1].attn.c_attn.weight, W)  # saving leaves the weights alone
    (t1, m1), (t2, m2) = adapters.read_adapter(path), adapters.read_adapter(p2)
    assert m1 == m2  # the fingerprint is taken of W0, not of W0 + ΔW
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert lora.is_merged(model)


def test_load_onto_another_base_is_an_error(trained):
    _, path, _ = trained
    with pytest.raises(ValueError, match="other base weights.*fingerprint"):
        adapters.load_adapter(tiny_gpt(seed=5), path)
    with pytest.raises(ValueError, match=r"another base model: n_embd=32 \(this model: 64\)"):
        adapters.load_adapter(tiny_gpt(n_embd=64), path)


def test_load_onto_same_base_in_bf16_is_fine(trained):
    _, path, logits = trained
    model = tiny_gpt().to(torch.bfloat16)
    adapters.load_adapter(model, path)
    assert (model(ids()).float() - logits).abs().max() < 0.1  # bf16 rounding, same function


def test_truncated_missing_and_non_adapter_files(trained, tmp_path):
    _, path, _ = trained
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        adapters.load_adapter(tiny_gpt(), cut)
    with pytest.raises(FileNotFoundError):
        adapters.load_adapter(tiny_gpt(), tmp_path / "nope.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        adapters.load_adapter(tiny_gpt(), tmp_path / "plain.safetensors")


def test_missing_unexpected_keys_and_other_settings(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, path, _ = trained
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    sd.pop("h.1.attn.c_proj.lora_B.o")
    sd["h.0.attn.c_attn.lora_A.k"] = torch.zeros(4, 32)
    save_file(sd, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"missing tensors h.1.attn.c_proj.lora_B.o; "
                                         r"unexpected tensors h.0.attn.c_attn.lora_A.k"):
        adapters.load_adapter(tiny_gpt(), tmp_path / "bad.safetensors")
    other = lora.apply_lora(tiny_gpt(), rank=2)
    with pytest.raises(ValueError, match=r"rank=4 \(model: 2\), targets=\['q', 'v', 'o'\]"):
        adapters.load_adapter(other, path)


def test_load_adapter_on_merged_model_stays_merged_and_exact(trained, tmp_path):
    model, path, logits = trained
    other = randomize_lora(lora.apply_lora(tiny_gpt(), targets=("q", "v", "o")), seed=3)
    lora.merge_lora(other)
    adapters.load_adapter(other, path)
    assert lora.is_merged(other)
    lora.merge_lora(model)
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), model.parameters()))


def test_task_switch_on_merged_model_equals_fresh_merge(tmp_path):
    base_w = tiny_gpt().h[0].attn.c_attn.weight.detach().clone()
    task_a = randomize_lora(lora.apply_lora(tiny_gpt()), seed=1)
    task_b = randomize_lora(lora.apply_lora(tiny_gpt()), seed=2)
    path_b = adapters.save_adapter(task_b, tmp_path / "b.safetensors")
    lora.merge_lora(task_a)
    adapters.switch_adapter(task_a, path_b)  # subtract B A, add B' A' (§4.1)
    lora.merge_lora(task_b)
    assert lora.is_merged(task_a)
    assert all(torch.equal(p, q) for p, q in zip(task_a.parameters(), task_b.parameters()))
    assert torch.equal(task_a(ids()), task_b(ids()))
    adapters.switch_adapter(task_a, lora.lora_state_dict(lora.unmerge_lora(tiny_gpt_with_zero())))
    assert torch.equal(task_a.h[0].attn.c_attn.weight, base_w)  # B = 0: back to W0 exactly


def tiny_gpt_with_zero():
    return lora.apply_lora(tiny_gpt())  # B = 0: ΔW = 0


def test_mixed_batch_rows_equal_single_adapters(tmp_path):
    paths = {}
    for k, (rank, alpha) in enumerate([(4, 32), (2, 8), (8, 16)]):  # ranks may differ
        m = randomize_lora(lora.apply_lora(tiny_gpt(), rank=rank, alpha=alpha), seed=10 + k)
        paths[f"task{k}"] = adapters.save_adapter(m, tmp_path / f"task{k}.safetensors")
    model = tiny_gpt()
    names = adapters.load_adapters(model, paths)
    assert names == ["task0", "task1", "task2"]
    idx = ids(batch=5)
    choice = [2, 0, -1, 1, 2]
    with adapters.use_adapters(model, choice):
        mixed = model(idx)
    for row, k in enumerate(choice):
        single = tiny_gpt()
        if k >= 0:
            adapters.load_adapter(single, paths[names[k]])
        assert (mixed[row] - single(idx[row:row + 1])[0]).abs().max() <= 1e-5
    with adapters.use_adapters(model, ["task1"] * 5):  # names work too
        by_name = model(idx)
    assert (by_name[3] - mixed[3]).abs().max() <= 1e-5
    assert model.h[0].attn.c_attn.adapter_ids is None  # the context manager cleans up


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_mixed_batch_is_vectorized(tmp_path):
    """As many tensor ops for 1 row and 1 adapter as for 6 rows and 3 adapters: no Python loop
    over rows or adapters in the forward."""
    def count(n_adapters, batch):
        paths = {}
        for k in range(n_adapters):
            m = randomize_lora(lora.apply_lora(tiny_gpt()), seed=k)
            paths[str(k)] = adapters.save_adapter(m, tmp_path / f"{n_adapters}-{k}.safetensors")
        model = tiny_gpt()
        adapters.load_adapters(model, paths)
        with adapters.use_adapters(model, [i % n_adapters for i in range(batch)]), _CountOps() as c:
            model(ids(batch=batch))
        return c.n
    assert count(1, 1) == count(3, 6)


def test_mixed_batch_errors(tmp_path):
    a = adapters.save_adapter(lora.apply_lora(tiny_gpt()), tmp_path / "a.safetensors")
    b = adapters.save_adapter(lora.apply_lora(tiny_gpt(), targets=("q",)),
                              tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="must share targets"):
        adapters.load_adapters(tiny_gpt(), {"a": a, "b": b})
    model = tiny_gpt()
    adapters.load_adapters(model, {"a": a})
    with pytest.raises(ValueError, match="adapter ids must be"):
        with adapters.use_adapters(model, [0, 1]):
            pass
    with pytest.raises(ValueError, match="unknown adapters"):
        with adapters.use_adapters(model, ["zz"]):
            pass
    lora.merge_lora(model)
    with pytest.raises(ValueError, match="unmerged"):
        with adapters.use_adapters(model, [0]):
            pass


def test_gpt2_124m_adapter_file_is_about_0_6_mb(tmp_path):
    """save_adapter's docstring: about 0.6 MB for GPT-2 124M at r = 4 on q, v."""
    from model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig())
    model.to_empty(device="cpu")  # real 124M shapes; the values do not matter for the size
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    lora.apply_lora(model, rank=4, targets=("q", "v"))
    path = adapters.save_adapter(model, tmp_path / "gpt2.safetensors")
    assert 147_456 * 4 < path.stat().st_size < 0.62e6


# ---------------------------------------------------------------- ids and rows (§4.2)

@pytest.fixture
def two_adapters(tmp_path):
    """(model with adapters "a" and "b" loaded side by side, {name: file})."""
    paths = {n: adapters.save_adapter(randomize_lora(lora.apply_lora(tiny_gpt()), seed=s),
                                  tmp_path / f"{n}.safetensors") for n, s in (("a", 1), ("b", 2))}
    model = tiny_gpt()
    adapters.load_adapters(model, paths)
    return model, paths


def test_wrong_number_of_adapter_ids_is_a_clear_error(two_adapters):
    model, _ = two_adapters
    with adapters.use_adapters(model, ["a", "b"]):
        with pytest.raises(ValueError, match="2 adapter ids for a batch of 3 rows"):
            model(ids(batch=3))


def test_repeat_adapter_ids_gives_each_row_its_id_k_times(two_adapters):
    """Decoding that expands each prompt row into k rows (samples, beams) repeats the ids the
    same way, as PEFT does: rows a, a, a, b, b, b."""
    model, paths = two_adapters
    idx = ids(batch=2).repeat_interleave(3, dim=0)  # (6, T)
    with adapters.use_adapters(model, ["a", "b"]), adapters.repeat_adapter_ids(model, 3):
        mixed = model(idx)
    with adapters.use_adapters(model, ["a", "b"]):
        with pytest.raises(ValueError, match="2 adapter ids for a batch of 6 rows"):
            model(idx)  # the helper's block is over: two ids again
    for name, rows in (("a", range(3)), ("b", range(3, 6))):
        single = adapters.load_adapter(tiny_gpt(), paths[name])
        for r in rows:
            assert (mixed[r] - single(idx[r:r + 1])[0]).abs().max() <= 1e-5
    plain = tiny_gpt()
    with adapters.repeat_adapter_ids(plain, 3):  # no LoRA, no use_adapters: nothing to repeat
        assert torch.equal(plain(ids()), tiny_gpt()(ids()))


def test_nested_use_adapters_leaves_the_outer_ids_in_place(two_adapters):
    model, _ = two_adapters
    with adapters.use_adapters(model, ["a", "b"]):
        before = model(ids())
        with adapters.use_adapters(model, ["b", "b"]):
            pass
        assert torch.equal(model(ids()), before)  # not the base model's (ids None)
    assert model.h[0].attn.c_attn.adapter_ids is None


@pytest.mark.parametrize("op", ["merge_lora", "unload_lora", "unload_lora_unmerged",
                                "load_adapter", "switch_adapter", "load_adapters"])
def test_what_would_make_ids_stop_applying_is_refused_inside_use_adapters(two_adapters, op):
    """A merged layer skips the per-row path, an unloaded model has none, and loading replaces
    the bank the ids point into: inside use_adapters each is a ValueError, and nothing changed."""
    model, paths = two_adapters
    calls = {
        "merge_lora": lambda: lora.merge_lora(model),
        "unload_lora": lambda: adapters.unload_lora(model),
        "unload_lora_unmerged": lambda: adapters.unload_lora(model, merge=False),
        "load_adapter": lambda: adapters.load_adapter(model, paths["a"]),
        "switch_adapter": lambda: adapters.switch_adapter(model, paths["a"]),
        "load_adapters": lambda: adapters.load_adapters(model, {"b": paths["b"]}),
    }
    own = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    with adapters.use_adapters(model, ["a", "b"]):
        before = model(ids())
        with pytest.raises(ValueError, match="inside a use_adapters block"):
            calls[op]()
        assert torch.equal(model(ids()), before)
    assert not lora.is_merged(model) and model.lora_adapters == ["a", "b"]
    assert all(torch.equal(v, own[k]) for k, v in lora.lora_state_dict(model).items())


# ---------------------------------------------------------------- the base's biases

def shift_bias(model, name, by=0.1):
    with torch.no_grad():
        model.get_parameter(name).add_(by)
    return model


def test_bias_none_adapter_refuses_a_base_with_other_biases(trained):
    """Biases fine-tuned on the base (BitFit) make it another base for a bias="none" adapter."""
    _, path, logits = trained
    for name in ("h.1.mlp.c_fc.bias", "h.0.attn.c_attn.bias", "ln_f.bias"):
        with pytest.raises(ValueError, match=f"other base weights: {name} differs"):
            adapters.load_adapter(shift_bias(tiny_gpt(), name), path)
        with pytest.raises(ValueError, match=f"{name} differs"):
            adapters.load_adapters(shift_bias(tiny_gpt(), name), {"a": path})
    fresh = adapters.load_adapter(tiny_gpt(), path)  # the unchanged base still takes it
    assert torch.equal(fresh(ids()), logits)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_adapter_that_trains_biases_loads_onto_a_base_with_other_values_of_those(tmp_path, bias):
    """The biases an adapter trains are its own, not the base's: a base with other values of
    them is its base (they are overwritten); any other bias still has to match."""
    model = randomize_lora(lora.apply_lora(tiny_gpt(), bias=bias, targets=("q", "v")))
    shift_bias(model, "h.0.attn.c_attn.bias", 0.3)  # trained with the adapter
    path = adapters.save_adapter(model, tmp_path / "a.safetensors")
    other = adapters.load_adapter(shift_bias(tiny_gpt(), "h.0.attn.c_attn.bias", -0.2), path)
    assert torch.equal(other(ids()), model(ids()))
    if bias == "lora_only":  # ln_f.bias is not the adapter's: it belongs to the base
        with pytest.raises(ValueError, match="ln_f.bias differs"):
            adapters.load_adapter(shift_bias(tiny_gpt(), "ln_f.bias"), path)
    else:
        adapters.load_adapter(shift_bias(tiny_gpt(), "ln_f.bias"), path)


# ------------------------------------------------------- bad input leaves the model as it was

def snapshot(model):
    """Everything a failed call must leave as it was: the modules themselves (not equal ones:
    hooks live on them), every tensor, the requires_grad flags, the LoRA attributes."""
    from support.common import tensors_digest

    return ({n: id(m) for n, m in model.named_modules()}, tensors_digest(model.state_dict()),
            {n: p.requires_grad for n, p in model.named_parameters()},
            getattr(model, "lora_config", None), getattr(model, "lora_adapters", None))


def misfit_copy(path, out):
    """The adapter file at path with one tensor of the wrong shape: its settings (metadata) are
    fine, so a bare base gets LoRA before the mismatch is found."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    sd["h.0.attn.c_attn.lora_A.q"] = torch.zeros(3, 32)
    save_file(sd, out, metadata=meta)
    return out


def test_failed_load_leaves_a_bare_base_as_it_came_and_the_next_load_works(trained, tmp_path):
    model, path, logits = trained
    base = tiny_gpt()
    base.wte.weight.requires_grad = False  # a flag of the user's own: kept too
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"lora_A.q has shape \(3, 32\)"):
        adapters.load_adapter(base, misfit_copy(path, tmp_path / "misfit.safetensors"))
    assert snapshot(base) == before
    adapters.load_adapter(base, path)  # the same model, a good adapter: loads
    assert torch.equal(base(ids()), logits)


def test_settings_in_an_adapter_file_are_checked_and_named(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, path, _ = trained
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["lora_config"])
    for bad, message in [({"rank": -1}, "rank must be a positive integer"),
                         ({"alpha": float("inf")}, "alpha must be positive and finite"),
                         ({"targets": ["x"], "bias": "lora_only"}, "not one save_adapter writes"),
                         ({"bias": "some"}, "not one save_adapter writes")]:
        out = tmp_path / "bad.safetensors"
        save_file(load_file(path), out, metadata={**meta,
                                                  "lora_config": json.dumps({**cfg, **bad})})
        base = tiny_gpt()
        before = snapshot(base)
        with pytest.raises(ValueError, match=f"^{out}: .*{message}"):
            adapters.load_adapter(base, out)
        assert snapshot(base) == before


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 0, -1.0])
def test_apply_lora_refuses_an_alpha_that_is_not_positive_and_finite(alpha):
    model = tiny_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError, match="alpha must be positive and finite"):
        lora.apply_lora(model, alpha=alpha)
    assert snapshot(model) == before


def test_switch_adapter_refuses_nan_and_leaves_the_merged_model_as_it_was(tmp_path):
    from safetensors.torch import save_file

    model = lora.merge_lora(randomize_lora(lora.apply_lora(tiny_gpt()), seed=1))
    out = model(ids())
    before = snapshot(model)
    state = {k: v.clone() for k, v in lora.lora_state_dict(
        randomize_lora(lora.apply_lora(tiny_gpt()), seed=2)).items()}
    state["h.1.attn.c_attn.lora_B.v"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="h.1.attn.c_attn.lora_B.v holds nan or inf"):
        adapters.switch_adapter(model, state)
    path = adapters.save_adapter(lora.apply_lora(tiny_gpt()), tmp_path / "a.safetensors")
    save_file(state, tmp_path / "nan.safetensors", metadata=safe_metadata(path))
    with pytest.raises(ValueError, match="holds nan or inf"):
        adapters.switch_adapter(model, tmp_path / "nan.safetensors")
    assert snapshot(model) == before and lora.is_merged(model)
    assert torch.equal(model(ids()), out)


def safe_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_failed_load_adapters_leaves_the_model_as_it_came(tmp_path):
    good = adapters.save_adapter(randomize_lora(lora.apply_lora(tiny_gpt())),
                                 tmp_path / "good.safetensors")
    misfit = misfit_copy(good, tmp_path / "misfit.safetensors")
    for model in (tiny_gpt(), randomize_lora(lora.apply_lora(tiny_gpt()), seed=5)):
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"misfit.safetensors: adapter does not fit"):
            adapters.load_adapters(model, {"good": good, "misfit": misfit})
        assert snapshot(model) == before
        assert adapters.load_adapters(model, {"good": good}) == ["good"]  # and then loads


def test_an_adapter_from_a_bf16_base_is_fp32_says_so_and_loads_bit_for_bit(tmp_path):
    """save_adapter's metadata states both dtypes; A and B stay fp32 through the file, onto a
    bf16 base, and in a mixed batch there."""
    model = randomize_lora(lora.apply_lora(tiny_gpt().to(torch.bfloat16)))
    path = adapters.save_adapter(model, tmp_path / "a.safetensors")
    tensors, meta = adapters.read_adapter(path)
    assert meta["base_dtype"] == "bfloat16" and meta["lora_dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in tensors.values())
    fresh = adapters.load_adapter(tiny_gpt().to(torch.bfloat16), path)
    sd = lora.lora_state_dict(fresh)
    assert all(torch.equal(sd[k], v) for k, v in tensors.items())  # no bf16 rounding on the way
    assert torch.equal(fresh(ids()), model(ids()))
    mixed = tiny_gpt().to(torch.bfloat16)
    adapters.load_adapters(mixed, {"a": path})
    with adapters.use_adapters(mixed, ["a", -1]):
        got = mixed(ids())
    assert (got[0] - model(ids())[0]).abs().max() < 0.05  # bf16 logits: the same function
    assert (got[0] - tiny_gpt().to(torch.bfloat16)(ids())[0]).abs().max() > 0.1


def base_with_tiny_values(factor=1.0):
    """tiny_gpt with tiny values where the fingerprint samples (first and last entry): 1.2e-6
    is subnormal in fp16 (2.4% rounding error there), normal in bf16."""
    model = tiny_gpt()
    with torch.no_grad():
        w = model.h[0].mlp.c_fc.weight.view(-1)
        w[0], w[-1] = 1.234e-6 * factor, -3.1e-7 * factor
    return model


@pytest.mark.parametrize("saved,loaded", [(torch.float16, torch.bfloat16),
                                          (torch.bfloat16, torch.float16),
                                          (torch.float32, torch.float16)])
def test_same_base_in_another_precision_is_accepted_even_where_values_are_tiny(
        tmp_path, saved, loaded):
    """The base check allows the rounding of both dtypes (subnormals included): the same base
    in another precision is accepted, a base whose tiny values differ beyond it is refused."""
    model = randomize_lora(lora.apply_lora(base_with_tiny_values().to(saved)))
    path = adapters.save_adapter(model, tmp_path / "a.safetensors")
    adapters.load_adapter(base_with_tiny_values().to(loaded), path)
    with pytest.raises(ValueError, match="h.0.mlp.c_fc.weight differs"):
        adapters.load_adapter(base_with_tiny_values(factor=1.5).to(loaded), path)
    with pytest.raises(ValueError, match="other base weights"):
        adapters.load_adapter(tiny_gpt(seed=5).to(loaded), path)


def edited(meta, **changes):
    """meta with keys changed (None: removed), as another tool might leave it."""
    out = {**meta, **{k: v for k, v in changes.items() if v is not None}}
    return {k: v for k, v in out.items() if changes.get(k, "") is not None}


@pytest.mark.parametrize("change,message", [
    (dict(base_fingerprint="{}"), r"base_fingerprint is empty"),
    ("partial", r"base_fingerprint lacks \d+ of the \d+ base tensors: wte.weight"),
    (dict(base_fingerprint="[]"), r"base_fingerprint is malformed"),
    (dict(base_fingerprint=json.dumps({"wte.weight": [0.1, "x"]})),
     r"base_fingerprint is malformed: wte.weight"),
    (dict(base_dtype=None), r"metadata lacks \['base_dtype'\]"),
    (dict(base_dtype="int8"), r"base_dtype 'int8' is not a floating-point dtype"),
    (dict(base_dtype="floaty"), r"base_dtype 'floaty' is not a floating-point dtype"),
    (dict(lora_dtype="bfloat16"), r"lora_dtype is bfloat16 but its tensors are float32"),
])
def test_edited_metadata_is_refused_in_one_line_naming_what_is_wrong(trained, tmp_path,
                                                                     change, message):
    """Metadata another tool wrote or edited is not trusted in part: an empty or partial
    fingerprint would pass any base, a missing base dtype would be guessed."""
    from safetensors.torch import load_file, save_file

    _, path, _ = trained
    meta = safe_metadata(path)
    if change == "partial":
        fp = json.loads(meta["base_fingerprint"])
        change = dict(base_fingerprint=json.dumps({k: v for k, v in fp.items()
                                                   if k != "wte.weight"}))
    out = tmp_path / "edited.safetensors"
    save_file(load_file(path), out, metadata=edited(meta, **change))
    for load in (lambda m: adapters.load_adapter(m, out),
                 lambda m: adapters.load_adapters(m, {"a": out})):
        base = tiny_gpt()
        before = snapshot(base)
        with pytest.raises(ValueError, match=f"^{out}: .*{message}") as e:
            load(base)
        assert "\n" not in str(e.value) and snapshot(base) == before
