"""sample.py with the file of every method (support/methods.py: read_method, load_method): the
same greedy tokens as the model in memory, the label that names the method, --merge refused for
all but LoRA, the metadata read without a model, a prefix's special tokens counted in the length
check, a file for another base refused, and --eval e2e scoring a prefix and an adapter file as
evaluate_e2e scores the model they were saved from."""
import json

import pytest
import torch
from conftest import SHARED_DATA, make_hf_gpt2, one_error_line

from lora import apply_lora
from model import GPT
from sample import attach_adapter, complete, main
from support.adapters import in_prompt_format, save_adapter
from support.common import get_tokenizer
from support.decoding import check_fits
from support.methods import apply_method, method_label, read_method, save_method
from support.metrics import evaluate_e2e
from support.prefix import SEPARATOR

E2E_RAW = SHARED_DATA / "e2e"
E2E_FORMAT = "{prompt} ||"  # data/e2e/prepare.py's format_prompt, as finetune.py records it
MR = "name[The Eagle], food[French]"
SETTINGS = {  # small, for the tiny base (2 blocks, d = 32, 128 positions)
    "lora": dict(rank=4, alpha=32), "ft_top2": {}, "bitfit": {},
    "adapter_h": dict(bottleneck=3), "adapter_l": dict(bottleneck=4),
    "pre_embed": dict(l_p=3, l_i=2), "pre_layer": dict(l_p=4, l_i=3),
}
ALL, NOT_LORA = list(SETTINGS), [m for m in SETTINGS if m != "lora"]


def trained(base_dir, method, seed=3):
    """GPT.from_pretrained(base_dir) with the method applied and its trainable tensors moved
    by random steps (a fresh adapter is the identity, a fresh LoRA B is 0: a trained file
    must change the output for the test to see that it was loaded)."""
    model = GPT.from_pretrained(base_dir)
    if method == "lora":
        torch.manual_seed(seed)
        apply_lora(model, **SETTINGS[method])
    else:
        apply_method(model, method, **SETTINGS[method])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def save(model, path, prompt_format=E2E_FORMAT):
    """save_adapter for LoRA, save_method for the others: the base recorded is model.name."""
    if getattr(model, "lora_config", None) is not None:
        return save_adapter(model, path, prompt_format=prompt_format)
    return save_method(model, path, prompt_format=prompt_format)


@pytest.fixture(scope="module")
def files(tiny_base, tmp_path_factory):
    """{method: (the model in memory, its file)}, each recording tiny_base and E2E's format."""
    tmp = tmp_path_factory.mktemp("methods")
    out = {}
    for m in ALL:
        model = trained(tiny_base, m)
        out[m] = model, save(model, tmp / f"{m}.safetensors")
    return out


def greedy_text(model, n=12) -> str:
    enc = get_tokenizer()
    comps, _ = complete(model, enc.encode_ordinary(in_prompt_format(E2E_FORMAT, MR)),
                        max_new_tokens=n, greedy=True)
    return enc.decode(comps[0])


@pytest.mark.parametrize("method", ALL)
def test_sample_with_any_methods_file_gives_the_in_memory_models_greedy_tokens(
        tiny_base, files, method, capsys):
    """No --init: the base comes from the file; no --greedy: the recorded prompt format makes
    greedy the default. The stderr line names the method (LoRA keeps its merge-mode label)."""
    model, path = files[method]
    expected = greedy_text(model)
    assert expected != greedy_text(GPT.from_pretrained(tiny_base))  # the file changes the output
    assert main(["--adapter", str(path), "--prompt", MR, "--max-new-tokens", "12",
                 "--no-stream"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{MR} ||{expected}\n{'-' * 40}\n"
    label = "adapter (unmerged)" if method == "lora" else \
        method_label(method, SETTINGS[method])
    assert err.startswith(f"[{label}] greedy"), err


def test_method_labels():
    assert method_label("pre_layer", dict(l_p=8, l_i=8, separator=SEPARATOR)) == \
        "PreLayer (l_p=8, l_i=8)"
    assert method_label("adapter_h", dict(bottleneck=8)) == "Adapter^H (r=8)"
    assert method_label("ft_top2", {}) == "FT^Top2"
    assert method_label("lora", dict(rank=4, alpha=32, targets=["q", "v"])) == \
        "LoRA (r=4, alpha=32, q,v)"


@pytest.mark.parametrize("method", NOT_LORA)
def test_merge_is_refused_for_every_method_but_lora(files, method, capsys):
    """Refused before the base loads (--init names no model, and the error is the merge's),
    and by attach_adapter before the model is touched."""
    model, path = files[method]
    line = one_error_line(capsys, main, ["--init", "/no/such/model", "--adapter", path,
                                         "--merge", "--prompt", MR])
    assert line == (f"error: {path}: --merge folds LoRA's BA into W0 (§4.1), and this file is "
                    f"{method_label(method, SETTINGS[method])}: drop --merge (only LoRA merges; "
                    f"adapters add layers, prefixes add positions)")
    base = GPT.from_pretrained(model.name)
    names = [n for n, _ in base.named_parameters()]
    with pytest.raises(ValueError, match="--merge folds LoRA's BA"):
        attach_adapter(base, path, merge=True)
    assert getattr(base, "method_config", None) is None
    assert [n for n, _ in base.named_parameters()] == names


def test_read_method_gives_the_metadata_without_a_model(tiny_base, files, tmp_path):
    info = read_method(files["pre_layer"][1])
    assert info == {"method": "pre_layer",
                    "settings": dict(l_p=4, l_i=3, separator=SEPARATOR,
                                     init_tokens=[3084, 12, 1462, 12, 5239]),
                    "base_name": str(tiny_base), "base_config": info["base_config"],
                    "prompt_format": E2E_FORMAT}
    assert info["base_config"]["n_layer"] == 2 and info["base_config"]["block_size"] == 128
    lora = read_method(files["lora"][1])
    assert (lora["method"], lora["settings"]["rank"], lora["settings"]["targets"]) == \
        ("lora", 4, ["q", "v"])
    assert lora["base_name"] == str(tiny_base) and lora["prompt_format"] == E2E_FORMAT
    model = files["bitfit"][0]
    plain = save_method(model, tmp_path / "plain.safetensors", prompt_format=None)
    assert read_method(plain)["prompt_format"] is None
    with pytest.raises(ValueError, match=r"prompt_format must hold \{prompt\} exactly once"):
        save_method(model, tmp_path / "bad.safetensors", prompt_format="no slot")
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_prefix_is_counted_in_the_length_check(tiny_base, files, capsys):
    """prompt + new tokens that fit 128 positions alone do not fit beside l_p + l_i = 7 special
    tokens: one line, before any output; with the LoRA file the same run generates."""
    model = files["pre_layer"][0]
    n = len(get_tokenizer().encode_ordinary(f"{MR} ||"))
    room = 128 - n - 3  # fits without the prefix, not with its 7 tokens
    check_fits(GPT.from_pretrained(tiny_base), n, room)
    with pytest.raises(ValueError, match=r"\+ the method's special tokens \(l_p \+ l_i = 7\) "
                                         r"exceeds the model's block_size 128"):
        check_fits(model, n, room)
    args = ["--prompt", MR, "--max-new-tokens", str(room), "--no-stream"]
    line = one_error_line(capsys, main, ["--adapter", files["pre_layer"][1], *args])
    assert line == (f"error: prompt ({n} tokens) + max_new_tokens ({room}) + the method's "
                    f"special tokens (l_p + l_i = 7) exceeds the model's block_size 128")
    assert main(["--adapter", str(files["lora"][1]), *args]) == 0


def test_a_prompt_without_the_infix_separator_is_refused_before_any_output(files, tmp_path,
                                                                           capsys):
    """A prefix file without a prompt format takes prompts as typed; its infix needs " ||"."""
    path = save(files["pre_embed"][0], tmp_path / "plain.safetensors", prompt_format=None)
    line = one_error_line(capsys, main, ["--adapter", path, "--prompt", "The restaurant is",
                                         "--greedy"])
    assert line.startswith(f"error: the prompt has no separator token {SEPARATOR}: the "
                           f"method's 2 infix tokens go after it")


@pytest.mark.parametrize("method", ["pre_layer", "adapter_h"])
def test_a_file_for_another_base_is_refused(tiny_base, method, tmp_path, capsys):
    other = tmp_path / "other_base"
    make_hf_gpt2(seed=1).save_pretrained(other)  # the same shapes, other weights
    path = save(trained(other, method), tmp_path / "m.safetensors")
    capsys.readouterr()  # save_pretrained's progress bar
    line = one_error_line(capsys, main, ["--init", tiny_base, "--adapter", path,
                                         "--prompt", MR])
    assert line.startswith(f"error: {path}: the method was trained on other base weights")
    assert line.endswith(f"(pass --init {other})")


@pytest.mark.parametrize("method", ["pre_layer", "adapter_l"])
def test_eval_e2e_scores_a_methods_file_as_the_model_in_memory(files, method, tmp_path,
                                                               capsys):
    """--eval e2e with a prefix or adapter file: the same greedy outputs, BLEU and ROUGE-L as
    evaluate_e2e on the model the file was saved from; the result names the method."""
    model, path = files[method]
    out = tmp_path / "e2e.json"
    assert main(["--adapter", str(path), "--eval", "e2e", "--eval-limit", "6", "--raw-dir",
                 str(E2E_RAW), "--max-new-tokens", "6", "--out", str(out)]) == 0
    label = method_label(method, SETTINGS[method])
    assert f", {label}: BLEU " in capsys.readouterr().out
    result = json.loads(out.read_text())
    expected = evaluate_e2e(model, get_tokenizer(), raw_dir=E2E_RAW, limit=6, max_new_tokens=6)
    assert result["method"] == result["mode"] == label
    assert result["decoding"] == {"greedy": True, "max_new_tokens": 6}
    assert result["outputs"] == expected["outputs"]
    assert result["metrics"] == expected["metrics"]
