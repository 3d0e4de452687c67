"""experiments/methods.py, the comparison of §5.1's methods (Table 3 and Figure 2 in miniature):
|Θ| of every row by formula equals its count on the quick start's 4 × 128 shape; the whole
pipeline (grid, table, sweep) runs end to end on a tiny base with --quick and writes every
field the tables promise; finished runs are kept when a later run is interrupted, and a rerun
skips them; ties are called by the seeds' ranges."""
import json

import pytest
import torch

from conftest import SHARED_DATA, one_error_line
from experiments import methods as M
from lora import apply_lora
from model import GPT, GPTConfig
from support.methods import apply_method

QUICK_START = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=50257)
TABLE_KEYS = {"method", "settings", "params", "params_formula", "val_loss", "bleu", "rouge_l",
              "train_step_ratio", "peak_memory_ratio", "forward_ratio", "decode_ratio",
              "positions", "lr", "val_loss_runs", "bleu_runs", "vs_lora", "loss_by_kind",
              "distinct_outputs", "names_place",
              "output_words", "bleu_bp"}


@pytest.mark.parametrize("row", [*M.TABLE, *(M.Row(m, s) for m in M.SWEEP for s in M.SWEEP[m])],
                         ids=lambda r: r.name)
def test_params_by_formula_equal_the_count_on_the_quick_start_shape(row):
    with torch.device("meta"):
        model = GPT(QUICK_START)
        if row.method == "lora":
            apply_lora(model, **row.settings)
        elif row.method != "ft":
            apply_method(model, row.method, **row.settings)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert M.params_formula(row, QUICK_START) == counted


def test_table_rows_are_near_loras_size_where_a_method_can_be():
    sizes = {r.name: M.params_formula(r, QUICK_START) for r in M.TABLE}
    assert sizes["LoRA (rank=4)"] == 2 * 8 * 128 * 4 == 8192  # 2 L̂ d r, L̂ = 4 blocks × 2
    assert sizes["Adapter^L (bottleneck=6)"] == 7704
    assert sizes["PreLayer (l_p=8, l_i=8)"] == 8192
    for name in ("BitFit", "Adapter^H (bottleneck=4)"):
        assert 0.5 < sizes[name] / 8192 < 1.5


def test_a_difference_within_the_seeds_range_is_a_tie():
    lora = dict(val_loss=2.80, val_loss_runs=[2.79, 2.81], bleu=20.0, bleu_runs=[19.0, 21.0])
    close = dict(val_loss=2.815, val_loss_runs=[2.805, 2.825], bleu=22.5, bleu_runs=[22.0, 23.0])
    assert M.compare(close, lora) == {"val_loss": "tie", "bleu": "better"}
    far = dict(val_loss=2.9, val_loss_runs=[2.89, 2.91], bleu=18.0, bleu_runs=[17.5, 18.5])
    assert M.compare(far, lora) == {"val_loss": "worse", "bleu": "worse"}


def test_an_output_names_the_place_of_its_mr():
    mr = "name[The Vaults], eatType[pub], near[Café Adriatic]"
    assert M.names_place(mr, "The Vaults is a pub near Café Adriatic.")
    assert not M.names_place(mr, "The Eagle is a pub near Café Adriatic.")  # another place
    assert not M.names_place("eatType[pub]", "The Vaults is a pub.")  # no name in the MR


def quick_args(tiny_base, e2e_dir, out, stage="all"):
    return [stage, "--quick", "--init", str(tiny_base), "--data", str(e2e_dir),
            "--raw-dir", str(SHARED_DATA / "e2e"), "--out", str(out),
            "--save-dir", str(out / "files")]


@pytest.fixture(scope="module")
def quick_run(tiny_base, e2e_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    assert M.main(quick_args(tiny_base, e2e_dir, out)) == 0
    return out


def test_quick_comparison_writes_every_promised_field(quick_run):
    table = json.loads((quick_run / "table.json").read_text())
    assert [r["name"] for r in table["rows"]] == [r.name for r in M.TABLE]
    for r in table["rows"]:
        assert TABLE_KEYS <= set(r), r["name"]
        assert r["params"] == r["params_formula"], r["name"]
        assert len(r["val_loss_runs"]) == len(M.SEEDS) and all(
            torch.isfinite(torch.tensor(r["val_loss_runs"])))
        assert 0 <= r["bleu"] <= 100 and 0 <= r["rouge_l"] <= 100
        assert r["forward_ratio"] > 0 and r["decode_ratio"] > 0 and r["peak_memory_ratio"] > 0
        assert len(r["loss_by_kind"]) == len(table["kinds"]) == 4
        assert 1 <= r["distinct_outputs"] <= table["mrs"] and 0 <= r["names_place"] <= 1
        assert r["output_words"] > 0 and 0 < r["bleu_bp"] <= 1
    grid = json.loads((quick_run / "grid.json").read_text())
    by_name = {r["name"]: r for r in table["rows"]}
    for g in grid["rows"]:  # the table runs each row at the grid's lowest validation loss
        assert by_name[g["name"]]["lr"] == float(min(g["val_loss"], key=g["val_loss"].get))
    sweep = json.loads((quick_run / "sweep.json").read_text())
    assert {p["method"] for p in sweep["points"]} == {"LoRA", "PreEmbed", "PreLayer",
                                                     "Adapter^H"}
    assert all(p["params"] == p["params_formula"] for p in sweep["points"])
    prefix_rows = [r for r in table["rows"] if r["method"] in ("PreEmbed", "PreLayer")]
    assert all(r["positions"] == 16 for r in prefix_rows)
    assert table["block_size"] == 128 - 16  # every row's data: what the largest prefix leaves
    for name in ("table.md", "grid.md", "sweep.md", "sweep.png"):
        assert (quick_run / name).stat().st_size > 0
    assert table["machine"] and table["commit"]  # provenance: named, whatever the machine


def test_a_rerun_keeps_every_finished_run(quick_run, tiny_base, e2e_dir, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(M, "run_one", lambda *a: ran.append(a) or pytest.fail("ran again"))
    before = (quick_run / "table.json").read_text()
    M.main(quick_args(tiny_base, e2e_dir, quick_run, "grid"))
    assert not ran
    assert capsys.readouterr().out.count("kept from") == 2 * len(M.TABLE)
    assert json.loads(before)["rows"]  # the table is left as it was: only grid's files rewritten
    assert (quick_run / "table.json").read_text() == before


def test_an_interrupted_stage_keeps_its_finished_runs(tiny_base, e2e_dir, tmp_path, monkeypatch):
    real, calls = M.run_one, []

    def stop_at_third(*args):
        calls.append(args[1].name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(M, "run_one", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        M.main(quick_args(tiny_base, e2e_dir, tmp_path, "grid"))
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    assert not (tmp_path / "grid.json").exists()  # a stage's files only when it is complete
    calls.clear()
    monkeypatch.setattr(M, "run_one", real)
    assert M.main(quick_args(tiny_base, e2e_dir, tmp_path, "grid")) == 0
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2 * len(M.TABLE)


def test_table_without_the_grid_is_one_error_line(tiny_base, e2e_dir, tmp_path, capsys):
    line = one_error_line(capsys, M.main, quick_args(tiny_base, e2e_dir, tmp_path, "table"))
    assert "grid.json not found" in line and "experiments.methods grid" in line


@pytest.mark.parametrize("method", ["lora", "pre_layer", "adapter_h"])
def test_a_table_runs_file_scores_the_same_through_sample_py(quick_run, tiny_base, tmp_path,
                                                              method):
    """The table stage keeps each run's tensors (--save-dir); sample.py --eval e2e on that file
    decodes what the run decoded: the same BLEU and ROUGE-L."""
    import sample

    table = json.loads((quick_run / "table.json").read_text())
    rec = next(json.loads(p.read_text()) for p in sorted((quick_run / "runs").glob("*.json"))
               if p.name.startswith(method + "-") and json.loads(p.read_text())["spec"]["eval"])
    out = tmp_path / "eval.json"
    assert sample.main(["--adapter", rec["file"], "--init", str(tiny_base), "--eval", "e2e",
                        "--eval-limit", str(rec["spec"]["eval"]["mrs"]), "--max-new-tokens",
                        str(table["max_new_tokens"]), "--raw-dir", str(SHARED_DATA / "e2e"),
                        "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["metrics"]
    assert (scores["BLEU"], scores["ROUGE_L"]) == (rec["bleu"], rec["rouge_l"])


def test_the_grid_goes_on_past_an_end_until_the_lowest_loss_is_inside(tiny_base, e2e_dir,
                                                                        tmp_path, monkeypatch):
    """A row whose lowest loss is at an end of its grid gets the next rates beyond it until the
    lowest is inside (or RATES ends): the chosen rate is a measured optimum, not a bound."""
    import math

    best = {"bitfit": 10.0, "lora": 2e-3}  # beyond RATES; just below LoRA's grid; else inside

    def fake_run(plan, row, spec, data):
        target = best.get(row.method, 1e-3 if row.method.startswith("ft") else 1e-2)
        loss = 2 + (math.log10(spec["lr"]) - math.log10(target)) ** 2
        return dict(spec=spec, name=row.name, params=1, params_formula=1, base_val_loss=4.0,
                    val_loss=loss, train_s=0.0, curve=[])

    monkeypatch.setattr(M, "run_one", fake_run)
    plan = M.Plan(init=str(tiny_base), data=str(e2e_dir), out=tmp_path, steps=2,
                  base_id=M.base_id(tiny_base))
    rows = {r["method"] + str(r["settings"]): r for r in M.run_grid(plan)["rows"]}
    bitfit, lora = rows["bitfit{}"], rows["lora{'rank': 4}"]
    assert [float(k) for k in bitfit["val_loss"]] == [3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    assert bitfit["lr"] == 1.0 and bitfit["at_edge"]  # RATES ends there: said, not hidden
    assert [float(k) for k in lora["val_loss"]] == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    assert lora["lr"] == 3e-3 and not lora["at_edge"]
    others = [r for k, r in rows.items() if r is not bitfit and r is not lora]
    assert all(len(r["val_loss"]) == 4 and not r["at_edge"] for r in others)


def test_a_missing_base_is_one_error_line(tmp_path, capsys):
    line = one_error_line(capsys, M.main, ["grid", "--init", str(tmp_path / "none"),
                                            "--out", str(tmp_path)])
    assert "--init" in line and "python train.py" in line
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_base_is_identified_by_its_tensors_not_its_file(tmp_path):
    """Two saves of the same weights can differ as files (safetensors writes the metadata in no
    fixed order): the run records must still know them as one base, and a changed weight not."""
    from safetensors.torch import save_file

    weights = {"wte.weight": torch.arange(12.0).reshape(3, 4), "ln_f.bias": torch.zeros(4)}
    for name, meta in (("a", {"format": "pt", "x": "1"}), ("b", {"format": "pt"})):
        (tmp_path / name).mkdir()
        save_file(weights, tmp_path / name / "model.safetensors", metadata=meta)
    assert M.base_id(tmp_path / "a") == M.base_id(tmp_path / "b")
    weights["ln_f.bias"][0] = 1e-6
    (tmp_path / "c").mkdir()
    save_file(weights, tmp_path / "c" / "model.safetensors")
    assert M.base_id(tmp_path / "c") != M.base_id(tmp_path / "a")
    assert M.base_id("gpt2") == "gpt2"  # a hub name is its own identity
