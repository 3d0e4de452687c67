"""The CUDA paths, tested on CPU through torch.cuda's own functions (monkeypatched): --amp auto
picks bf16 only where the GPU has it natively, an explicit --device cuda:N reaches every CUDA
call, torchrun maps ranks to GPUs, and --resume refuses another precision or device type."""
import pytest
import torch

import train
from conftest import toy_examples
from test_train import _toy_model


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
    for amp, said in (("auto", "fp32"), ("bf16", "bf16 autocast")):
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
