"""What every script shares, and nothing else: the device and dtype (torchrun's too), the
tokenizer, strict tensor checks, atomic writes, figures, and the command line's one-line errors
and --help format.
Everything imports this module; it imports nothing of the project. (A base model is loaded by
name with model.GPT.from_pretrained.)
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>: ends every completion, pads batches, stops generation
FINETUNE_OUT = "out/finetune"  # where finetune.py writes, and sample.py looks, by default
ADAPTER_FILE = "adapter.safetensors"  # the adapter's name inside a finetune.py output folder
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def get_device(name: str = "auto") -> str:
    """'auto' -> cuda when there is a GPU, else cpu; else a device torch knows that this machine
    has ("cpu", "cuda", "cuda:1", "mps", ...), or a ValueError naming --device."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (use auto, cpu, cuda, cuda:1, ...)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device (use cpu or auto)")
    if device.type == "cuda" and device.index is not None:
        check_gpu_index(device.index, f"--device {name}")
    return name


def check_gpu_index(index: int, what: str):
    """A ValueError naming what (a flag, LOCAL_RANK) if this machine has no GPU number index."""
    n = torch.cuda.device_count()
    if index >= n:
        raise ValueError(f"{what}: this machine has {n} CUDA devices (cuda:0 to cuda:{n - 1})")


def resolve_amp(amp: str, device) -> str:
    """--amp (auto, off, bf16, fp16) on a device (a torch.device or a name such as "cuda:1";
    "cuda" is the current GPU) -> the precision the forward runs in: "fp32" (autocast off),
    "bf16" or "fp16"; a precision is returned as it is. auto: fp32 off CUDA; on CUDA bf16 where
    the GPU computes it natively (NVIDIA compute capability 8.0 and up: A100, RTX 30xx, H100;
    and ROCm, where torch counts bf16 as supported), else fp16 (T4, V100, RTX 20xx).
    torch.cuda.is_bf16_supported() does not decide: by default it counts bf16 emulated in
    software as support, and it answers for the current GPU, not this one. An unknown value,
    or fp16 off CUDA: ValueError."""
    kind = torch.device(device).type
    if amp == "auto":
        if kind != "cuda":
            return "fp32"
        native = torch.version.hip is not None or \
            tuple(torch.cuda.get_device_capability(device)) >= (8, 0)
        return "bf16" if native else "fp16"
    if amp not in ("off", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown --amp '{amp}': use auto, off, bf16 or fp16")
    if amp == "fp16" and kind != "cuda":
        raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16 or off")
    return "fp32" if amp == "off" else amp


def get_tokenizer():
    """GPT-2's BPE (tiktoken 'gpt2'). tiktoken downloads its two files on first use and caches
    them; offline, TIKTOKEN_CACHE_DIR must name a folder that holds them (see README)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise OSError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}); offline, set "
                      f"TIKTOKEN_CACHE_DIR to a folder with its files (see README)") from None


def check_tensors(expected: dict, got: dict, source) -> None:
    """got {name: tensor} must have exactly the names of expected {name: shape}, with those
    shapes; otherwise one ValueError naming what is missing, unexpected or of the wrong shape."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    parts = ([f"missing tensors {short_list(missing)}"] if missing else []) + (
        [f"unexpected tensors {short_list(unexpected)}"] if unexpected else [])
    if parts:
        raise ValueError(f"{source}: " + "; ".join(parts))
    for k, shape in expected.items():
        if tuple(got[k].shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {k} has shape {tuple(got[k].shape)}, "
                             f"the model expects {tuple(shape)}")


def nonfinite(tensors: dict) -> list:
    """Names of the floating-point tensors of {name: tensor} holding a nan or an inf."""
    return [n for n, t in tensors.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(tensors: dict, source) -> None:
    """A ValueError naming the source and its non-finite tensors, if it has any."""
    bad = nonfinite(tensors)
    if bad:
        raise ValueError(f"{source}: tensor {short_list(bad, 3)} holds nan or inf values")


def tensors_digest(tensors: dict) -> str:
    """sha256 over names and bytes of {name: tensor}: equal digests, equal tensors."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def short_list(names, n=6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def fsync_path(path) -> None:
    """Flush a file's bytes, or a folder's entries (the renames in it), to the disk: what is
    written after depends on them, also across a power cut. (Windows cannot open a folder.)"""
    if Path(path).is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path, write, shown=None) -> None:
    """write(path), then its bytes flushed to the disk (fsync_path). An OSError (a full disk, ...)
    is one line naming the file (or `shown`: the name it is written for)."""
    try:
        write(path)
        fsync_path(path)
    except (OSError, RuntimeError) as e:  # torch.save says RuntimeError on a full disk
        raise OSError(f"{shown or path}: cannot write it "
                      f"({getattr(e, 'strerror', None) or e})") from None


def atomic_write(path, write):
    """write(tmp_path), fsync, then one rename over path: readers see the old file or the new
    one, whole, whatever stops the writer (a failure, a crash, a power cut), and a failed write
    leaves no temporary file behind. An OSError (disk full, ...) names the file."""
    atomic_write_set({path: write})


MANIFEST = "manifest.json"  # {"sha256": {file: hex digest, or null: no such file}}


def atomic_write_set(writes: dict):
    """{path: write}, every path in one folder. Every write(tmp_path) first, each flushed to the
    disk: a failure while writing (disk full, a bad input found halfway) leaves the old set as
    it was, never a mix, and no temporary files. Then one rename per file, and no file system
    renames several files at once: a crash between two renames would leave a mix. For a set of
    two or more, the folder's MANIFEST records each file's sha256, written LAST (after the
    renames reached the disk), and the loaders check the files they read against it
    (check_manifest): a mix is refused, naming the file. Before the first rename the manifest
    already records every file of the set as it is (absent ones as null), so a mix is refused
    also on a folder written by another tool (transformers) or by nothing yet."""
    paths = [Path(p) for p in writes]
    if not paths:
        return
    folder = paths[0].parent
    if len(paths) > 1 and any(p.parent != folder for p in paths):
        raise ValueError(f"one set, one folder: {', '.join(map(str, paths))}")
    tmps = {}
    try:
        for path, write in zip(paths, writes.values()):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=path.name + ".", suffix=".tmp")
            os.close(fd)
            tmps[path] = tmp
            write_synced(tmp, write, shown=path)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        if len(paths) > 1:
            _record(folder, {p: _sha256(p) if p.exists() else None for p in paths}, keep=True)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
        fsync_path(folder)
        if len(paths) > 1:
            _record(folder, {p: _sha256(p) for p in paths}, keep=False)
    except BaseException:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def _sha256(path) -> str:
    """The file's sha256, read in 1 MiB chunks (hashlib.file_digest would need Python 3.11)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(folder, strict=True) -> dict:
    """{file: sha256 or None} of the folder's MANIFEST; {} without one, or (strict=False) for
    one that is not readable, which the writer then replaces."""
    path = Path(folder) / MANIFEST
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["sha256"]
        if not all(isinstance(v, (str, type(None))) for v in recorded.values()):
            raise TypeError("a value is neither a hex digest nor null")
        return recorded
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if not strict:
            return {}
        raise ValueError(f"{path}: not a manifest of this project ({e!r}); write the set again, "
                         f"or delete {MANIFEST} if another tool wrote the folder") from None


def _record(folder, digests: dict, keep: bool):
    """Put {path: sha256 or None} into the folder's manifest; keep=True: only files it does not
    record yet (what it records is what a torn set is checked against)."""
    recorded = _read_manifest(folder, strict=False)
    new = {p.name: d for p, d in digests.items() if not (keep and p.name in recorded)}
    if new:
        text = json.dumps({"sha256": {**recorded, **new}}, indent=1, sort_keys=True) + "\n"
        atomic_write(Path(folder) / MANIFEST, lambda p: Path(p).write_text(text, encoding="utf-8"))


def check_manifest(folder, names) -> None:
    """The files `names` of folder as its MANIFEST (written by atomic_write_set) records them: a
    ValueError naming the first that is not, the mark of a set torn by a crash between two
    renames (or of a file changed by another tool). A name it does not record, or a folder
    without one (such as transformers writes), is not checked: there is nothing to check
    against. Reads each recorded file once (sha256: about a second per GB)."""
    recorded = _read_manifest(folder)
    for name in names:
        if name not in recorded:
            continue
        path, want = Path(folder) / name, recorded[name]
        got = _sha256(path) if path.exists() else None
        if got != want:
            raise ValueError(
                f"{path}: not as {Path(folder) / MANIFEST} records it "
                f"({'absent' if got is None else 'present' if want is None else 'other bytes'}):"
                f" the set was torn by a crash while written, or changed by another tool; "
                f"write it again (or delete {MANIFEST} if another tool wrote it)")


def check_writable(path, flag, directory=False):
    """That files can be written at path (a file, or with directory=True a folder): the folder
    made, a file created there and removed, before the work whose results it will hold; else
    one OSError naming the flag and the path."""
    path = Path(path)
    folder = path if directory else path.parent
    try:
        if not directory and path.is_dir():
            raise IsADirectoryError(21, "a directory is in the way", str(path))
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        why = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else (e.strerror or e)
        raise OSError(f"{flag} {path}: cannot write {'there' if directory else 'it'} ({why})") \
            from None


def save_figure(fig, path, dpi=110):
    """A matplotlib Figure as a PNG, atomically. Figures are made with matplotlib.figure.Figure,
    not pyplot: no global backend is switched, so a notebook calling us keeps its own."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))


def file_size(path) -> str:
    n = os.path.getsize(path)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except None, flags' and where the help already speaks of its
    default (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or \
                action.help is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are what every other bad input here is (run_main):
    one line on stderr and exit code 1, instead of the usage block and exit code 2. A value of
    the wrong type says what the flag takes: "error: --rank takes an integer, got 'four' (see
    --help)"; argparse's other messages (an unknown flag, a bad choice, a missing value) are kept,
    in one line. --help still prints the usage and exits 0."""

    TAKES = {"int": "an integer", "float": "a number"}  # argparse names the type by its __name__

    def error(self, message):
        typed = re.fullmatch(r"argument (\S+?)(?:/\S+)?: invalid (\w+) value: (.*)", message)
        if typed and typed[2] in self.TAKES:
            message = f"{typed[1]} takes {self.TAKES[typed[2]]}, got {typed[3]}"
        else:
            message = re.sub(r"^argument (\S+?)(?:/\S+)?: ", r"\1: ", message)
        self.exit(1, f"error: {' '.join(message.split())} (see --help)\n")


RANGES = {  # the allowed values of a numeric setting: a test, and how --help says it
    "> 0": lambda v: 0 < v < math.inf, ">= 0": lambda v: 0 <= v < math.inf,
    ">= 1": lambda v: 1 <= v < math.inf, "[0, 1)": lambda v: 0 <= v < 1,
    "(0, 1]": lambda v: 0 < v <= 1, "finite": lambda v: math.isfinite(v),
    "[0, 2**32)": lambda v: 0 <= v < 2**32,  # a seed: what numpy and torch both take
}


def check_range(flag: str, value, spec: str):
    """value must lie in RANGES[spec] (None is always allowed: the default, 'not set'); else one
    ValueError naming the flag, e.g. "--lr must be > 0 (and finite), got inf"."""
    if value is not None and not RANGES[spec](value):
        finite = " (and finite)" if isinstance(value, float) and spec.startswith(">") else ""
        within = "in " if spec[0] in "[(" else ""
        raise ValueError(f"{flag} must be {within}{spec}{finite}, got {value}")
    return value


def check_flags(args, ranges: dict, skip=()):
    """check_range for the parsed --flags named in ranges ({dest: spec}), but those in skip; a
    list value (e.g. --ranks 1,2,4) is checked element by element."""
    for name, spec in ranges.items():
        if name not in skip:
            value = getattr(args, name)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                check_range("--" + name.replace("_", "-"), v, spec)


def help_with_range(text: str, ranges: dict, name: str, more: str = "") -> str:
    """A flag's help text followed by its allowed values as check_flags(args, ranges) checks
    them: help_with_range("timed rounds", {"rounds": ">= 1"}, "rounds") -> "timed rounds
    (>= 1)"; more is added inside the brackets (", at most 64"). KeyError if name is not in
    ranges."""
    return f"{text} ({ranges[name]}{more})"


def check_dataclass(obj):
    """check_range for every field of a dataclass that has a "range" in its metadata."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("range"):
            check_range("--" + f.name.replace("_", "-"), getattr(obj, f.name), f.metadata["range"])
    return obj


def add_dataclass_args(p: argparse.ArgumentParser, cls, headings: dict) -> dict:
    """The fields of dataclass cls as --flags, with the help, choices (field metadata) and
    defaults it gives, in argument groups starting at the fields named in headings (field:
    title); a bool that defaults to True becomes --no-FLAG. -> {field: its group}."""
    groups, g = {}, p
    for f in dataclasses.fields(cls):
        if f.name in headings:
            g = groups[f.name] = p.add_argument_group(headings[f.name])
        flag, meta = f.name.replace("_", "-"), f.metadata
        if f.type is bool:
            g.add_argument(f"--no-{flag}" if f.default else f"--{flag}", dest=f.name,
                           action="store_false" if f.default else "store_true",
                           help=("no " if f.default else "") + meta["help"])
        else:
            rng = f" ({meta['range']})" if meta.get("range") else ""
            g.add_argument(f"--{flag}", type=f.type, default=f.default, help=meta["help"] + rng,
                           choices=meta.get("choices"))
    return groups


def run_main(main):
    """Run a script's main(): a bad input (ValueError, OSError) ends in one line on stderr and
    exit code 1, not a traceback; Ctrl-C exits with 130."""
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def setup_distributed(device: str = "auto"):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU. On
    GPUs each process takes the GPU of its LOCAL_RANK (made the current device before the
    group is joined, as NCCL wants), so --device is auto or cuda: a fixed index (cuda:0) would
    put every process on one GPU, and is a ValueError on every rank alike.
    -> (rank, world_size, device of this process)."""
    device = get_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"--device {device} under torchrun: each process takes the GPU of "
                             f"its LOCAL_RANK; use --device cuda (or auto)")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_gpu_index(local_rank, f"torchrun's LOCAL_RANK {local_rank} (a process per GPU)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device
