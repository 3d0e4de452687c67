"""The CUDA paths, tested on CPU through torch.cuda's own functions (monkeypatched): --amp auto
picks bf16 only where the GPU has it natively, an explicit --device cuda:N reaches every CUDA
call, torchrun maps ranks to GPUs, and --resume refuses another precision or device type."""
import pytest
import torch
from conftest import toy_examples
from test_train import _toy_model

import train


class Calls(list):
    """A stand-in for a torch.cuda function: records the device of each call, returns value."""

    def __init__(self, value=None):
        super().__init__()
        self.value = value

    def __call__(self, device=None, **kwargs):
        self.append(device)
        return self.value


def fake_gpu(monkeypatch, capability, emulation=True):
    """A machine whose GPUs have this compute capability; is_bf16_supported() answers as torch
    does: True below 8.0 too when emulation counts (its default)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cap = Calls(capability)
    monkeypatch.setattr(torch.cuda, "get_device_capability", cap)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability >= (8, 0) or (
                            emulation and including_emulation))
    monkeypatch.setattr(torch.version, "hip", None)
    return cap


# ---------------------------------------------------------------- 13. --amp auto on a GPU

@pytest.mark.parametrize("capability, amp, scaled", [
    ((7, 5), "fp16", True),   # T4, RTX 20xx: bf16 only emulated
    ((7, 0), "fp16", True),   # V100
    ((8, 0), "bf16", False),  # A100
    ((9, 0), "bf16", False),  # H100
])
def test_amp_auto_picks_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, amp,
                                                                 scaled):
    cap = fake_gpu(monkeypatch, capability)
    autocast, scaler = train.amp_setup("auto", "cuda:1")
    assert autocast().fast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert scaler.is_enabled() == scaled  # fp16 needs loss scaling, bf16 does not
    assert cap and all(torch.device(d) == torch.device("cuda:1") for d in cap)  # that GPU's


def test_amp_auto_is_fp32_on_cpu_and_the_run_says_its_precision_first(capsys):
    model, data = _toy_model(), toy_examples()
    for amp, said in (("auto", "in fp32"), ("bf16", "in bf16")):
        cfg = train.TrainConfig(lr=1e-2, warmup=0, max_iters=1, batch_size=4, amp=amp,
                                progress=False)
        train.train(model, data, data, cfg)
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("training 1 steps") and said in first, first


@pytest.mark.filterwarnings("ignore:`torch.cuda.amp.GradScaler")  # deprecated where both exist
def test_training_runs_on_a_torch_without_torch_amp_grad_scaler(monkeypatch):
    """requirements.txt allows torch 2.1; torch.amp.GradScaler came in 2.3."""
    monkeypatch.delattr(torch.amp, "GradScaler")
    _, scaler = train.amp_setup("auto", "cpu")
    assert not scaler.is_enabled()
    model, data = _toy_model(), toy_examples()
    cfg = train.TrainConfig(lr=1e-2, warmup=0, max_iters=2, batch_size=4, progress=False)
    assert len(train.train(model, data, data, cfg)) == 2


# ---------------------------------------------------------------- 14. --device cuda:1 honoured

def test_timing_waits_for_the_gpu_it_times(monkeypatch):
    from support import metrics, timing
    sync = Calls()
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    timing.synchronizer("cuda:1")()
    metrics.now(torch.device("cuda", 1))  # evaluate_e2e passes the model's device
    assert [torch.device(d) for d in sync] == [torch.device("cuda:1")] * 2
    sync.clear()
    timing.synchronizer("cpu")()
    metrics.now("cpu")
    assert sync == []


def test_bench_reads_peak_memory_and_name_of_the_gpu_it_runs_on(monkeypatch):
    """The memory probe's model is built on the CPU here (train_arm and batch_for replaced);
    what is checked is which GPU the allocator's peak is reset and read on."""
    import argparse

    from conftest import tiny_gpt

    import bench

    reset, peak, name = Calls(), Calls(123_456), Calls("NVIDIA T4")
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", peak)
    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    model = tiny_gpt().train()
    monkeypatch.setattr(bench, "train_arm", lambda args, arm: (model, bench.make_optimizer(
        model, bench.TRAIN)))
    monkeypatch.setattr(bench, "batch_for", lambda args, config: (
        torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)))
    args = argparse.Namespace(device="cuda:1", threads=torch.get_num_threads(), _child="lora",
                              mem_steps=1)
    res = bench.peak_memory_child(args)
    assert res["peak_bytes"] == 123_456 and res["memory_method"] == "cuda max_memory_allocated"
    assert bench.device_name("cuda:1") == "NVIDIA T4" and bench.device_name("cpu") == "cpu"
    assert [torch.device(d) for d in reset + peak + name] == [torch.device("cuda:1")] * 3


@pytest.fixture
def torchrun(monkeypatch):
    """This process as rank 1 of 2 under torchrun on a machine with 2 GPUs: -> the list of
    calls (set_device, init_process_group) in their order; nothing is really joined."""
    calls = []
    fake_gpu(monkeypatch, (8, 0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    return calls


@pytest.mark.parametrize("flag", ["cuda", "auto"])
def test_torchrun_puts_each_rank_on_the_gpu_of_its_local_rank(torchrun, flag):
    from support.common import setup_distributed

    assert setup_distributed(flag) == (1, 2, "cuda:1")
    assert [c[0] for c in torchrun] == ["set_device", "init"]  # the GPU first, then NCCL
    assert torch.device(torchrun[0][1]) == torch.device("cuda:1") and torchrun[1][1] == "nccl"


def test_torchrun_refuses_a_fixed_gpu_index_before_joining(torchrun):
    from support.common import setup_distributed

    with pytest.raises(ValueError, match=r"--device cuda:0 under torchrun: .*LOCAL_RANK.*"
                                         r"--device cuda"):
        setup_distributed("cuda:0")
    assert torchrun == []  # refused on every rank alike, before init_process_group


def test_a_gpu_index_this_machine_lacks_is_one_clear_error(torchrun, monkeypatch):
    from support.common import get_device, setup_distributed

    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA devices "
                                         r"\(cuda:0 to cuda:1\)"):
        get_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "2")  # 3 processes per node, 2 GPUs
    with pytest.raises(ValueError, match=r"LOCAL_RANK 2 .* 2 CUDA devices"):
        setup_distributed("cuda")
    assert torchrun == []


# ---------------------------------------------------------------- 15. resume: precision, device

def _resume_run(out, amp, resume=False):
    model, data = _toy_model(), toy_examples()
    cfg = train.TrainConfig(lr=1e-2, warmup=0, max_iters=2, ckpt_interval=1, batch_size=4,
                            amp=amp, progress=False)
    return train.train(model, data, data, cfg, out, resume=resume)


def test_a_run_records_the_precision_auto_resolved_to_and_the_device_type(tmp_path):
    _resume_run(tmp_path, "auto")
    settings = torch.load(tmp_path / "ckpt.pt", weights_only=True)["settings"]
    assert settings["amp"] == "fp32" and settings["device"] == "cpu"
    _resume_run(tmp_path, "off", resume=True)  # the same precision, said the other way


def test_a_bf16_gpu_run_is_not_resumed_in_fp32_on_a_cpu(tmp_path):
    """The checkpoint's settings made what a CUDA bf16 run records (no GPU here)."""
    _resume_run(tmp_path, "auto")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["settings"].update(amp="bf16", device="cuda")
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"--resume with other settings than the run had: "
                                         r"amp fp32 \(the run: bf16\), device cpu \(the run: "
                                         r"cuda\); .*--overwrite"):
        _resume_run(tmp_path, "auto", resume=True)
