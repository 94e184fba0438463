"""Looped transformers learn in-context learning algorithms.

A small, exact reimplementation of Yang, Lee, Nowak and Papailiopoulos, "Looped Transformers
are Better at Learning Learning Algorithms" (ICLR 2024, arXiv 2311.12424), on the in-context
function classes of Garg et al. (2022). One transformer block, applied b times with the prompt
injected at every iteration, learns to regress in context as well as a 12-layer GPT-2.

    python looped.py --task linreg --loops 20            # laptop scale, CPU, ~10 minutes
    python looped.py --task linreg --preset paper        # the paper's setup (GPU)
    python looped.py --eval runs/linreg                  # re-evaluate a saved run

Paper symbol -> code name:
    d      n_dims (current d under the curriculum: active_dims)
    n, k   n_points (prompt pairs); k = in-context examples before a query
    D      n_embd
    b      n_loops (--loops), loop iterations trained
    T      loop_window (--window), iterations whose read-outs enter the loss
    P      the embedded prompt, read_in(prompt)
    Y_t    the loop state after t iterations, Y_0 = 0
Shapes: B batch, n points, d input dim, D width, L = 2n tokens, t loop iterations.
"""
import argparse
import itertools
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import baselines

# ---------------------------------------------------------------------------- config


@dataclass
class Config:
    task: str = "linreg"  # function class: one of TASKS below
    preset: str = "laptop"  # "laptop" (2-core CPU, minutes) or "paper" (the paper's values, a GPU)
    # problem
    n_dims: int = 5  # d, input dimension at the end of the curriculum (paper: 20)
    n_points: int = 11  # n, (x, y) pairs per prompt (paper: 41 regression, 101 tree / ReLU)
    n_positions: int = 0  # longest prompt the position table holds, in pairs; 0: n_points
    # model
    n_embd: int = 64  # D, width (paper: 256)
    n_head: int = 4  # attention heads (paper: 8)
    n_layer: int = 1  # blocks in the backbone M (looped: 1; the standard GPT-2: 12 with loops 1)
    n_loops: int = 20  # b, loop iterations at the end of the loop curriculum (--loops)
    loop_window: int = 10  # T, last iterations in the loss; the first b - T run without grad (--window)
    # curriculum: every `curriculum_every` steps d grows by 1 and n by points_inc; 0 = off
    dims_start: int = 2  # d at step 0
    points_start: int = 5  # n at step 0
    points_inc: int = 2  # n's increment (paper: 2 regression, 5 tree / ReLU)
    curriculum_every: int = 500  # steps between increments of d and n (paper: 5000)
    loops_every: int = 250  # b starts at T and grows by 2 every this many steps (paper: 500); 0 = off
    # optimisation
    steps: int = 6000  # training steps (paper: 500,000)
    batch_size: int = 64  # prompts per step, freshly drawn every step (paper: 64)
    lr: float = 6e-4  # Adam learning rate, constant (paper: 1e-4)
    seed: int = 42  # model init and training prompts (evaluation prompts have their own seed)
    # system
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, mps or cpu
    amp: bool = False  # bf16 autocast for the forward pass
    compile: bool = False  # torch.compile the model
    out: str = ""  # run folder for checkpoint, log and plots; "": runs/<task>
    log_every: int = 100  # steps between log lines (and NaN checks)
    ckpt_every: int = 1000  # steps between checkpoints (always one at the end)
    # evaluation
    eval_prompts: int = 1280  # fixed test prompts (paper: 1280)
    eval_loops: int = 0  # loop iterations run at test time; 0: 5 b (paper: 500, trees 200)
    eval_seed: int = 1234  # seed of the test prompts, apart from training's


# The paper's values (PAPER.md): (b, T, n, n at step 0, n's increment) per task.
PAPER_TASKS = {
    "linreg": (20, 15, 41, 11, 2), "noisy_linreg": (20, 15, 41, 11, 2),
    "sparse_linreg": (20, 10, 41, 11, 2), "decision_tree": (70, 15, 101, 26, 5),
    "relu_2nn": (12, 5, 101, 26, 5),
}
PAPER = dict(n_dims=20, n_embd=256, n_head=8, n_layer=1, dims_start=5, curriculum_every=5000,
             loops_every=500, steps=500_000, batch_size=64, lr=1e-4)
# Laptop defaults per task where they differ from the dataclass (see README, "Differences").
LAPTOP_TASKS = {
    "decision_tree": dict(n_points=15, points_start=7),
    "relu_2nn": dict(n_points=21, points_start=9, points_inc=4, n_loops=12, loop_window=5,
                     eval_prompts=512),  # the per-prompt network baseline trains 512 * 20 networks
}


class UserError(Exception):
    """A mistake in the user's input: reported as one line and exit code 2."""


def make_config(task="linreg", preset="laptop", **overrides):
    """Preset values for the task, then explicit overrides, then validation."""
    if preset not in ("laptop", "paper"):
        raise UserError(f"unknown preset {preset!r}: use laptop or paper")
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    values = dict(task=task, preset=preset)
    if preset == "paper":
        b, T, n, n0, inc = PAPER_TASKS[task]
        values.update(PAPER, n_loops=b, loop_window=T, n_points=n, points_start=n0, points_inc=inc,
                      n_positions=101, eval_loops=200 if task == "decision_tree" else 500)
    else:
        values.update(LAPTOP_TASKS.get(task, {}))
    values.update(overrides)
    if "loop_window" not in overrides and "n_loops" in overrides:  # T defaults to min(T, b)
        values["loop_window"] = min(values.get("loop_window", Config.loop_window), values["n_loops"])
    unknown = set(values) - {f.name for f in fields(Config)}
    if unknown:
        raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg):
    positive = ["n_dims", "n_points", "n_embd", "n_head", "n_layer", "n_loops", "loop_window",
                "dims_start", "points_start", "steps", "batch_size", "log_every", "ckpt_every",
                "eval_prompts"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.loop_window > cfg.n_loops:
        raise UserError(f"--window {cfg.loop_window} exceeds --loops {cfg.n_loops}: T <= b")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    if cfg.n_points > positions(cfg):
        raise UserError(f"--n_points {cfg.n_points} is beyond the position table "
                        f"(n_positions {positions(cfg)})")
    for name in ["n_positions", "points_inc", "curriculum_every", "loops_every", "eval_loops"]:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if 0 < cfg.eval_loops < cfg.n_loops:  # the evaluation reports the error at b loops
        raise UserError(f"--eval_loops {cfg.eval_loops} is below --loops {cfg.n_loops}: evaluate at least b loops")
    if cfg.device not in ("auto", "cuda", "mps", "cpu") and not cfg.device.startswith("cuda:"):
        raise UserError(f"unknown device {cfg.device!r}: use auto, cuda, mps or cpu")


def positions(cfg):
    """Rows of the position table, in (x, y) pairs (derived: n_positions or n_points)."""
    return cfg.n_positions or cfg.n_points


def eval_loops(cfg):
    return cfg.eval_loops or 5 * cfg.n_loops


# ---------------------------------------------------------------------------- tasks
# Each sampler draws one function per prompt and n points x ~ N(0, I): coordinates from
# active_dims on are zero (the dimension curriculum). Signature (B, n, d, active_dims, generator)
# -> xs (B, n, d), ys (B, n); everything is drawn on the generator's device.


def gaussian_points(B, n, d, active, gen):
    xs = torch.randn(B, n, d, generator=gen, device=gen.device)
    xs[..., active:] = 0
    return xs  # (B, n, d)


def sample_linear_regression(B, n, d, active, gen, noise_std=0.0):
    """y = w . x with w ~ N(0, I_d), restricted to the active dimensions."""
    xs = gaussian_points(B, n, d, active, gen)
    w = torch.randn(B, d, generator=gen, device=gen.device)
    w[:, active:] = 0
    ys = (xs @ w[:, :, None])[..., 0]  # (B, n)
    if noise_std:
        ys = ys + noise_std * torch.randn(B, n, generator=gen, device=gen.device)
    return xs, ys


def sample_noisy_linear_regression(B, n, d, active, gen):
    """Linear regression with N(0, 0.1^2) noise on y."""
    return sample_linear_regression(B, n, d, active, gen, noise_std=0.1)


def sample_sparse_linear_regression(B, n, d, active, gen, s=3):
    """y = w . x where w keeps s random active coordinates of N(0, I) ([G]: among active dims)."""
    xs = gaussian_points(B, n, d, active, gen)
    w = torch.randn(B, d, generator=gen, device=gen.device)
    keep = torch.rand(B, active, generator=gen, device=gen.device).argsort(1)[:, :s]  # (B, s)
    w = w * torch.zeros(B, d, device=w.device).scatter_(1, keep, 1.0)
    return xs, (xs @ w[:, :, None])[..., 0]


def sample_decision_tree(B, n, d, active, gen, depth=4):
    """A full binary tree: node k tests x[coord_k] > 0 (right) or not; leaves ~ N(0, 1).

    Nodes are numbered heap-style (children of k are 2k+1, 2k+2); every example descends all
    levels at once, so there is no loop over prompts or points."""
    xs = gaussian_points(B, n, d, active, gen)
    n_inner = 2 ** depth - 1
    coords = torch.randint(0, active, (B, n_inner), generator=gen, device=gen.device)
    leaves = torch.randn(B, n_inner + 1, generator=gen, device=gen.device)
    node = torch.zeros(B, n, dtype=torch.long, device=xs.device)  # (B, n)
    for _ in range(depth):
        coord = coords.gather(1, node)  # (B, n): the coordinate each example's node tests
        right = xs.gather(2, coord[..., None])[..., 0] > 0
        node = 2 * node + 1 + right.long()
    return xs, leaves.gather(1, node - n_inner)


def sample_relu_2nn(B, n, d, active, gen, hidden=100):
    """y = sqrt(2 / hidden) relu(x W1) W2, with W1 (d, 100) and W2 (100,) entries ~ N(0, 1)."""
    xs = gaussian_points(B, n, d, active, gen)
    W1 = torch.randn(B, d, hidden, generator=gen, device=gen.device)
    W2 = torch.randn(B, hidden, 1, generator=gen, device=gen.device)
    return xs, math.sqrt(2 / hidden) * (F.relu(xs @ W1) @ W2)[..., 0]


TASKS = {
    "linreg": sample_linear_regression,
    "noisy_linreg": sample_noisy_linear_regression,
    "sparse_linreg": sample_sparse_linear_regression,
    "decision_tree": sample_decision_tree,
    "relu_2nn": sample_relu_2nn,
}


def error_normaliser(task, d):
    """E[y^2] of the task, so that predicting 0 scores about 1: d, s = 3, or 1 for trees."""
    return {"sparse_linreg": 3.0, "decision_tree": 1.0}.get(task, float(d))


# Garg et al.'s out-of-distribution suite for linear regression (evaluation only, --ood NAME).
# The first five change how x or y are drawn. The last three change the query: the prompt
# predicting y_i is then x_1 y_1 ... x_{i-1} y_{i-1} q_i, so each test prompt becomes n prompts,
# row i of which counts at position i only (see on_diagonal).
OOD = ["skewed", "half_subspace", "noisy_y", "scale_x=C", "scale_y=C",
       "random_quadrants", "orthogonal", "overlapping"]


def parse_ood(name):
    """--ood NAME -> (kind, scale C, 1 when there is none); UserError for a name not in OOD."""
    kind, _, value = name.partition("=")
    if kind not in [o.split("=")[0] for o in OOD] or (value and not kind.startswith("scale")):
        raise UserError(f"unknown --ood {name!r}: use one of {', '.join(OOD)}")
    if kind in ("scale_x", "scale_y") and not (value.replace(".", "", 1).isdigit() and float(value) > 0):
        raise UserError(f"--ood {name}: give a positive scale, as in {kind}=2")
    return kind, float(value) if value else 1.0


def sample_ood(name, B, n, d, gen):
    """Linear-regression test prompts under a shift: (xs, ys, m, normaliser). m = 0 for a plain
    batch (B, n); otherwise xs, ys are (B * m, n) query prompts. The normaliser is E[y^2] under
    the shift, so that predicting 0 still scores about 1."""
    kind, c = parse_ood(name)
    dev = gen.device
    z = torch.randn(B, n, d, generator=gen, device=dev)
    w = torch.randn(B, d, 1, generator=gen, device=dev)
    xs, queries = z, None
    if kind in ("skewed", "half_subspace"):  # covariance U diag(eig) U^T, U a random rotation
        i = torch.arange(1, d + 1, device=dev)  # skewed: [G] maps x by U diag(1/i) U^T, so eig ~ 1/i^2
        eig = 1 / i ** 2 if kind == "skewed" else (i <= d // 2).float()
        eig = eig * d / eig.sum()  # trace d, as N(0, I_d) has
        U = torch.linalg.qr(torch.randn(B, d, d, generator=gen, device=dev)).Q  # (B, d, d)
        xs = (z * eig.sqrt()) @ U.transpose(1, 2)
    elif kind == "scale_x":
        xs = c * z
    elif kind == "random_quadrants":  # in-context x in one random orthant; queries anywhere
        xs = z.abs() * torch.randn(B, 1, d, generator=gen, device=dev).sign()
        queries = z
    elif kind == "orthogonal":  # q_i orthogonal to x_1 .. x_{i-1}, |q_i| = |x_i|; exists for i <= d
        queries = z.clone()
        for i in range(1, min(n, d)):
            Q = torch.linalg.qr(z[:, :i].transpose(1, 2)).Q  # (B, d, i): basis of the prefix
            q = z[:, i] - (Q @ (Q.transpose(1, 2) @ z[:, i, :, None]))[..., 0]
            queries[:, i] = q * z[:, i].norm(dim=1, keepdim=True) / q.norm(dim=1, keepdim=True)
    elif kind == "overlapping":  # q_i is one of x_1 .. x_{i-1}, picked at random
        pick = (torch.rand(B, n, generator=gen, device=dev) * torch.arange(n, device=dev)).long()
        queries = z.gather(1, pick[..., None].expand(B, n, d))
    f = lambda x: (c if kind == "scale_y" else 1.0) * (x @ w)[..., 0]  # the prompt's linear function
    noise = 1.0 if kind == "noisy_y" else 0.0
    norm = d * c ** 2 + noise ** 2  # E[y^2]
    if queries is None:
        ys = f(xs) + noise * torch.randn(B, n, generator=gen, device=dev)
        return xs, ys, 0, norm
    m = min(n, d) if kind == "orthogonal" else n  # m query prompts per drawn prompt
    i = torch.arange(m, device=dev)[:, None]
    use_query = torch.arange(n, device=dev) >= i  # (m, n): positions i.. hold queries in prompt i
    xs = torch.where(use_query[None, :, :, None], queries[:, None], xs[:, None])  # (B, m, n, d)
    ys = f(xs.reshape(B, m * n, d)).reshape(B * m, n)
    return xs.reshape(B * m, n, d), ys, m, norm


def on_diagonal(sq, m):
    """Errors of query prompts: row b * m + i counts at position i only.
    (B * m, ..., n) -> (B, ..., n), NaN at positions m.. where no query exists; m = 0: plain
    prompts, returned as they are."""
    if not m:
        return sq
    n = sq.shape[-1]
    sq = sq.reshape(-1, m, *sq.shape[1:])[..., :m]  # (B, m, ..., m)
    return F.pad(sq.diagonal(dim1=1, dim2=-1), (0, n - m), value=float("nan"))


# ---------------------------------------------------------------------------- curriculum


def curriculum(cfg, step):
    """(d, n, b) in force at a training step: start small, grow by steps, cap at the target."""
    grown = step // cfg.curriculum_every if cfg.curriculum_every else 10**9
    d = min(cfg.dims_start + grown, cfg.n_dims)
    n = min(cfg.points_start + grown * cfg.points_inc, cfg.n_points)
    b = cfg.n_loops
    if cfg.loops_every:  # loops start at T and grow by 2 ([LT])
        b = min(cfg.loop_window + 2 * (step // cfg.loops_every), cfg.n_loops)
    return d, n, b


# ---------------------------------------------------------------------------- model
# GPT-2 as in nanoGPT: pre-LayerNorm, causal attention, tanh-GELU MLP, biases, no dropout.


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.view(B, L, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Under bf16 autocast on a CPU, attention runs in fp32: the backward of bf16 attention
        # is 7x slower there (torch 2.13, measured by --bench). GPUs keep bf16 attention.
        fp32 = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False) if fp32 else nullcontext():
            q, k, v = (t.float() if fp32 else t for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, L, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, D))


def gelu(x):
    """GPT-2's activation, 0.5 x (1 + tanh u) with u = sqrt(2 / pi) (x + 0.044715 x^3). Under
    torch.compile it is written as x sigmoid(2u), the same function: inductor's tanh is slow on
    a CPU (compiled laptop step 1.22x faster than eager in fp32 with this form, 1.07x without).
    Eager runs and the ONNX export keep PyTorch's own kernel."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return x * torch.sigmoid(math.sqrt(8 / math.pi) * (x + 0.044715 * x ** 3))
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LoopedTransformer(nn.Module):
    """Y_{t+1} = M(Y_t + P), Y_0 = 0, with a read-out after every iteration.

    M is n_layer blocks plus ln_f; with n_layer 12 and one loop this is exactly the
    paper's standard transformer, so both models share one code path."""

    def __init__(self, cfg):
        super().__init__()
        self.read_in = nn.Linear(cfg.n_dims, cfg.n_embd)  # one embedding for x and y tokens
        self.wpe = nn.Embedding(2 * positions(cfg), cfg.n_embd)  # learned absolute positions
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.read_out = nn.Linear(cfg.n_embd, 1)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def backbone(self, h):
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def embed(self, xs, ys):
        """The prompt as tokens x1 y1 x2 y2 ..., embedded with their positions: (B, L, D)."""
        B, n, d = xs.shape
        y_tokens = F.pad(ys[..., None], (0, d - 1))  # (B, n, d): y becomes (y, 0, ..., 0)
        tokens = torch.stack([xs, y_tokens], dim=2).reshape(B, 2 * n, d)  # (B, L, d): x1 y1 x2 y2 ...
        # [LT] re-adds the position embeddings inside every backbone call, so they are part of
        # what is injected: in code Y_{t+1} = ln_f(Block(Y_t + P + PE)).
        return self.read_in(tokens) + self.wpe.weight[: 2 * n]  # (B, L, D)

    def read(self, Y):
        """The read-out at the x_i tokens: (B, L, D) -> (B, n), entry i predicting y_i."""
        return self.read_out(Y[:, ::2])[..., 0]

    def forward(self, xs, ys, n_loops, n_no_grad=0):
        """xs (B, n, d), ys (B, n) -> predictions (B, n_loops - n_no_grad, n), one row per
        iteration after the first n_no_grad; entry i predicts y_i from the pairs before it."""
        # Input injection: P is added back every iteration, so the loop cannot forget its prompt.
        inject = self.embed(xs, ys)  # (B, L, D)
        Y = torch.zeros_like(inject)  # Y_0 = 0
        with torch.no_grad():  # the first b - T iterations: no gradient, no stored activations
            for _ in range(n_no_grad):
                Y = self.backbone(Y + inject)
        preds = []
        for _ in range(n_no_grad, n_loops):
            Y = self.backbone(Y + inject)
            preds.append(self.read(Y))  # (B, n)
        return torch.stack(preds, dim=1)  # (B, t, n)


def count_parameters(model):
    """(paper convention: blocks + ln_f, as nanoGPT counts; total: everything)."""
    backbone = sum(p.numel() for p in [*model.blocks.parameters(), *model.ln_f.parameters()])
    return backbone, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- loss and evaluation


def windowed_loss(preds, ys):
    """Mean over the window's iterations, the batch and all positions of (y_hat - y)^2."""
    return (preds.float() - ys[:, None]).pow(2).mean()


def eval_prompts(cfg, device, ood=None):
    """Fixed test prompts at the final d and n, from their own generator: (xs, ys, m, normaliser),
    with m > 0 for the query prompts of an out-of-distribution test (see sample_ood)."""
    gen = torch.Generator(device).manual_seed(cfg.eval_seed)
    if ood:
        return sample_ood(ood, cfg.eval_prompts, cfg.n_points, cfg.n_dims, gen)
    xs, ys = TASKS[cfg.task](cfg.eval_prompts, cfg.n_points, cfg.n_dims, cfg.n_dims, gen)
    return xs, ys, 0, error_normaliser(cfg.task, cfg.n_dims)


@torch.no_grad()
def evaluate(model, cfg, device, ctx=nullcontext(), ood=None, classical=None):
    """Normalised squared error per position after every loop iteration, and for each of the
    task's baselines on the same prompts, with 90% bootstrap bands over the prompts.
    classical: an evaluation on the same prompts, whose baselines are reused as they are, and
    its solver iterates when there are enough of them (the first k do not depend on how many run).

    Returns {"loops": (t, n) model errors after iterations 1..eval_loops, name: (n,) for each
    baseline, "band NAME": (2, n) for the model ("looped", at b loops) and each baseline, and
    "iterates NAME": (steps,) gradient descent and Newton at the last position (linear tasks)}."""
    model.eval()
    xs, ys, m, norm = eval_prompts(cfg, device, ood)
    chunk = max(256 // (m or 1), 1) * (m or 1)  # chunks bound the activations at paper scale
    total, at_b = 0, []
    for s in range(0, len(xs), chunk):
        with ctx:
            preds = model(xs[s:s + chunk], ys[s:s + chunk], eval_loops(cfg)).float()  # (B, t, n)
        sq = on_diagonal((preds - ys[s:s + chunk, None]).pow(2) / norm, m)  # (B, t, n)
        total, at_b = total + sq.sum(0), at_b + [sq[:, cfg.n_loops - 1]]
    model.train()
    errors = {"loops": (total / cfg.eval_prompts).cpu(), "band looped": bootstrap_band(torch.cat(at_b)).cpu()}
    for name in baselines.TASK_BASELINES[cfg.task]:
        if classical:
            errors[name], errors[f"band {name}"] = classical[name], classical[f"band {name}"]
            continue
        sq = on_diagonal((baselines.BASELINES[name](xs, ys) - ys).pow(2) / norm, m)  # (P, n)
        errors[name], errors[f"band {name}"] = sq.mean(0).cpu(), bootstrap_band(sq).cpu()
    if cfg.task in ("linreg", "noisy_linreg", "sparse_linreg") and not ood:  # solvers beside the loop
        for name, iterates in baselines.ITERATES.items():
            steps = eval_loops(cfg) if name == "gradient descent" else min(eval_loops(cfg), 40)
            known = (classical or {}).get(f"iterates {name}")
            if known is not None and len(known) >= steps:
                errors[f"iterates {name}"] = known[:steps]
                continue
            preds = iterates(xs, ys, steps)[:, :, -1]  # (P, steps): the last position only
            errors[f"iterates {name}"] = ((preds - ys[:, None, -1]).pow(2).mean(0) / norm).cpu()
    return errors


def bootstrap_band(sq, resamples=1000, seed=0):
    """90% bootstrap interval of the mean over prompts, per position: sq (P, n) -> (2, n).
    A resample is a vector of counts per prompt, so all 1000 means are one matmul."""
    P = len(sq)
    gen = torch.Generator(sq.device).manual_seed(seed)
    picks = torch.randint(0, P, (resamples, P), generator=gen, device=sq.device)
    counts = torch.zeros(resamples, P, device=sq.device).scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float))
    means = counts @ sq.float() / P  # (resamples, n)
    return torch.quantile(means, torch.tensor([0.05, 0.95], device=sq.device), dim=0)


def labels(runs):
    """A legend name per run [(cfg, errors)]: the model, and the run folder where names repeat."""
    names = [f"transformer, {c.n_layer} layers" if c.n_loops == 1 else
             f"looped, b = {c.n_loops}, T = {c.loop_window}" + (f", {c.n_layer} layers" if c.n_layer > 1 else "")
             for c, _ in runs]
    return [f"{name} ({os.path.basename(os.path.normpath(run_dir(c)))})" if names.count(name) > 1 else name
            for name, (c, _) in zip(names, runs)]


def report(runs, ood=None):
    """A short table: error at chosen numbers of in-context examples k, for runs [(cfg, errors)]
    evaluated on the same prompts, and the first run's baselines."""
    cfg, errors = runs[0]
    ks = sorted({k for k in (1, cfg.n_dims // 2, cfg.n_dims, 2 * cfg.n_dims, cfg.n_points - 1)
                 if 0 < k < cfg.n_points})
    rows = {}
    for name, (c, e) in zip(labels(runs), runs):
        rows[name] = e["loops"][c.n_loops - 1]
        if eval_loops(c) != c.n_loops:
            rows[f"{name}: {eval_loops(c)} loops"] = e["loops"][-1]
    rows.update({name: errors[name] for name in baselines.TASK_BASELINES[cfg.task]})
    width = max(26, *map(len, rows)) + 2
    lines = [f"normalised squared error, {cfg.task}{f' (ood: {ood})' if ood else ''}, d = {cfg.n_dims}, "
             f"{cfg.eval_prompts} prompts", f"{'k (in-context examples)':<{width}}" + "".join(f"{k:>9}" for k in ks)]
    for name, err in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{err[k].item():>9.4f}" for k in ks))
    return "\n".join(lines)


def plot(runs, out, ood=None):
    """Two figures in folder out, for runs [(cfg, errors)] evaluated on the same prompts: error
    against in-context examples (every run and the first run's baselines) and, in distribution,
    error at the last position against loop iterations (every looped run, GD and Newton)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg, errors = runs[0]
    suffix = f"_ood_{ood}" if ood else ""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    k = range(cfg.n_points)
    names = labels(runs)
    for i, (c, e) in enumerate(runs):
        line, = ax.plot(k, e["loops"][c.n_loops - 1], lw=2.5, color=f"C{i}", label=names[i])
        ax.fill_between(k, *e["band looped"], color=line.get_color(), alpha=0.2, lw=0)
        if eval_loops(c) != c.n_loops:
            ax.plot(k, e["loops"][-1], lw=2, ls="--", color=line.get_color(), label=f"{names[i]}: {eval_loops(c)} loops")
    for i, name in enumerate(baselines.TASK_BASELINES[cfg.task], start=len(runs)):
        line, = ax.plot(k, errors[name], lw=1.5, color=f"C{i}", label=name)
        ax.fill_between(k, *errors[f"band {name}"], color=line.get_color(), alpha=0.2, lw=0)
    ax.set(xlabel="in-context examples k", ylabel="normalised squared error", ylim=(-0.05, 1.5),
           title=f"{cfg.task}{f', ood: {ood}' if ood else ''}, d = {cfg.n_dims} (90% bootstrap bands)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"error_vs_examples{suffix}.png"), dpi=120)
    looped = [(i, c, e) for i, (c, e) in enumerate(runs) if eval_loops(c) > 1]
    if ood or not looped:
        plt.close("all")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    last = cfg.n_points - 1
    floor = 1.0
    for i, c, e in looped:
        curve = e["loops"][:, last]
        ax.semilogy(range(1, len(curve) + 1), curve, lw=2.5, color=f"C{i}", label=names[i])
        ax.axvline(c.n_loops, color=f"C{i}", ls="--", lw=1)
        floor = min(floor, curve.min().item())
    for j, name in enumerate(baselines.ITERATES):  # iterative solvers: one iteration against one loop
        if f"iterates {name}" in errors:
            err = errors[f"iterates {name}"]
            ax.semilogy(range(1, len(err) + 1), err.clamp(min=1e-12), lw=1.5, color=f"C{len(runs) + j}",
                        label=f"{name} iterations")
            floor = min(floor, err.min().item())
    if "least squares" in errors:
        lsq = errors["least squares"][last].item()
        ax.axhline(lsq, color="k", ls=":", label=f"least squares ({lsq:.1e})")
        floor = min(floor, lsq)
    ax.set_ylim(bottom=max(floor / 3, 1e-8))  # exact solvers sit near 1e-14
    ax.set(xlabel="loop iteration (or solver iteration); dashed: trained b",
           ylabel=f"normalised squared error at k = {last}", title=f"{cfg.task}: error against iterations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "error_vs_loops.png"), dpi=120)
    plt.close("all")


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, model, opt, cfg, step, data_states):
    """One dict, written to a temporary file and renamed, so a crash never leaves half a file.
    data_states: the training-prompt generator state of every process, so a resumed run draws
    exactly the prompts the uninterrupted one would have."""
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg),
            "step": step, "rng": {"data": data_states, "torch": torch.get_rng_state()}}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(run_dir):
    """The run's checkpoint and its Config; UserError if missing, corrupt or incompatible."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = make_config(**ckpt["config"])
    except UserError as e:
        raise UserError(f"{path} was made with an incompatible config: {e}") from None
    except Exception as e:
        raise UserError(f"{path} is corrupt or not a looped checkpoint ({type(e).__name__})") from None
    return ckpt, cfg


def restore_model(ckpt, cfg, device):
    model = LoopedTransformer(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"checkpoint weights do not match its config: {str(e).splitlines()[0]}") from None
    return model.to(device)


# ---------------------------------------------------------------------------- training


def train_step(forward, opt, ctx, xs, ys, n_loops, n_no_grad):
    """One Adam step on the windowed loss; returns the loss, left on the device (no sync)."""
    with ctx:
        preds = forward(xs, ys, n_loops, n_no_grad)  # (B, min(b, T), n)
    loss = windowed_loss(preds, ys)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def setup_device(cfg):
    """Device and precision, decided once: (device, autocast context or a null one)."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for, but MPS is not available")
    device = torch.device(name)
    if device.type == "cuda":  # TF32 matmuls: ~fp32 accuracy at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()
    return device, ctx


def setup_distributed(cfg, device):
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA,
    gloo on CPU. Plain `python looped.py` is one process and touches none of this."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if cfg.batch_size % world:
        raise UserError(f"--batch_size {cfg.batch_size} does not split over {world} processes")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def run_dir(cfg):
    return cfg.out or os.path.join("runs", cfg.task)


def train(cfg, resume=None, quiet=False):
    """Train a looped transformer, then evaluate it; returns the evaluation errors (None on the
    processes of a torchrun job other than rank 0, which alone logs, saves and evaluates)."""
    device, ctx = setup_device(cfg)
    rank, world = setup_distributed(cfg, device)
    say = (lambda *a: None) if quiet or rank else print
    out = run_dir(cfg)
    os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, "ckpt.pt")

    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = LoopedTransformer(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    gen = torch.Generator(device).manual_seed(cfg.seed + rank)  # each process its own prompts
    step = 0
    if resume is not None:  # continue exactly where the checkpoint left off
        if len(resume["rng"]["data"]) != world:
            raise UserError(f"the checkpoint was written by {len(resume['rng']['data'])} process(es), "
                            f"this run has {world}: resume with the same number")
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["rng"]["data"][rank])
        torch.set_rng_state(resume["rng"]["torch"])
        step = resume["step"]
    # DDP averages the gradients of the processes' half-batches: the step of the whole batch
    forward = DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(forward) if cfg.compile else forward
    backbone, total = count_parameters(model)
    say(f"{cfg.task}: {cfg.n_layer} layer(s) x {cfg.n_loops} loops, D {cfg.n_embd}, d {cfg.n_dims}, "
        f"n {cfg.n_points} | {backbone / 1e6:.3f}M parameters (paper convention), {total / 1e6:.3f}M total "
        f"| {device} | run folder {out}")
    log = open(os.path.join(out, "log.jsonl"), "a" if resume else "w") if rank == 0 else None
    last, running = (time.perf_counter(), step), torch.zeros((), device=device)
    while step < cfg.steps:
        d, n, b = curriculum(cfg, step)
        xs, ys = TASKS[cfg.task](cfg.batch_size // world, n, cfg.n_dims, d, gen)
        loss = train_step(forward, opt, ctx, xs, ys, b, max(b - cfg.loop_window, 0))
        running += loss / error_normaliser(cfg.task, d)  # on the device: no sync
        step += 1
        is_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps
        if step % cfg.log_every == 0 or is_ckpt:  # the only host-device syncs of the loop
            # loss: normalised training loss, averaged over the steps since the last line
            if world > 1:  # ... and over the processes, so that all of them agree on a NaN
                dist.all_reduce(running)
                running /= world
            loss_value = running.item() / (step - last[1])
            if not math.isfinite(loss_value) or not all(p.isfinite().all() for p in model.parameters()):
                raise UserError(f"training diverged at step {step} (loss {loss_value}); lower --lr. "
                                f"The last good checkpoint is kept in {ckpt_path}")
            now = time.perf_counter()
            ms = 1000 * (now - last[0]) / (step - last[1])
            last, running = (now, step), torch.zeros((), device=device)
            say(f"step {step:6d} | loss {loss_value:.4f} | d {d} n {n} b {b} | {ms:.1f} ms/step")
            if log:
                log.write(json.dumps(dict(step=step, loss=loss_value, d=d, n=n, b=b, ms_per_step=ms)) + "\n")
                log.flush()
        if is_ckpt:
            states = [gen.get_state()]
            if world > 1:  # every process's prompt generator, for an exact resume
                states = [None] * world
                dist.all_gather_object(states, gen.get_state())
            if rank == 0:
                save_checkpoint(ckpt_path, model, opt, cfg, step, states)
    if world > 1:  # drop DDP (its reducer holds the process group), leave together, tear down:
        del forward  # a group still referenced at exit can abort gloo's threads (SIGABRT)
        dist.barrier()
        dist.destroy_process_group()
    if rank:
        return None
    log.close()
    return finish(model, cfg, device, ctx, say)


def finish(model, cfg, device, ctx, say=print, ood=None, classical=None):
    """Evaluate, write eval.json (eval_ood_NAME.json) and the plots, print the table."""
    out = run_dir(cfg)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    errors = evaluate(model, cfg, device, ctx, ood, classical)
    with open(os.path.join(out, f"eval{f'_ood_{ood}' if ood else ''}.json"), "w") as f:
        json.dump({k: v.tolist() for k, v in errors.items()}, f)
    plot([(cfg, errors)], out, ood)
    say(report([(cfg, errors)], ood))
    say(f"evaluated in {time.perf_counter() - t0:.1f} s; plots in {out}")
    return errors


# ---------------------------------------------------------------------------- benchmark


def bench(device_name="auto"):
    """ms per training step, prompts per second, and FLOP/s against this machine's matmul peak,
    for the laptop preset and the paper's linear-regression model (b 20, T 15, D 256), eager and
    compiled, fp32 and bf16 autocast; each at its final curriculum stage (full d, n and b)."""
    from torch.utils.flop_counter import FlopCounterMode
    device, _ = setup_device(make_config(device=device_name))
    peak = {amp: matmul_peak(device, torch.bfloat16 if amp else torch.float32) for amp in (False, True)}
    print(f"{device}, {torch.get_num_threads()} threads; matmul peak (4096^2): fp32 {peak[False] / 1e9:.0f}, "
          f"bf16 {peak[True] / 1e9:.0f} GFLOP/s")
    print(f"{'model':<8}{'mode':<10}{'dtype':<6}{'ms/step':>10}{'prompts/s':>11}{'GFLOP/s':>9}{'of peak':>9}"
          f"{'saved MB':>10}{'peak MB':>9}")
    for preset, compiled, amp in itertools.product(("laptop", "paper"), (False, True), (False, True)):
        cfg = make_config("linreg", preset, device=device_name, amp=amp, eval_prompts=64)
        torch.manual_seed(0)
        model = LoopedTransformer(cfg).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
        args = (*eval_prompts(cfg, device)[:2], cfg.n_loops, cfg.n_loops - cfg.loop_window)  # batch 64
        with FlopCounterMode(display=False) as counter:  # counted on the eager model
            train_step(model, opt, ctx, *args)
        saved = activation_bytes(model, ctx, *args)
        forward = torch.compile(model) if compiled else model
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = seconds_per_call(lambda: train_step(forward, opt, ctx, *args), device,
                                   20 if preset == "laptop" else 3, warmup=2)  # warm-up compiles
        flops = counter.get_total_flops() / seconds
        memory = f"{torch.cuda.max_memory_allocated() / 1e6:>9.0f}" if device.type == "cuda" else f"{'-':>9}"
        print(f"{preset:<8}{'compiled' if compiled else 'eager':<10}{'bf16' if amp else 'fp32':<6}"
              f"{1000 * seconds:>10.1f}{64 / seconds:>11.0f}{flops / 1e9:>9.0f}{flops / peak[amp]:>8.0%}"
              f"{saved / 1e6:>10.1f}{memory}", flush=True)


def seconds_per_call(fn, device, repeats, warmup=1):
    """Mean wall time of fn() after the warm-up calls; CUDA is synchronised around the clock."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def matmul_peak(device, dtype, size=4096):
    """FLOP/s of a square matmul: the ceiling that the training step is measured against."""
    a = torch.randn(size, size, device=device).to(dtype)
    return 2 * size ** 3 / seconds_per_call(lambda: a @ a, device, repeats=5)


def activation_bytes(model, ctx, xs, ys, n_loops, n_no_grad):
    """Bytes the forward pass keeps for the backward pass (the b - T no-grad iterations keep none)."""
    storages = {}  # views of one tensor share its storage: count each storage once

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(xs, ys, n_loops, n_no_grad)
    return sum(storages.values())


# ---------------------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        print(f"looped.py: error: {message}", file=sys.stderr)
        sys.exit(2)


FLAGS = {"n_loops": ["--loops"], "loop_window": ["--window"]}  # the short names the paper uses


def parse_args(argv):
    parser = Parser(description=__doc__.split("\n")[0])
    for f in fields(Config):
        flags = [f"--{f.name}", *FLAGS.get(f.name, [])]
        if f.type in (bool, "bool"):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(*flags, type=kind, default=None, dest=f.name)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    parser.add_argument("--eval", metavar="RUN_DIR", nargs="+",
                        help="re-evaluate saved runs, no training; several: one comparison plot in --out")
    parser.add_argument("--ood", metavar="NAME", help=f"with --eval: test prompts shifted ({', '.join(OOD)})")
    parser.add_argument("--bench", action="store_true", help="training speed table (see bench())")
    args = vars(parser.parse_args(argv))
    special = {name: args.pop(name) for name in ("resume", "eval", "ood", "bench")}
    return {k: v for k, v in args.items() if v is not None}, special


def saved_run(run_dir, given):
    """A saved run's checkpoint and config; a saved run keeps its config, and only its length
    and its evaluation can change."""
    ckpt, saved = load_checkpoint(run_dir)
    free = {"steps", "out", "device", "log_every", "ckpt_every", "eval_prompts", "eval_loops",
            "n_points", "compile", "amp"}
    for name, value in given.items():
        if name not in free and value != getattr(saved, name):
            raise UserError(f"--{name} {value} differs from the saved run's {getattr(saved, name)}; "
                            f"a saved run keeps its config")
    return ckpt, make_config(**{**asdict(saved), "out": run_dir, **given})


def evaluate_runs(run_dirs, given, ood):
    """--eval: evaluate each run on the same test prompts; with several, a comparison in --out."""
    compare_dir = given.pop("out", None) if len(run_dirs) > 1 else None  # one run: --out is its folder
    loaded = [saved_run(d, given) for d in run_dirs]
    first = loaded[0][1]
    for _, cfg in loaded:
        if (cfg.task, cfg.n_dims, cfg.n_points) != (first.task, first.n_dims, first.n_points):
            raise UserError(f"{cfg.out} ({cfg.task}, d {cfg.n_dims}, n {cfg.n_points}) cannot be compared "
                            f"with {first.out} ({first.task}, d {first.n_dims}, n {first.n_points})")
    if ood:  # a bad task or name fails here, before any work
        if first.task not in ("linreg", "noisy_linreg"):
            raise UserError(f"--ood is Garg et al.'s suite for linear regression, not {first.task}")
        parse_ood(ood)
    runs, done = [], {}  # baselines once per set of test prompts: (seed, count, device) -> errors
    steps = lambda errors: len(errors.get("iterates gradient descent", ()))  # noqa: E731
    for ckpt, cfg in loaded:
        device, ctx = setup_device(cfg)
        key = (cfg.eval_seed, cfg.eval_prompts, device.type)
        errors = finish(restore_model(ckpt, cfg, device), cfg, device, ctx, ood=ood, classical=done.get(key))
        if key not in done or steps(errors) > steps(done[key]):  # keep the longest iterates
            done[key] = errors
        runs.append((cfg, errors))
    if len(runs) > 1:
        out = compare_dir or os.path.join("runs", f"compare_{first.task}")
        os.makedirs(out, exist_ok=True)
        plot(runs, out, ood)
        print(report(runs, ood))
        print(f"comparison plots in {out}")


def main(argv=None):
    baselines.keep_freed_memory()  # the evaluation's solvers allocate many large temporaries
    given, special = parse_args(argv)
    if special["ood"] and not special["eval"]:
        raise UserError("--ood is an evaluation option: use it with --eval RUN_DIR")
    if special["bench"]:
        bench(given.get("device", "auto"))
    elif special["eval"]:
        evaluate_runs(special["eval"], given, special["ood"])
    elif special["resume"]:
        ckpt, cfg = saved_run(special["resume"], given)
        restore_model(ckpt, cfg, "cpu")  # fails early, with one line, on mismatched weights
        train(cfg, resume=ckpt)
    else:
        train(make_config(**given))


if __name__ == "__main__":
    try:
        main()
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: all is saved and the group is gone;
            sys.stdout.flush()  # skip the interpreter's teardown, where gloo's threads can still abort
            sys.stderr.flush()  # it ("terminate called without an active exception", 1 run in 20 on CPU)
            os._exit(0)
    except UserError as e:
        print(f"looped.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the last checkpoint is intact: say how to go on from it
        print("\nlooped.py: interrupted; continue from the last checkpoint with --resume RUN_DIR",
              file=sys.stderr)
        sys.exit(130)
