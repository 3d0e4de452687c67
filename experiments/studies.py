"""Rerun §7 of the LoRA paper ("Understanding the low-rank updates") on a model trained here.

Four studies, one command each, each printing a table and writing JSON (and a PNG where the paper
has a figure) under --out:

  rank      validation loss by rank r in {1, 2, 4, 8, 64} for W_q / W_q,W_v / W_q,W_k,W_v,W_o,
            beside the base model and full fine-tuning with the same budget (paper Table 6);
  types     which weights to adapt at a fixed number of trainable parameters (Table 5);
  subspace  phi(A_r=8, A_r=64, i, j), between two seeds at r=64, and for random matrices
            (§7.2, Figures 3 and 4);
  deltaw    how Delta W relates to W: ||U^T W V||_F for the top-r directions of Delta W, of W and
            of a random matrix, and the amplification factor (§7.3, Table 7).

Every fine-tuning run is cached under --out/runs (its adapter and its validation loss), so the
studies share runs: `all` trains each configuration once.

Reading order: the math (subspace_similarity, projection_norm, ...) -> reading A, W0 and Delta W
out of a LoRA model (through LoRALinear's slices, base_weight, delta_weight) -> the runs -> plots
-> one function per study -> main().
"""

import argparse
import json
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from safetensors.torch import load_file, save_file

from data.datasets import PAD, load_data
from lora import LoRALinear, apply_lora, count_trainable, paper_num_params
from model import GPT
from support.adapters import load_adapter, save_adapter
from support.common import (ArgumentParser, HelpFormatter, atomic_write, check_flags,
                            check_writable, get_device, help_with_range, run_main, save_figure,
                            tensors_digest)
from support.runs import claim_out_dir, release_out_dir
from train import TrainConfig, evaluate, train

# ---------------------------------------------------------------- the math of §7


def right_singular_vectors(A: torch.Tensor) -> torch.Tensor:
    """The right-singular vectors of A (r, k) as the columns of a (k, r) matrix, ordered by
    singular value, largest first. §7.2: "we perform singular value decomposition and obtain the
    right-singular unitary matrices U_{A_r=8} and U_{A_r=64}"; A multiplies the input x (h = W0 x
    + B A x), so these directions live in the input space, R^k."""
    A = A.detach().double()
    _, _, Vh = torch.linalg.svd(A, full_matrices=False)  # Vh: (min(r, k), k), rows by sigma desc
    return Vh.T  # (k, min(r, k))


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor, i: int, j: int) -> float:
    """phi = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), the normalized subspace similarity of §7.2
    (based on the Grassmann distance). U1, U2 have orthonormal columns. phi is 1 when one span
    contains the other and 0 when they are orthogonal; in between it is the mean squared cosine of
    the principal angles between the two subspaces, so it always lies in [0, 1]."""
    if not (1 <= i <= U1.size(1) and 1 <= j <= U2.size(1)):
        raise ValueError(f"i must be in [1, {U1.size(1)}] and j in [1, {U2.size(1)}]")
    M = U1[:, :i].T.double() @ U2[:, :j].double()  # (i, j): cosines between the basis vectors
    return float((M ** 2).sum() / min(i, j))


def similarity_grid(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """phi(i, j) for every i <= U1's columns and j <= U2's, as a (r1, r2) tensor (row i-1, column
    j-1): the heat maps of Figures 3 and 4. The same numbers as subspace_similarity, computed at
    once: ||U1_i^T U2_j||_F^2 is a 2-D prefix sum of the squared cosines."""
    M2 = (U1.T.double() @ U2.double()) ** 2  # (r1, r2)
    sums = M2.cumsum(0).cumsum(1)  # sums[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2
    i = torch.arange(1, M2.size(0) + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, M2.size(1) + 1, dtype=torch.float64)[None, :]
    return sums / torch.minimum(i, j)


def top_directions(M: torch.Tensor, r: int):
    """(U, V): the top-r left (d, r) and right (k, r) singular vectors of M (d, k)."""
    U, _, Vh = torch.linalg.svd(M.detach().double(), full_matrices=False)
    return U[:, :r], Vh[:r].T


def projection_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """||U^T W V||_F: how much of W lies in the r-dimensional subspaces spanned by U's and V's
    columns (§7.3; the paper writes U^T W V^T, its V holding the right-singular vectors as
    rows)."""
    return float(torch.linalg.matrix_norm(U.T @ W.detach().double() @ V))


def delta_w_vs_w(W: torch.Tensor, dW: torch.Tensor, r: int, seed: int = 0) -> dict:
    """Table 7 for one weight matrix: ||U^T W V||_F with U, V the top-r singular directions of
    Delta W, of W itself and of a random Gaussian matrix; ||W||_F, ||Delta W||_F and the
    amplification factor ||Delta W||_F / ||U^T W V||_F for Delta W's directions (§7.3: "Delta W
    amplifies directions not emphasized in W")."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(W.shape, generator=g, dtype=torch.float64)
    proj = {name: projection_norm(W, *top_directions(M, r))
            for name, M in (("delta_w", dW), ("w", W), ("random", R))}
    dw_norm = float(torch.linalg.matrix_norm(dW.detach().double()))
    return {"r": r, "proj_delta_w": proj["delta_w"], "proj_w": proj["w"],
            "proj_random": proj["random"],
            "norm_w": float(torch.linalg.matrix_norm(W.detach().double())),
            "norm_delta_w": dw_norm, "amplification": dw_norm / proj["delta_w"]}


# ---------------------------------------------------------------- A and Delta W of a LoRA model


def lora_layer(model, layer: int, name: str):
    """The LoRALinear of block `layer` that adapts slice `name` ("q", "k", "v" of the fused
    c_attn, "o" of attn.c_proj): found by its .slices, so no offset is re-derived here."""
    for module in model.h[layer].modules():
        if isinstance(module, LoRALinear) and name in module.slices:
            return module
    raise ValueError(f"block {layer} has no LoRA on W_{name}")


def lora_factors(model, layer: int, name: str):
    """(A, B, scaling) of slice `name` of block `layer`: Delta W = scaling * B @ A, with A (r, C)
    acting on the input (§4.1)."""
    module = lora_layer(model, layer, name)
    return module.lora_A[name].detach(), module.lora_B[name].detach(), module.scaling


def base_weight(model, layer: int, name: str) -> torch.Tensor:
    """W_q, W_k, W_v or W_o of block `layer`, (C, C), as nn.Linear stores it (out, in): the W0 of
    h = W0 x + Delta W x, also when the adapter is merged (LoRALinear.base_weight)."""
    module = lora_layer(model, layer, name)
    start, stop = module.slices[name]
    return module.base_weight().detach()[start:stop]


def delta_weight(model, layer: int, name: str) -> torch.Tensor:
    """Delta W = (alpha/r) B A of slice `name` of block `layer`, (C, C), in fp32."""
    return lora_layer(model, layer, name).delta_weight(name)


@torch.no_grad()
def block_inputs(model, data, layer: int, batch_size: int, max_batches) -> torch.Tensor:
    """X (n, C): what W_q and W_v see in block `layer` (its ln_1 output) at every non-padding
    position of data's evaluation batches. A's gradient is a sum of (B^T dh) x^T over these x,
    so training pushes A's rows towards the directions X occupies most; comparing A with X's
    right-singular vectors separates that pull from structure specific to the task."""
    rows = []
    hook = model.h[layer].ln_1.register_forward_hook(lambda m, i, o: rows.append(o.detach()))
    was_training = model.training
    model.eval()
    try:
        for x, _ in data.eval_batches(batch_size, max_batches):
            model(x.to(next(model.parameters()).device))
            rows[-1] = rows[-1][x.to(rows[-1].device) != PAD].cpu()  # (tokens, C)
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(rows)


# ---------------------------------------------------------------- the runs


TARGET_SETS = {"q": ("q",), "qv": ("q", "v"), "qkvo": ("q", "k", "v", "o")}


def weights_label(targets) -> str:
    """("q", "v") -> "W_q,W_v": the adapted weights as the paper names them (Tables 5 and 6)."""
    return ",".join(f"W_{t}" for t in targets)


def describe_run(args) -> str:
    """What every table and figure of one invocation shares: the task, the base model (as given
    to --init) and the budget of each fine-tuning run."""
    return (f"{Path(str(args.data)).name}, base model {args.init}: {args.steps} steps x batch "
            f"{args.batch_size} per run")


class Runs:
    """Fine-tuning runs of one base model on one task, each trained once with the same budget
    (steps, batch, schedule) and cached under out/runs: NAME.json (settings, validation loss,
    time) and, for LoRA, NAME.safetensors (the adapter) and NAME.A_init.safetensors (every A as
    the run started from it). A cached run is reused only if its settings match."""

    def __init__(self, args):
        self.args = args
        self.dir = Path(args.out) / "runs"
        self.dir.mkdir(parents=True, exist_ok=True)
        probe = self.load_base("cpu")  # for the block size and the base's identity
        self.config = probe.config
        self.base_id = tensors_digest(probe.state_dict())
        self.block_size = min(args.block_size, probe.config.block_size)
        self.train_data, self.val_data = load_data(args.data, self.block_size,
                                                   probe.config.vocab_size)

    def settings(self, targets, rank, seed) -> dict:
        a = self.args
        return {"init": str(a.init), "base_id": self.base_id, "data": str(a.data),
                "block_size": self.block_size, "targets": targets, "rank": rank, "seed": seed,
                "steps": a.steps, "batch_size": a.batch_size, "warmup": a.warmup,
                "lr": a.lr_full if targets == "full" else a.lr, "alpha": a.alpha,
                "lora_dropout": a.lora_dropout, "eval_batches": a.eval_batches}

    def load_base(self, device):
        """A fresh copy of the base model (--init) on device."""
        return GPT.from_pretrained(self.args.init, device=device)

    def base_loss(self) -> dict:
        """The base model on the task, untuned: where every run starts."""
        s = {**self.settings("none", 0, 0), "steps": 0}
        return self._cached("base", s, lambda: {"val_loss": evaluate(
            self.load_base(self.args.device), self.val_data, self.args.batch_size,
            self.args.eval_batches)})

    def get(self, targets, rank: int = 0, seed: int = 0) -> dict:
        """Run (or reuse) one fine-tuning: targets "full" (every weight) or a tuple of LoRA
        targets at `rank`. -> its record: val_loss, trainable, paper_params, seconds, ..."""
        name = self._name(targets, rank, seed)
        return self._cached(name, self.settings(
            targets if targets == "full" else list(targets), rank, seed),
            lambda: self._train(name, targets, rank, seed))

    def model(self, targets, rank, seed=0):
        """The fine-tuned LoRA model of a run (trained first if needed), on the CPU."""
        self.get(targets, rank, seed)
        return load_adapter(self.load_base("cpu"),
                            self.dir / f"{self._name(targets, rank, seed)}.safetensors")

    def initial_A(self, targets, rank, seed, layer, name):
        """A of slice `name` of block `layer` as the run started from it (trained first if
        needed), (r, C) on the CPU: to see how far training moved it. Recorded when the run
        started, not drawn again: on a GPU, apply_lora draws A from the device's generator,
        which a CPU redraw with the same seed does not reproduce."""
        self.get(targets, rank, seed)
        tensors = load_file(self.dir / f"{self._name(targets, rank, seed)}.A_init.safetensors")
        key = [k for k in tensors
               if k.startswith(f"h.{layer}.") and k.endswith(f".lora_A.{name}")]
        if len(key) != 1:
            raise ValueError(f"block {layer} has no LoRA on W_{name}")
        return tensors[key[0]]

    @staticmethod
    def _name(targets, rank, seed) -> str:
        return ("full" if targets == "full" else f"{''.join(targets)}-r{rank}") + f"-s{seed}"

    def _cached(self, name, settings, compute) -> dict:
        path = self.dir / f"{name}.json"
        if path.exists() and not self.args.fresh:
            rec = json.loads(path.read_text())
            if rec.get("settings") == settings and (
                    name == "base" or name.startswith("full")
                    or all((self.dir / f"{name}{ext}").exists()
                           for ext in (".safetensors", ".A_init.safetensors"))):
                return rec
        t0 = time.perf_counter()
        rec = {"name": name, "settings": settings, **compute(),
               "seconds": round(time.perf_counter() - t0, 1)}
        _write_json(path, rec)
        return rec

    def _train(self, name, targets, rank, seed) -> dict:
        a = self.args
        model = self.load_base(a.device)
        torch.manual_seed(seed)  # A's initialisation
        if targets == "full":
            paper = None
        else:
            apply_lora(model, rank=rank, alpha=a.alpha, targets=targets, dropout=a.lora_dropout)
            paper = paper_num_params(model.config, rank, targets)
            # The A this run starts from, kept as drawn (on --device) for initial_A.
            A_init = {n: p.detach().cpu().clone() for n, p in model.named_parameters()
                      if ".lora_A." in n}
        cfg = TrainConfig(lr=a.lr_full if targets == "full" else a.lr, batch_size=a.batch_size,
                          max_iters=a.steps, warmup=a.warmup, decay="linear",
                          label_smoothing=0.0, eval_interval=a.steps,
                          eval_batches=a.eval_batches, log_interval=max(1, a.steps // 10),
                          seed=seed, progress=False)
        print(f"  run {name}: {count_trainable(model):,} trainable parameters, "
              f"{a.steps} steps", flush=True)
        history = train(model, self.train_data, self.val_data, cfg)
        if targets != "full":
            atomic_write(self.dir / f"{name}.A_init.safetensors",
                         lambda p: save_file(A_init, p))
            save_adapter(model.cpu(), self.dir / f"{name}.safetensors", base_name=str(a.init))
        return {"val_loss": history[-1]["val_loss"], "train_loss": history[-1]["train_loss"],
                "trainable": count_trainable(model), "paper_params": paper,
                "history": [{k: h[k] for k in ("step", "train_loss")} for h in history]}


def _write_json(path, obj):
    text = json.dumps(obj, indent=1) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text))


# ---------------------------------------------------------------- plots

# Each plot is a matplotlib.figure.Figure, not pyplot's: no global backend is switched, and
# nothing is registered with pyplot that would need closing (see common.save_figure).


def _figure(table: dict, figsize, heading=None) -> Figure:
    """A figure whose title names the run: task, base model and budget (table["run"]), after
    the heading if given."""
    fig = Figure(figsize=figsize, layout="constrained")
    fig.suptitle(f"{heading}; {table['run']}" if heading else table["run"], fontsize=9)
    return fig


def _heatmap(ax, grid, title, xlabel, ylabel):
    """One phi heat map: rows i (top-i directions of the first matrix), columns j; 1-based."""
    g = grid.numpy() if isinstance(grid, torch.Tensor) else grid
    im = ax.imshow(g, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper",
                   extent=(0.5, g.shape[1] + 0.5, g.shape[0] + 0.5, 0.5), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return im


def rank_figure(table: dict) -> Figure:
    """Validation loss against r for each set of adapted weights, base and full fine-tuning as
    horizontal lines (the paper reports Table 6 as a table; the plot shows the same numbers)."""
    fig = _figure(table, (5.5, 3.8))
    ax = fig.subplots()
    for name, by_rank in table["lora"].items():
        ranks = sorted(int(r) for r in by_rank)
        ax.plot(ranks, [by_rank[str(r)]["val_loss"] for r in ranks], "o-",
                label=weights_label(TARGET_SETS[name]))
    ax.axhline(table["base"]["val_loss"], color="gray", ls=":", label="base (no tuning)")
    ax.axhline(table["full"]["val_loss"], color="black", ls="--", label="full fine-tuning")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("validation loss")
    ax.set_title(table["title"], fontsize=9)
    ax.legend(fontsize=8)
    return fig


def types_figure(table: dict) -> Figure:
    """Table 5 as bars: validation loss of each choice of weights at the same budget."""
    fig = _figure(table, (7.5, 3.6))
    ax = fig.subplots()
    rows = table["rows"]
    names = [f"{weights_label(row['targets'].split(','))}\nr={row['rank']}" for row in rows]
    ax.bar(names, [row["val_loss"] for row in rows], color="tab:blue")
    ax.axhline(table["full"]["val_loss"], color="black", ls="--", label="full fine-tuning")
    lo = min(min(row["val_loss"] for row in rows), table["full"]["val_loss"])
    hi = max(row["val_loss"] for row in rows)
    ax.set_ylim(lo - 0.2 * (hi - lo + 1e-3), hi + 0.2 * (hi - lo + 1e-3))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("validation loss")
    ax.set_title(table["title"], fontsize=9)
    ax.legend(fontsize=8)
    return fig


def subspace_ranks_figure(table: dict) -> Figure:
    """Figure 3: phi(A_r=8, A_r=64, i, j) for Delta W_q and Delta W_v, all j, and j <= 8."""
    small, large = table["small_rank"], table["large_rank"]
    fig = _figure(table, (11, 3.0), f"Figure 3: subspaces of A_r={small} and A_r={large}")
    grids, layer = table["ranks"], table["layer"]
    axes = fig.subplots(1, 4, width_ratios=[3, 1, 3, 1])
    for k, (name, grid) in enumerate(grids.items()):
        r1, r2 = grid.shape
        im = _heatmap(axes[2 * k], grid, f"Delta W_{name}, block {layer}", "j", "i")
        _heatmap(axes[2 * k + 1], grid[:, :min(r1, r2)], f"W_{name}, j <= {min(r1, r2)}",
                 "j", "i")
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"phi(A_r={r1}, A_r={r2}, i, j)")
    return fig


def subspace_seeds_figure(table: dict) -> Figure:
    """Figure 4: phi(A_r=64 seed a, A_r=64 seed b, i, j) for Delta W_q, Delta W_v, and for two
    random Gaussian matrices of the same shape."""
    heading = f"Figure 4: A_r={table['large_rank']} of two seeds, and two random matrices"
    fig = _figure(table, (11, 3.4), heading)
    grids, layer = table["seeds"], table["layer"]
    axes = fig.subplots(1, len(grids))
    for ax, (name, grid) in zip(axes, grids.items()):
        title = "random Gaussian" if name == "random" else f"Delta W_{name}, block {layer}"
        im = _heatmap(ax, grid, title, "j (seed b)", "i (seed a)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="phi")
    return fig


# The figures each study writes beside its JSON: file name -> figure of the study's table.
FIGURES = {"rank": {"rank.png": rank_figure}, "types": {"types.png": types_figure},
           "subspace": {"subspace_ranks.png": subspace_ranks_figure,
                        "subspace_seeds.png": subspace_seeds_figure},
           "deltaw": {}}


# ---------------------------------------------------------------- the studies

# Table 7 of the paper (arXiv 2106.09685 v2): GPT-3 175B, W_q of the 48th of 96 layers; printed
# beside ours. The amplification at r = 64 is computed from its numbers, 3.57 / 1.90.
PAPER_TABLE7 = {4: {"proj_delta_w": 0.32, "proj_w": 21.67, "proj_random": 0.02, "norm_w": 61.95,
                    "norm_delta_w": 6.91, "amplification": 21.5},
                64: {"proj_delta_w": 1.90, "proj_w": 37.71, "proj_random": 0.33, "norm_w": 61.95,
                     "norm_delta_w": 3.57, "amplification": 1.88}}


def _md_table(header, rows) -> str:
    """A Markdown table (what stdout shows and docs/studies.md quotes)."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _ranks(args, C):
    """The ranks of the sweep that fit the model (r <= n_embd)."""
    ranks = [r for r in args.ranks if r <= C]
    if len(ranks) < len(args.ranks):
        print(f"note: ranks above n_embd = {C} skipped: {[r for r in args.ranks if r > C]}")
    return ranks


def _layer(args, config) -> int:
    """The block that subspace and deltaw look at: --layer, else the paper's choice scaled, the
    48th of 96 (index 47), i.e. n_layer / 2 counted from 1."""
    layer = args.layer if args.layer is not None else max(0, config.n_layer // 2 - 1)
    if not 0 <= layer < config.n_layer:
        raise ValueError(f"--layer must be in 0..{config.n_layer - 1}, got {layer}")
    return layer


def _budget_rank(args, config) -> int:
    """The types study's R: four types share it as R/4 each, so a multiple of 4, <= n_embd."""
    R = args.budget_rank
    if R % 4 or not 4 <= R <= config.n_embd:
        raise ValueError(f"--budget-rank must be a multiple of 4 from 4 to n_embd = "
                         f"{config.n_embd}, got {R}")
    return R


def check_for_model(args, config, studies):
    """The settings that depend on the base model, checked once it is loaded, before the first
    run: --budget-rank (types), --layer (subspace, deltaw), --small-rank (subspace),
    --deltaw-ranks (deltaw)."""
    if "types" in studies:
        _budget_rank(args, config)
    if {"subspace", "deltaw"} & set(studies):
        _layer(args, config)
    if "subspace" in studies and args.small_rank > config.n_embd:
        raise ValueError(f"--small-rank must be at most n_embd = {config.n_embd}, got "
                         f"{args.small_rank}")
    too_big = [r for r in (args.deltaw_ranks or []) if r > config.n_embd]
    if "deltaw" in studies and too_big:
        raise ValueError(f"--deltaw-ranks must each be at most n_embd = {config.n_embd}, got "
                         f"{', '.join(map(str, too_big))}")


def study_rank(runs: Runs, args) -> dict:
    """Table 6: validation loss for q / q,v / q,k,v,o at each rank, same budget, with the base
    (no tuning) and full fine-tuning beside them."""
    ranks = _ranks(args, runs.config.n_embd)
    table = {"title": "Table 6: validation loss by rank r", "run": describe_run(args),
             "base": runs.base_loss(), "full": runs.get("full"), "lora": {}}
    for name, targets in TARGET_SETS.items():
        table["lora"][name] = {str(r): runs.get(targets, r) for r in ranks}
    rows = [[weights_label(targets)] + [table["lora"][name][str(r)]["val_loss"] for r in ranks]
            for name, targets in TARGET_SETS.items()]
    rows += [["base (no tuning)", table["base"]["val_loss"]] + [""] * (len(ranks) - 1),
             ["full fine-tuning", table["full"]["val_loss"]] + [""] * (len(ranks) - 1)]
    table["markdown"] = _md_table(["weights"] + [f"r={r}" for r in ranks], rows)
    table["ranks"] = ranks
    return table


def study_types(runs: Runs, args) -> dict:
    """Table 5: which weights to adapt with a fixed number of trainable parameters: one matrix
    type at rank R, two at R/2, four at R/4 (the paper: 18M parameters on GPT-3, R = 8)."""
    R = _budget_rank(args, runs.config)
    plan = [(("q",), R), (("k",), R), (("v",), R), (("o",), R), (("q", "k"), R // 2),
            (("q", "v"), R // 2), (("q", "k", "v", "o"), R // 4)]
    budget = paper_num_params(runs.config, R, ("q",))
    rows = []
    for targets, r in plan:
        rec = runs.get(targets, r)
        rows.append({"targets": ",".join(targets), "rank": r, "val_loss": rec["val_loss"],
                     "params": paper_num_params(runs.config, r, targets)})
    table = {"title": f"Table 5: validation loss at {budget:,} trainable parameters each "
                      f"(2 x n_layer x d_model x {R})", "run": describe_run(args),
             "budget": budget, "rows": rows, "full": runs.get("full"),
             "base": runs.base_loss()}
    table["markdown"] = _md_table(
        ["weights", "r", "params", "val loss"],
        [[weights_label(r["targets"].split(",")), r["rank"], r["params"], r["val_loss"]]
         for r in rows])
    return table


def study_subspace(runs: Runs, args) -> dict:
    """§7.2: phi(A_r=small, A_r=large, i, j) for Delta W_q and Delta W_v (Figure 3), phi between
    the A_r=large of two seeds, and between two random Gaussian matrices (Figure 4)."""
    C = runs.config.n_embd
    small, large = args.small_rank, min(args.large_rank, C)
    layer = _layer(args, runs.config)
    m_small, m_large = runs.model(("q", "v"), small, 0), runs.model(("q", "v"), large, 0)
    m_seed = runs.model(("q", "v"), large, 1)
    out = {"run": describe_run(args), "layer": layer, "small_rank": small, "large_rank": large,
           "n_embd": C, "ranks": {}, "seeds": {}, "summary": {}}
    inputs = block_inputs(runs.load_base("cpu"), runs.val_data, layer, args.batch_size,
                          args.eval_batches)
    X = right_singular_vectors(inputs)  # (C, C): the inputs' directions, most used first
    s = torch.linalg.svdvals(inputs.double())
    out["summary"]["inputs_top1_energy_share"] = float(s[0] ** 2 / (s ** 2).sum())
    for name in ("q", "v"):
        A_s, A_l, A_b = (lora_factors(m, layer, name)[0] for m in (m_small, m_large, m_seed))
        g_ranks = similarity_grid(right_singular_vectors(A_s), right_singular_vectors(A_l))
        g_seeds = similarity_grid(right_singular_vectors(A_l), right_singular_vectors(A_b))
        out["ranks"][name], out["seeds"][name] = g_ranks, g_seeds
        moved, to_inputs = {}, {}
        for r, seed, A in ((small, 0, A_s), (large, 0, A_l), (large, 1, A_b)):
            A0 = runs.initial_A(("q", "v"), r, seed, layer, name)
            moved[f"r{r}_s{seed}"] = float((A - A0).norm() / A0.norm())
            to_inputs[f"r{r}_s{seed}"] = subspace_similarity(right_singular_vectors(A), X, 1, 1)
        out["summary"][name] = {
            "phi_ranks_1_1": float(g_ranks[0, 0]),
            "phi_ranks_i_large": [float(v) for v in g_ranks[:, -1]],
            "phi_seeds_diag": [float(g_seeds[i, i]) for i in range(min(8, large))],
            "A_moved_from_init": moved,
            "phi_A_top1_inputs_top1": to_inputs}
    g = torch.Generator().manual_seed(0)
    R1, R2 = (torch.randn(large, C, generator=g) for _ in range(2))
    out["seeds"]["random"] = similarity_grid(right_singular_vectors(R1), right_singular_vectors(R2))
    out["summary"]["random"] = {
        "phi_seeds_diag": [float(out["seeds"]["random"][i, i]) for i in range(min(8, large))],
        "expected_phi_i_j": "max(i, j) / n_embd for random subspaces"}
    rows = []
    for name in ("q", "v"):
        s = out["summary"][name]
        rows.append([f"W_{name}", s["phi_ranks_1_1"], s["phi_ranks_i_large"][0],
                     s["phi_ranks_i_large"][-1], s["phi_seeds_diag"][0],
                     s["phi_seeds_diag"][min(2, large) - 1],
                     s["A_moved_from_init"][f"r{large}_s0"],
                     s["phi_A_top1_inputs_top1"][f"r{large}_s0"]])
    # Random subspaces of dimensions i and j in R^C: E[phi] = max(i, j) / C.
    rows.append(["random (expected)", 1 / C, large / C, large / C, 1 / C, min(2, large) / C,
                 "", 1 / C])
    out["markdown"] = _md_table(
        ["", f"phi(r{small}, r{large}, 1, 1)", f"phi(r{small}, r{large}, 1, {large})",
         f"phi(r{small}, r{large}, {small}, {large})", f"seeds at r{large}: phi(1, 1)",
         "phi(2, 2)", f"||A - A_init|| / ||A_init|| (r{large})",
         "phi(A top-1, inputs top-1)"], rows)
    return out


def study_deltaw(runs: Runs, args) -> dict:
    """§7.3, Table 7: ||U^T W V||_F for the top-r directions of Delta W, of W, of a random
    matrix; ||W||_F, ||Delta W||_F and the amplification factor, for W_q and W_v of every block
    (the table shows the study's layer)."""
    layer = _layer(args, runs.config)
    out = {"run": describe_run(args), "layer": layer, "by_rank": {}}
    for r in (args.deltaw_ranks or []):  # each <= n_embd (check_for_model)
        m = runs.model(("q", "v"), r, 0)
        out["by_rank"][str(r)] = {
            name: [delta_w_vs_w(base_weight(m, i, name), delta_weight(m, i, name), r, seed=i)
                   for i in range(runs.config.n_layer)] for name in ("q", "v")}
    rows = []
    for r, by_name in out["by_rank"].items():
        for name in ("q", "v"):
            t = by_name[name][layer]
            rows.append([f"r={r}, W_{name}", t["proj_delta_w"], t["proj_w"], t["proj_random"],
                         t["norm_w"], t["norm_delta_w"], t["amplification"]])
    for r, t in PAPER_TABLE7.items():
        rows.append([f"paper, GPT-3: r={r}, W_q"] + [t[k] for k in (
            "proj_delta_w", "proj_w", "proj_random", "norm_w", "norm_delta_w", "amplification")])
    out["markdown"] = _md_table(["", "||U^T W V|| (Delta W dirs)", "(W dirs)", "(random dirs)",
                                 "||W||_F", "||Delta W||_F", "amplification"], rows)
    return out


# ---------------------------------------------------------------- command line

STUDIES = ("rank", "types", "subspace", "deltaw")
# --quick: the same studies with a tiny budget (CI runs it on a tiny model).
QUICK = dict(steps=8, batch_size=4, warmup=2, eval_batches=2)


def _int_list(s: str):
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{s}'")


def run_studies(args) -> dict:
    """Run the chosen studies; write STUDY.json (and PNGs) under args.results. -> the tables."""
    results = Path(args.results or args.out)
    for d, flag in ((results, "--results" if args.results else "--out"),
                    (Path(args.out) / "runs", "--out")):
        check_writable(d, flag, directory=True)  # now, not after the first study
    # One studies run per --out: a second one at the same time is refused. Earlier outputs are
    # fine (resume=True): the cached runs under --out/runs are reused.
    lock = claim_out_dir(args.out, resume=True, overwrite=False)
    try:
        return _run_studies(args, results)
    finally:
        release_out_dir(lock)


def _run_studies(args, results: Path) -> dict:
    runs = Runs(args)
    chosen = STUDIES if "all" in args.studies else tuple(dict.fromkeys(args.studies))
    check_for_model(args, runs.config, chosen)
    out, t0 = {}, time.perf_counter()
    for name in chosen:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        table = {"rank": study_rank, "types": study_types, "subspace": study_subspace,
                 "deltaw": study_deltaw}[name](runs, args)
        table["seconds"] = round(time.perf_counter() - t, 1)
        for file, figure in FIGURES[name].items():
            save_figure(figure(table), results / file)
        if name == "subspace":
            for key in ("ranks", "seeds"):  # tensors -> lists for JSON
                table[key] = {k: [[round(float(v), 4) for v in row] for row in g]
                              for k, g in table[key].items()}
        _write_json(results / f"{name}.json", table)
        print(table["markdown"], flush=True)
        print(f"({name}: {table['seconds']:.0f} s; {results / (name + '.json')})", flush=True)
        out[name] = table
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


# The allowed values of every numeric flag (common.RANGES): in --help, checked before anything
# loads (--ranks and --deltaw-ranks: each rank). What depends on the model: check_for_model.
_FLAG_RANGES = {"block_size": ">= 1", "steps": ">= 1", "batch_size": ">= 1", "warmup": ">= 0",
                "lr": "> 0", "lr_full": "> 0", "alpha": "> 0", "lora_dropout": "[0, 1)",
                "eval_batches": ">= 0", "ranks": ">= 1", "small_rank": ">= 1",
                "large_rank": ">= 1", "deltaw_ranks": ">= 1", "layer": ">= 0"}


def _ranged(text, name, more="") -> str:
    """A flag's help with its allowed values, as main checks them."""
    return help_with_range(text, _FLAG_RANGES, name, more)


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m experiments.studies",
        description="Rerun §7 of the LoRA paper on a base model and a task: rank sweep "
                    "(Table 6), weight types at a fixed budget (Table 5), subspace similarity "
                    "(Figures 3-4), Delta W against W (Table 7). Each study prints a table and "
                    "writes JSON (and PNGs) to --results; fine-tuning runs are cached in "
                    "--out/runs and shared between studies.",
        epilog="The base these defaults are for, and the tables: docs/studies.md.",
        formatter_class=HelpFormatter)
    p.add_argument("studies", nargs="+", choices=STUDIES + ("all",), help="which studies to run")
    g = p.add_argument_group("base model and task")
    g.add_argument("--init", required=True,
                   help="base model: a directory from train.py, a weights file, or gpt2, ...")
    g.add_argument("--data", default="e2e", help="downstream task (as train.py's --data)")
    g.add_argument("--block-size", type=int, default=128,
                   help=_ranged("longest training sequence", "block_size"))
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    g = p.add_argument_group("budget of every run (the same for all, as in the paper's tables)")
    g.add_argument("--steps", type=int, default=60,
                   help=_ranged("optimizer steps per run", "steps"))
    g.add_argument("--batch-size", type=int, default=8,
                   help=_ranged("examples per step", "batch_size"))
    g.add_argument("--warmup", type=int, default=10,
                   help=_ranged("warmup steps, then linear decay", "warmup"))
    g.add_argument("--lr", type=float, default=2e-3,
                   help=_ranged("learning rate of LoRA runs", "lr"))
    g.add_argument("--lr-full", type=float, default=5e-4,
                   help=_ranged("learning rate of full fine-tuning", "lr_full"))
    g.add_argument("--alpha", type=float, default=32,
                   help=_ranged("LoRA alpha (the scale is alpha/r)", "alpha"))
    g.add_argument("--lora-dropout", type=float, default=0.1,
                   help=_ranged("dropout on the LoRA path (Table 11)", "lora_dropout"))
    g.add_argument("--eval-batches", type=int, default=12,
                   help=_ranged("validation batches (of --batch-size) per run; 0: the whole split",
                                "eval_batches"))
    g.add_argument("--quick", action="store_true",
                   help="a tiny budget for a smoke test: " +
                        ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    g = p.add_argument_group("studies")
    g.add_argument("--ranks", type=_int_list, default="1,2,4,8,64",
                   help=_ranged("ranks of the rank sweep (Table 6), each", "ranks"))
    g.add_argument("--budget-rank", type=int, default=8,
                   help="types: rank of a single matrix type; the budget is 2 x L x d x this "
                        "(a multiple of 4, at most n_embd)")
    g.add_argument("--small-rank", type=int, default=8,
                   help=_ranged("subspace: the r=8 of A_r=8", "small_rank"))
    g.add_argument("--large-rank", type=int, default=64,
                   help=_ranged("subspace: the r=64 of A_r=64", "large_rank"))
    g.add_argument("--deltaw-ranks", type=_int_list, default="4,64",
                   help=_ranged("deltaw: adapter ranks to analyse (Table 7 has 4 and 64), each",
                                "deltaw_ranks"))
    g.add_argument("--layer", type=int, default=None,
                   help=_ranged("block (0-based) analysed by subspace and deltaw", "layer",
                                ", below n_layer; default: n_layer/2 - 1, as the paper's 48th "
                                "of 96"))
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out/studies", help="runs cache (adapters, run records)")
    g.add_argument("--results", default=None, help="tables and figures (default: --out)")
    g.add_argument("--fresh", action="store_true", help="retrain runs even if cached")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    check_flags(args, _FLAG_RANGES)  # before anything loads; --ranks: each rank
    if not args.ranks:
        raise ValueError("--ranks: give at least one rank")
    if args.eval_batches == 0:
        args.eval_batches = None
    args.device = get_device(args.device)
    run_studies(args)
    return 0


if __name__ == "__main__":
    run_main(main)
