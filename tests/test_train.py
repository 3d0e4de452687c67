"""The training loop: schedule, optimizer over trainable parameters only, token-weighted
evaluation, pretraining and full fine-tuning from the command line, AMP, non-finite loss."""
import json
import math
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt, toy_examples
from safetensors.torch import load_file

import train
from data.datasets import IGNORE, Examples
from model import GPT
from support.runs import TrainingDiverged


def _toy_model(**kw):
    """One layer, 16 wide, GPT-2's vocabulary, in training mode."""
    return tiny_gpt(**{**dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257),
                       **kw}).train()


def _read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_lr_warms_up_linearly_then_decays_to_zero():
    cfg = train.TrainConfig(lr=1.0, warmup=10)
    lrs = [train.lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == 1.0 and lrs[60] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    cos = train.TrainConfig(lr=1.0, warmup=0, decay="cosine")
    assert train.lr_at(50, cos, 100) == pytest.approx(0.5)
    assert train.lr_at(5, train.TrainConfig(lr=1.0, warmup=0, decay="constant"), 10) == 1.0


def test_optimizer_holds_only_trainable_parameters_and_no_decay_on_vectors():
    model = _toy_model()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("h.0.attn")
    opt = train.make_optimizer(model, train.TrainConfig(weight_decay=0.01))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    for g in opt.param_groups:
        assert all((p.dim() >= 2) == (g["weight_decay"] == 0.01) for p in g["params"])
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.make_optimizer(model, train.TrainConfig())


def test_evaluate_is_the_mean_loss_per_target_token():
    model, data = _toy_model(), toy_examples(n=5)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in data.eval_batches(2):
            logits = model(x)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                     reduction="sum").item()
            count += int((y != IGNORE).sum())
    assert train.evaluate(model, data, batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_validation_is_in_the_weights_precision_whatever_amp_the_run_trains_with():
    """One precision for every validation loss: the weights' dtype (fp32 here), no autocast,
    even inside an autocast region, so a run's bf16 training and studies' base loss compare."""
    data, cfg = toy_examples(), dict(lr=1e-2, warmup=0, max_iters=1, batch_size=4,
                                     progress=False)
    step0 = {amp: train.train(_toy_model(), data, data, train.TrainConfig(amp=amp, **cfg))[0]
             for amp in ("off", "bf16")}  # step 0: validation before any update
    want = train.evaluate(_toy_model(), data, 4, train.TrainConfig().eval_batches)
    assert step0["off"]["val_loss"] == step0["bf16"]["val_loss"] == want
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert train.evaluate(_toy_model(), data, 4, train.TrainConfig().eval_batches) == want


def test_train_lowers_validation_loss_and_records_history(tmp_path):
    model, data = _toy_model(), toy_examples()
    cfg = train.TrainConfig(lr=1e-2, warmup=2, max_iters=12, eval_interval=6, log_interval=3,
                            batch_size=4, label_smoothing=0.0, progress=False)
    history = train.train(model, data, data, cfg, out_dir=tmp_path)
    val = [h["val_loss"] for h in history if h["val_loss"] is not None]
    assert [h["step"] for h in history] == [0, 3, 6, 9, 12] and len(val) == 3
    assert val[-1] < val[0] - 0.5
    assert _read_log(tmp_path) == json.loads(json.dumps(history))
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_batch_larger_than_the_data_is_an_error():
    cfg = train.TrainConfig(batch_size=32, max_iters=1, progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train.train(_toy_model(), toy_examples(n=16), toy_examples(n=4), cfg)


def test_bf16_autocast_on_cpu_trains_and_fp16_needs_cuda():
    model, data = _toy_model(), toy_examples()
    cfg = train.TrainConfig(lr=1e-2, warmup=0, max_iters=3, batch_size=4, amp="bf16",
                            progress=False)
    history = train.train(model, data, data, cfg)
    assert math.isfinite(history[-1]["val_loss"])
    assert model.wte.weight.dtype == torch.float32  # weights stay fp32 under autocast
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train.train(model, data, data, train.TrainConfig(amp="fp16", max_iters=1, warmup=0,
                                                         progress=False))


def test_a_compiled_training_step_is_one_graph_with_the_loss_unchanged():
    """The target-only projection without a host-device sync: train_step finds the target
    positions on the CPU and GPT.forward gathers them with index_select, so torch.compile
    traces the forward with targets as one graph (a boolean mask's gather is a nonzero: a
    graph break, and a sync on a GPU). The loss is the one of every position projected."""
    model, (x, y) = _toy_model(), toy_examples().get_batch(4, 0)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        fwd = torch.compile(model, backend=counting_backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss, _ = train.train_step(fwd, model, opt, torch.amp.GradScaler("cpu", enabled=False),
                                   [(x, y)], train.TrainConfig(label_smoothing=0.1), nullcontext)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    with torch.no_grad():
        every = model(x).flatten(0, 1)  # (B T, vocab): every position, -100 ignored
        want = F.cross_entropy(every, y.flatten(), ignore_index=IGNORE, label_smoothing=0.1)
        assert loss == pytest.approx(float(want), rel=1e-5)
        index = (y.flatten() != IGNORE).nonzero().squeeze(1)
        per_target = F.cross_entropy(every[index], y.flatten()[index], reduction="none")
        for kw in ({}, {"target_index": index}):  # forward finds the targets itself if not given
            assert torch.allclose(model(x, y, reduction="none", **kw), per_target, atol=1e-5)


class _PoisonAt(Examples):
    """Puts a nan into a frozen weight when batch `at` is drawn (a test-only trigger)."""

    def __init__(self, base, model, at):
        super().__init__(base.tokens, base.index, base.block_size, base.name)
        self.model, self.at = model, at

    def get_batch(self, batch_size, index=0, seed=0):
        if index == self.at:
            with torch.no_grad():
                self.model.ln_f.weight[0] = float("nan")
        return super().get_batch(batch_size, index, seed)


def test_a_nonfinite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    model, data = _toy_model(), toy_examples()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("h.0.attn")
    saved = {}
    cfg = train.TrainConfig(lr=1e-2, warmup=0, max_iters=10, ckpt_interval=2, batch_size=4,
                            progress=False)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*step 4\)"):
        train.train(model, _PoisonAt(data, model, at=4), data, cfg, out_dir=tmp_path,
                    save=lambda m, d: saved.update(
                        {n: p.detach().clone() for n, p in m.named_parameters()
                         if p.requires_grad}))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["params"].values())
    assert all(torch.equal(saved[n], t) for n, t in ckpt["params"].items())


class _InfGradAt(Examples):
    """Drawing batch `at` makes that micro-step's gradient of h.0.attn.c_attn.weight inf (as an
    fp16 overflow would), once; drawing batch `stop` is a Ctrl-C that saves nothing."""

    def __init__(self, base, model, at, stop=None):
        super().__init__(base.tokens, base.index, base.block_size, base.name)
        self.at, self.stop, self.poison, self.drawn = at, stop, False, []
        model.h[0].attn.c_attn.weight.register_hook(
            lambda g: torch.full_like(g, math.inf) if self.poison else g)

    def get_batch(self, batch_size, index=0, seed=0):
        if index == self.stop:
            raise KeyboardInterrupt
        self.drawn.append(index)
        self.poison = index == self.at
        return super().get_batch(batch_size, index, seed)


def test_a_step_the_loss_scaler_skips_is_logged_and_not_counted(tmp_path, monkeypatch):
    """fp16's GradScaler skips the optimizer step whose gradients are inf: the step is logged
    as skipped, and the schedule and --max-iters count the steps taken, so the run still makes
    max_iters updates with the whole schedule; resume after a skip is exact. (The real scaler,
    enabled on the CPU, in place of amp_setup's: fp16 needs CUDA.)"""
    monkeypatch.setattr(train, "amp_setup",
                        lambda *a, **k: (nullcontext, torch.amp.GradScaler("cpu")))
    cfg = train.TrainConfig(lr=1e-2, warmup=2, max_iters=5, eval_interval=5, log_interval=1,
                            ckpt_interval=1, batch_size=4, progress=False)
    clean = train.train(_toy_model(), toy_examples(), toy_examples(4), cfg)
    model = _toy_model()
    data = _InfGradAt(toy_examples(), model, at=2)
    history = train.train(model, data, toy_examples(4), cfg, out_dir=tmp_path / "whole",
                          save=lambda m, d: None)
    assert data.drawn == [0, 1, 2, 3, 4, 5]  # batch 2's step was skipped: one more batch
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4, 5]
    assert [h["lr"] for h in history] == [h["lr"] for h in clean]  # lr_at(0), ..., lr_at(4)
    assert [h["skipped_steps"] for h in history] == [0, 0, 0, 1, 1, 1]
    assert _read_log(tmp_path / "whole") == json.loads(json.dumps(history))
    ckpt = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    assert all(s["step"] == 5 for s in ckpt["optimizer"]["state"].values())  # 5 AdamW updates

    parts, model = tmp_path / "parts", _toy_model()
    with pytest.raises(KeyboardInterrupt):  # after step 3 (batches 0, 1, 2 skipped, 3)
        train.train(model, _InfGradAt(toy_examples(), model, at=2, stop=4), toy_examples(4),
                    cfg, out_dir=parts, save=lambda m, d: None)
    model = _toy_model()
    data = _InfGradAt(toy_examples(), model, at=None)
    train.train(model, data, toy_examples(4), cfg, out_dir=parts, resume=True,
                save=lambda m, d: None)
    assert data.drawn == [4, 5]

    def strip(log):
        return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "train_s")} for h in log]
    assert strip(_read_log(parts)) == strip(_read_log(tmp_path / "whole"))
    resumed = torch.load(parts / "ckpt.pt", weights_only=True)["params"]
    assert all(torch.equal(resumed[k], t) for k, t in ckpt["params"].items())


def test_train_py_pretrains_from_scratch_and_writes_a_loadable_model(shakespeare_dir, tmp_path):
    out = tmp_path / "scratch"
    train.main(["--data", str(shakespeare_dir), "--n-layer", "1", "--n-head", "2",
                "--n-embd", "32", "--block-size", "32", "--batch-size", "4", "--max-iters",
                "10", "--warmup", "2", "--eval-interval", "5", "--eval-batches", "2",
                "--out", str(out), "--no-progress"])
    log = _read_log(out)
    assert log[-1]["step"] == 10 and log[-1]["val_loss"] < log[0]["val_loss"]
    model = GPT.from_pretrained(out)
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (1, 32, 32)


def test_train_py_refuses_a_warmup_longer_than_the_run(shakespeare_dir, tmp_path, capsys):
    from conftest import one_error_line
    line = one_error_line(capsys, train.main, [
        "--data", shakespeare_dir, "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--block-size", "16", "--max-iters", "10", "--out", tmp_path / "o"])  # warmup 20
    assert "--warmup 20" in line and "--max-iters 10" in line, line
    assert not (tmp_path / "o").exists()


def test_train_py_full_finetuning_updates_every_weight(tiny_base, shakespeare_dir, tmp_path):
    before = GPT.from_pretrained(tiny_base).state_dict()
    out = tmp_path / "full"
    train.main(["--init", str(tiny_base), "--data", str(shakespeare_dir), "--block-size", "32",
                "--batch-size", "2", "--max-iters", "2", "--warmup", "1", "--lr", "1e-3",
                "--eval-batches", "1", "--out", str(out), "--no-progress"])
    after = GPT.from_pretrained(out).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert sorted(changed) == sorted(before)
    assert GPT.from_pretrained(tiny_base).state_dict()["wte.weight"].equal(before["wte.weight"])


def test_train_py_resume_takes_the_runs_settings_from_the_checkpoint(tiny_base, shakespeare_dir,
                                                                    tmp_path, monkeypatch, capsys):
    """`python train.py --out DIR --resume` alone continues a full fine-tuning run (its --init,
    data and schedule from ckpt.pt) to the bit; a flag given with another value is refused,
    naming it, before anything loads."""
    from conftest import one_error_line

    from data.datasets import data_from_args
    argv = ["--init", str(tiny_base), "--data", str(shakespeare_dir), "--block-size", "32",
            "--batch-size", "2", "--max-iters", "4", "--warmup", "1", "--lr", "1e-3",
            "--eval-interval", "2", "--eval-batches", "1", "--log-interval", "1", "--no-progress"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.main(argv + ["--out", str(whole)])

    def interrupting(*args):  # drawing batch 3 (step 4) is a Ctrl-C: step 2's checkpoint stays
        train_data, val_data = data_from_args(*args)

        class Interrupting(type(train_data)):
            def get_batch(self, batch_size, index=0, seed=0):
                if index == 3:
                    raise KeyboardInterrupt
                return super().get_batch(batch_size, index, seed)
        train_data.__class__ = Interrupting
        return train_data, val_data
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(train, "data_from_args", interrupting)
        train.main(argv + ["--out", str(parts)])
    assert torch.load(parts / "ckpt.pt", weights_only=True)["step"] == 2
    capsys.readouterr()
    line = one_error_line(capsys, train.main, ["--out", parts, "--resume", "--block-size", "64"])
    assert "--block-size 64 (the run: 32)" in line, line
    train.main(["--out", str(parts), "--resume", "--no-progress"])

    def strip(log):
        return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "train_s")} for h in log]
    assert strip(_read_log(parts)) == strip(_read_log(whole))
    a, b = (load_file(d / "model.safetensors") for d in (whole, parts))  # (metadata: any order)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_all_reduces_only_the_trainable_parameters(tmp_path):
    """What train() relies on under torchrun: DDP's gradient buckets hold only the parameters
    with requires_grad (for LoRA: A and B), so frozen W0 costs no communication.

    The hook does no collective and registers no Python callback on a gloo future: such a
    callback, still alive when the process group is destroyed, deadlocked this test at
    teardown (the main thread waiting for gloo's worker, the worker for the GIL)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lora import apply_lora

    model = apply_lora(_toy_model(), rank=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=60))  # fail, never hang
    try:
        ddp, reduced = DDP(model), []

        def hook(state, bucket):  # world size 1: the all-reduced bucket is the bucket itself
            reduced.extend(bucket.parameters())
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done

        ddp.register_comm_hook(None, hook)
        x, y = toy_examples().get_batch(2)
        ddp(x, y).backward()
        del ddp
    finally:
        dist.destroy_process_group()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in reduced} == trainable and len(trainable) == 4  # A, B of q and v


def _uneven_data():
    """8 examples whose completions have 2 or 20 tokens: a mean per micro-batch would weigh a
    2-token completion as much as a 20-token one."""
    rng = np.random.default_rng(1)
    tokens, index = [], []
    for i in range(8):
        n = 2 if i % 2 else 20
        index.append((len(tokens), 3, 3 + n))
        tokens += rng.integers(0, 50, 3 + n).tolist()
    return Examples(np.array(tokens, dtype=np.uint16), index, 32, "uneven")


def _sgd_update(model, batches, **cfg):
    """The parameter update of one train_step with SGD(lr=1): minus the gradient it used."""
    cfg = train.TrainConfig(grad_clip=0.0, label_smoothing=0.1, **cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.train_step(model, model, opt, scaler, batches, cfg, nullcontext)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(trainable, before)])


def _lora_toy():
    from lora import apply_lora
    model = apply_lora(_toy_model(), rank=2, dropout=0.0)
    with torch.no_grad():  # B != 0, so that A gets a gradient too
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    return model


def test_gradient_accumulation_gives_the_gradient_of_one_big_batch():
    """Eq. 2 summed over the target tokens of the effective batch, divided by their number:
    batch 2 x accumulation 2 == batch 4 (label smoothing included), and a mean per
    micro-batch would not be (the 2-token completions would weigh as much as the 20-token)."""
    data = _uneven_data()
    one = _sgd_update(_lora_toy(), [data.get_batch(4, 0)])
    two = _sgd_update(_lora_toy(), [data.get_batch(2, 0), data.get_batch(2, 1)])
    assert one.norm() > 0
    assert (one - two).norm() <= 1e-5 * one.norm()
    # the batches really differ in target tokens, so the test can tell the two normalizations
    counts = [int((y != IGNORE).sum()) for _, y in (data.get_batch(2, 0), data.get_batch(2, 1))]
    assert counts[0] != counts[1]


_DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from contextlib import nullcontext
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from torch.nn.parallel import DistributedDataParallel as DDP
from test_train import _lora_toy, _uneven_data, _sgd_update
import train
dist.init_process_group("gloo")
rank = dist.get_rank()
model = _lora_toy()
data = _uneven_data()
# rank r takes batch number r of size 2, as train() does with 2 processes: rows 2r, 2r + 1
batches = [data.get_batch(2, rank)]
trainable = [p for p in model.parameters() if p.requires_grad]
before = [p.detach().clone() for p in trainable]
cfg = train.TrainConfig(grad_clip=0.0, label_smoothing=0.1)
opt = torch.optim.SGD(trainable, lr=1.0)
train.train_step(DDP(model), model, opt, torch.amp.GradScaler("cpu", enabled=False), batches,
                 cfg, nullcontext)
update = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainable, before)])
if rank == 0:
    torch.save(update, {out!r})
dist.destroy_process_group()
"""


def test_two_ddp_processes_give_the_gradient_of_one_big_batch(tmp_path):
    """torchrun, 2 gloo processes x batch 2 == one process with batch 4."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    script = tmp_path / "ddp_step.py"
    script.write_text(_DDP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                         out=str(tmp_path / "update.pt")))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = torch.load(tmp_path / "update.pt", weights_only=True)
    one = _sgd_update(_lora_toy(), [_uneven_data().get_batch(4, 0)])
    assert (one - ddp).norm() <= 1e-5 * one.norm()
