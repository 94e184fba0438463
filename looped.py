"""Looped transformers learn in-context learning algorithms.

A small, exact reimplementation of Yang, Lee, Nowak and Papailiopoulos, "Looped Transformers
are Better at Learning Learning Algorithms" (ICLR 2024, https://arxiv.org/abs/2311.12424), on
the in-context function classes of Garg et al. (2022, https://arxiv.org/abs/2208.01066). One
transformer block, applied b times with the prompt injected at every iteration, learns to regress
in context as well as a 12-layer GPT-2 with a tenth of its parameters, the paper reports.

    python looped.py --task linreg --loops 20            # laptop scale, CPU, about 5 minutes
    python looped.py --task linreg --preset paper        # the paper's setup (a GPU)
    python looped.py --eval runs/linreg                  # re-evaluate a saved run

The file reads top to bottom as the method: config, tasks, curriculum, model, loss and
evaluation, training; then the command line (presets, checks, checkpoints) and the workarounds for
speed. Comments cite two codebases:
    [LT]  the authors' code, https://github.com/Leiay/looped_transformer
    [G]   Garg et al.'s code, https://github.com/dtsip/in-context-learning
Where they and the paper's text differ, the comment says which one this code follows.

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

import functools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import cli
import harness
import plots
from harness import UserError

# ---------------------------------------------------------------------------- config


@dataclass
class Config:
    """Every setting of a run. The defaults are the laptop preset; `--preset paper` takes the
    paper's values (PAPER below). Each field's docstring is its `--help` line."""

    task: str = "linreg"
    """function class: linreg, noisy_linreg, sparse_linreg, decision_tree or relu_2nn"""
    preset: str = "laptop"
    """laptop (a 2-core CPU, minutes) or paper (the paper's values, for a GPU)"""

    # The problem.
    n_dims: int = 5
    """d, the input dimension at the end of the curriculum (paper: 20)"""
    n_points: int = 11
    """n, (x, y) pairs per prompt (paper: 41 for regression, 101 for trees and ReLU networks)"""
    n_positions: int = 0
    """the longest prompt the position table holds, in pairs; 0: n_points"""

    # The model.
    n_embd: int = 64
    """D, the width (paper: 256)"""
    n_head: int = 4
    """attention heads; must divide D (paper: 8)"""
    n_layer: int = 1
    """blocks in the looped backbone M (the standard GPT-2: 12, with --loops 1)"""
    n_loops: int = 20
    """b, loop iterations at the end of the loop curriculum"""
    loop_window: int = 10
    """T <= b, the last iterations in the loss; the first b - T run without a gradient"""

    # The curriculum: every curriculum_every steps d grows by 1 and n by points_inc.
    dims_start: int = 2
    """d at step 0"""
    points_start: int = 5
    """n at step 0"""
    points_inc: int = 2
    """n's increment (paper: 2 for regression, 5 for trees and ReLU networks)"""
    curriculum_every: int = 500
    """steps between increments of d and n (paper: 5000); 0: off"""
    loops_every: int = 250
    """b starts at T and grows by 2 every this many steps (paper: 500); 0: off"""

    # The optimisation.
    steps: int = 3400
    """training steps (paper: 500,000)"""
    batch_size: int = 64
    """prompts per step, freshly drawn every step (paper: 64)"""
    lr: float = 1e-3
    """Adam's peak learning rate (paper: 1e-4)"""
    warmup: int = 100
    """steps of linear learning-rate warm-up from 0 (paper: none, 0)"""
    decay: int = 1000
    """the last steps, in which the learning rate falls linearly to 0 (paper: none, 0)"""
    embed_init: float = 0.3
    """std of the prompt's embedding (read-in and positions) at initialisation (paper: 0.02)"""
    attn_init: float = 0.2
    """std of the attention's q, k, v weights at initialisation (paper: GPT-2's 0.02)"""
    seed: int = 42
    """model initialisation and training prompts (the test prompts have their own seed)"""

    # The system.
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cuda, mps or cpu"""
    amp: bool = False
    """bf16 autocast for the forward pass (a CPU without native bf16 stays in fp32)"""
    compile: bool = False
    """torch.compile the backbone M; on one GPU also replay each training step as a CUDA graph"""
    out: str = ""
    """run folder for the checkpoint, log, evaluation and plots (default runs/TASK)"""
    log_every: int = 100
    """steps between log lines (and NaN checks)"""
    ckpt_every: int = 1000
    """steps between checkpoints (there is always one at the end)"""

    # The evaluation.
    eval_prompts: int = 1280
    """fixed test prompts (paper: 1280)"""
    eval_loops: int = 0
    """loop iterations run at test time, at least b; 0: 5 b (paper: 500, trees 200)"""
    eval_seed: int = 1234
    """seed of the test prompts, apart from training's"""
    eval_every: int = 0
    """steps between points of the learning curve, the val_error in log.jsonl (on 256 prompts
    drawn apart from the test's); 0: off"""


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
    n_inner = 2**depth - 1
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
    "noisy_linreg": functools.partial(sample_linear_regression, noise_std=0.1),
    "sparse_linreg": sample_sparse_linear_regression,
    "decision_tree": sample_decision_tree,
    "relu_2nn": sample_relu_2nn,
}


def error_normaliser(task, d):
    """E[y^2] of the task, so that predicting 0 scores about 1: d, s = 3, or 1 for trees."""
    return {"sparse_linreg": 3.0, "decision_tree": 1.0}.get(task, float(d))


# ---------------------------------------------------------------------------- curriculum


def curriculum(cfg, step):
    """(d, n, b) in force at a training step: start small, grow by steps, cap at the target."""
    grown = step // cfg.curriculum_every if cfg.curriculum_every else 10**9
    d = min(cfg.dims_start + grown, cfg.n_dims)
    n = min(cfg.points_start + grown * cfg.points_inc, cfg.n_points)
    # The loops start at T and grow by 2 every loops_every steps, as [LT]'s do.
    more_loops = step // cfg.loops_every if cfg.loops_every else 10**9
    b = min(cfg.loop_window + 2 * more_loops, cfg.n_loops)
    return d, n, b


def learning_rate(cfg, step):
    """Adam's rate at a step: a linear warm-up over the first cfg.warmup steps, then constant, and
    over the last cfg.decay steps a linear fall to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * min(1, (cfg.steps - step) / cfg.decay) if cfg.decay else cfg.lr


# ---------------------------------------------------------------------------- model
# GPT-2 as in nanoGPT: pre-LayerNorm, causal attention, tanh-GELU MLP, biases, no dropout. The
# attention and the GELU it calls (causal_attention, gelu) stand with the speed workarounds at the
# end of the file: each computes the textbook function.


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
        y = causal_attention(q, k, v)  # softmax(q k^T / sqrt(hs) + causal mask) v: (B, nh, L, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, D))


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
        self.wpe = nn.Embedding(2 * cfg.n_positions, cfg.n_embd)  # learned absolute positions
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.read_out = nn.Linear(cfg.n_embd, 1)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        # The laptop preset starts the prompt's embedding and the attention larger (Config's
        # embed_init, attn_init): scaled, not drawn again, so at 0.02 the draws are nanoGPT's.
        with torch.no_grad():
            for w in (self.read_in.weight, self.wpe.weight):
                w.mul_(cfg.embed_init / 0.02)
            for block in self.blocks:
                block.attn.c_attn.weight.mul_(cfg.attn_init / 0.02)

    @staticmethod
    def _init_weights(module):  # nanoGPT's, as [LT]: draws in the same order, so the same weights
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def iterate(self, Y, P):
        """One loop iteration with input injection, Y_{t+1} = M(Y_t + P)."""
        # The prompt is added back at every iteration, so that the loop cannot forget it.
        return self.backbone(Y + P)

    def backbone(self, h):
        """M: the blocks, then ln_f, (B, L, D) -> (B, L, D)."""
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def embed(self, xs, ys):
        """The prompt as tokens x1 y1 x2 y2 ..., embedded with their positions: (B, L, D)."""
        B, n, d = xs.shape
        y_tokens = F.pad(ys[..., None], (0, d - 1))  # (B, n, d): y becomes (y, 0, ..., 0)
        tokens = torch.stack([xs, y_tokens], dim=2).reshape(B, 2 * n, d)  # (B, L, d): x1 y1 x2 ...
        # [LT] re-adds the position embeddings inside every backbone call, so they are part of
        # what is injected: in code Y_{t+1} = ln_f(Block(Y_t + P)) with P = read_in(prompt) + PE.
        return self.read_in(tokens) + self.wpe.weight[: 2 * n]  # (B, L, D)

    def read(self, Y):
        """The read-out at the x_i tokens: (B, L, D) -> (B, n), entry i predicting y_i."""
        return self.read_out(Y[:, ::2])[..., 0]

    def forward(self, xs, ys, n_loops, n_no_grad=0):
        """xs (B, n, d), ys (B, n) -> predictions (B, n_loops - n_no_grad, n), one row per
        iteration after the first n_no_grad; entry i predicts y_i from the pairs before it."""
        P = self.embed(xs, ys)  # (B, L, D)
        Y = torch.zeros_like(P)  # Y_0 = 0
        with torch.no_grad():  # the first b - T iterations: no gradient, no stored activations
            for _ in range(n_no_grad):
                Y = self.iterate(Y, P)
        preds = []
        for _ in range(n_no_grad, n_loops):
            Y = self.iterate(Y, P)
            preds.append(self.read(Y))  # (B, n)
        return torch.stack(preds, dim=1)  # (B, t, n)


def count_parameters(model):
    """(the paper's count: blocks and ln_f, as nanoGPT counts; everything)."""
    backbone = sum(p.numel() for p in [*model.blocks.parameters(), *model.ln_f.parameters()])
    return backbone, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- loss and evaluation


def windowed_loss(preds, ys):
    """Mean over the window's iterations, the batch and all positions of (y_hat - y)^2."""
    return (preds.float() - ys[:, None]).pow(2).mean()


def eval_prompts(cfg, device):
    """Fixed test prompts at the final d and n, from their own generator: (xs, ys, normaliser)."""
    gen = torch.Generator(device).manual_seed(cfg.eval_seed)
    xs, ys = TASKS[cfg.task](cfg.eval_prompts, cfg.n_points, cfg.n_dims, cfg.n_dims, gen)
    return xs, ys, error_normaliser(cfg.task, cfg.n_dims)


@torch.no_grad()
def model_errors(model, cfg, test, ctx=None):
    """Normalised squared error per position after every loop iteration, on test prompts
    (xs, ys, normaliser): {"loops": (t, n) after iterations 1..eval_loops, "band looped":
    (2, n) the 90% bootstrap band over the prompts at b loops}."""
    model.eval()
    xs, ys, norm = test
    total, at_b = 0, []
    for s in range(0, len(xs), 256):  # chunks bound the activations at paper scale
        with ctx or nullcontext():  # ctx: the run's autocast, if any
            preds = model(xs[s : s + 256], ys[s : s + 256], cfg.eval_loops).float()  # (B, t, n)
        sq = (preds - ys[s : s + 256, None]).pow(2) / norm  # (B, t, n)
        total, at_b = total + sq.sum(0), at_b + [sq[:, cfg.n_loops - 1]]
    model.train()
    at_b = torch.cat(at_b)
    return {"loops": (total / len(at_b)).cpu(), "band looped": baselines.bootstrap_band(at_b).cpu()}


def evaluate(model, cfg, device, ctx=None):
    """The model and its task's baselines on the run's fixed test prompts."""
    test = eval_prompts(cfg, device)
    return {**model_errors(model, cfg, test, ctx), **baselines.task_errors(cfg.task, *test)}


def describe(cfg):
    """The model in a few words, for tables and legends."""
    if cfg.n_loops == 1:
        return f"transformer, {cfg.n_layer} layers"
    layers = f", {cfg.n_layer} layers" if cfg.n_layer > 1 else ""
    return f"looped, b = {cfg.n_loops}, T = {cfg.loop_window}{layers}"


# ---------------------------------------------------------------------------- training


def compile_backbone(model):
    """--compile: M alone, so that one graph serves every b and n (a compiled unrolled forward
    would be compiled again each time b grew)."""
    model.backbone = torch.compile(model.backbone, dynamic=True)


def train_step(forward, opt, ctx, xs, ys, n_loops, n_no_grad):
    """One Adam step on the windowed loss; returns the loss, left on the device (no sync)."""
    with ctx:
        preds = forward(xs, ys, n_loops, n_no_grad)  # (B, min(b, T), n)
    loss = windowed_loss(preds, ys)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def val_error(model, cfg, device, ctx):
    """--eval_every: a function of no arguments giving the validation error, at every k after b
    loops on 256 prompts drawn apart from the test prompts."""
    val = eval_prompts(replace(cfg, eval_prompts=256, eval_seed=cfg.eval_seed + 1), device)
    at_b = replace(cfg, eval_loops=cfg.n_loops)
    return lambda: model_errors(model, at_b, val, ctx)["loops"][-1].tolist()


def train(cfg, **options):
    """Train a looped transformer, then evaluate it; returns the evaluation's errors (None on the
    processes of a torchrun job other than rank 0). The run folder, resuming, torchrun, signals
    and checkpoints are the harness's TrainingRun, with options resume (a checkpoint to continue),
    overwrite (replace the run in cfg.out) and quiet; the loop below is the method."""
    started = time.perf_counter()
    device, ctx = harness.setup_device(cfg)
    check_memory(cfg, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    with harness.memory_guard(WEIGHT_FLAGS):
        model = LoopedTransformer(cfg).to(device)
    if cfg.compile:
        compile_backbone(model)
    # Adam, its rate set every step by the schedule (learning_rate): fused on a GPU; where --compile
    # replays each step as a CUDA graph, capturable, with its rate a tensor the replay reads.
    captured = harness.captures_steps(cfg, device)
    lr = torch.tensor(cfg.lr, device=device) if captured else cfg.lr
    cuda = device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=cuda, capturable=captured)
    # Fresh prompts every step, drawn on the device: one stream per process under torchrun.
    prompts = torch.Generator(device).manual_seed(cfg.seed + harness.rank())
    val = val_error(model, cfg, device, ctx) if cfg.eval_every else None
    work = functools.partial(work_done, cfg)  # each step's cost, for the time-left estimate
    with harness.TrainingRun(
        cfg, model, device, optimizer=opt, prompts=prompts, work=work, val_error=val, **options
    ) as run:
        backbone, total = count_parameters(model)
        run.say(
            f"{cfg.task}: {cfg.n_layer} layer(s) x {cfg.n_loops} loops, D {cfg.n_embd}, "
            f"d {cfg.n_dims}, n {cfg.n_points} | {backbone / 1e6:.3f}M parameters (paper "
            f"convention), {total / 1e6:.3f}M total | {device} | run folder {cfg.out}"
        )
        for step in run.steps():
            d, n, b = curriculum(cfg, step)
            xs, ys = TASKS[cfg.task](run.batch_size, n, cfg.n_dims, d, prompts)
            # The paper's truncated loss: of the b iterations only the last T get a gradient.
            n_no_grad = max(b - cfg.loop_window, 0)
            with harness.memory_guard(STEP_FLAGS):  # out of memory: one line naming the flags
                loss = run.step(train_step, ctx, xs, ys, b, n_no_grad, lr=learning_rate(cfg, step))
            run.log(loss / error_normaliser(cfg.task, d), d=d, n=n, b=b)  # scaled as the error is
        if run.rank == 0:  # the evaluation, in the run folder still held
            return finish(model, cfg, device, ctx, run.say, started)


def finish(model, cfg, device, ctx, say=print, started=None):
    """Evaluate on the test prompts, write eval.json and the plots, print the table and the time
    taken (since started, when training came first)."""
    check_memory(cfg, device, training=False)
    t0 = time.perf_counter()
    with harness.memory_guard("--n_points, --eval_loops or --eval_prompts"):
        errors = evaluate(model, cfg, device, ctx)
    if not errors["loops"].isfinite().all():  # weights finite, predictions not: refused, unwritten
        raise UserError(
            f"the model's test error in {cfg.out} is not finite (its predictions overflow): "
            "eval.json and the plots are left as they were; train it again, with a lower --lr"
        )
    harness.write_json(f"{cfg.out}/eval.json", {k: v.tolist() for k, v in errors.items()})
    runs, shown = [(describe(cfg), cfg, errors)], baselines.TASK_BASELINES[cfg.task]
    plots.plot(runs, cfg.out, cfg.task, shown)
    say(plots.table(runs, cfg.task, shown))
    now = time.perf_counter()
    total = f", done in {harness.duration(now - started)}" if started else ""
    say(f"evaluated in {harness.duration(now - t0)}{total}; plots in {cfg.out}")
    return errors


# ---------------------------------------------------------------------------- command line
# What the method above leaves to the command line: the presets and the checks of a config,
# the checkpoints, --resume and --eval.


# The paper's values ([LT]'s configs): those of every task, then each task's own.
PAPER = dict(n_dims=20, n_positions=101, n_embd=256, n_head=8, n_layer=1)  # problem and model
PAPER.update(dims_start=5, curriculum_every=5000, loops_every=500)  # the curriculum's pace
PAPER.update(steps=500_000, batch_size=64, lr=1e-4, warmup=0, decay=0)  # Adam at a constant rate
PAPER.update(embed_init=0.02, attn_init=0.02, eval_loops=500)  # GPT-2's initialisation; the test
REGRESSION = dict(n_loops=20, loop_window=15, n_points=41, points_start=11, points_inc=2)
LONG = dict(n_points=101, points_start=26, points_inc=5)  # trees and ReLU networks: longer prompts
PAPER_TASKS = {
    "linreg": REGRESSION,
    "noisy_linreg": REGRESSION,
    "sparse_linreg": dict(REGRESSION, loop_window=10),
    "decision_tree": dict(LONG, n_loops=70, loop_window=15, eval_loops=200),
    "relu_2nn": dict(LONG, n_loops=12, loop_window=5),
}
# The laptop values are the dataclass's, except for two tasks (see the README, "Differences"): the
# ReLU network's baseline trains one network per test prompt and prefix, so it gets fewer prompts.
LAPTOP_TASKS = {
    "decision_tree": dict(n_points=15, points_start=7),
    "relu_2nn": dict(
        n_points=21, points_start=9, points_inc=4, n_loops=12, loop_window=5, eval_prompts=512
    ),
}
PRESETS = {"laptop": ({}, LAPTOP_TASKS), "paper": (PAPER, PAPER_TASKS)}
# Runs saved before embed_init and attn_init existed were initialised at GPT-2's 0.02.
BEFORE_INIT = dict(embed_init=0.02, attn_init=0.02)


def make_config(task="linreg", preset="laptop", **overrides):
    """The preset's values for the task, then explicit overrides, then validation."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: use laptop or paper")
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    common, per_task = PRESETS[preset]
    values = {"task": task, "preset": preset, **common, **per_task.get(task, {})}
    values.update(overrides)
    window = values.get("loop_window", Config.loop_window)
    if "loop_window" not in overrides and "n_loops" in overrides:  # T defaults to min(T, b)
        values["loop_window"] = min(window, values["n_loops"])
    cfg = Config(**values)
    cfg.out = cfg.out or os.path.join("runs", task)  # the derived values, set once here
    cfg.n_positions = cfg.n_positions or cfg.n_points
    cfg.eval_loops = cfg.eval_loops or min(5 * cfg.n_loops, MAX_LOOPS)
    validate(cfg)
    return cfg


FLAG = {"n_loops": "--loops", "loop_window": "--window"}  # the paper's names; messages use them


def flag(name):
    return FLAG.get(name, f"--{name}")


# Every count's range, for validate() and --help; a count not named here is at least 1. Sizes have
# no fixed top: check_memory refuses, before any work, those whose memory the device lacks. The
# tops here bound time, which no estimate knows before a run: loops at test time at most MAX_LOOPS
# (20 times the paper's 500), steps 2,000 times the paper's 500,000, seeds torch's int64.
MAX_LOOPS = 10_000
SEED = cli.Count(0, 2**63 - 1)
LIMITS = dict(n_loops=cli.Count(1, MAX_LOOPS), eval_loops=cli.Count(0, MAX_LOOPS))
LIMITS.update(steps=cli.Count(1, 10**9), seed=SEED, eval_seed=SEED)
ZERO_IS_OFF = "n_positions points_inc curriculum_every loops_every eval_every warmup decay"
LIMITS.update({name: cli.Count(0) for name in ZERO_IS_OFF.split()})


def validate(cfg):
    for f in fields(Config):
        if f.type in (int, "int"):
            LIMITS.get(f.name, cli.Count(1)).check(flag(f.name), getattr(cfg, f.name))
    for name in ("lr", "embed_init", "attn_init"):
        if not getattr(cfg, name) > 0 or not math.isfinite(getattr(cfg, name)):
            raise UserError(f"--{name} must be a positive number, got {getattr(cfg, name)}")
    if cfg.loop_window > cfg.n_loops:
        raise UserError(f"--window {cfg.loop_window} exceeds --loops {cfg.n_loops}: T <= b")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    if cfg.n_points > cfg.n_positions:
        table = f"the position table (n_positions {cfg.n_positions})"
        raise UserError(f"--n_points {cfg.n_points} is beyond {table}")
    if cfg.eval_loops < cfg.n_loops:  # the evaluation reports the error at b loops
        below = f"--eval_loops {cfg.eval_loops} is below --loops {cfg.n_loops}"
        raise UserError(f"{below}: evaluate at least b loops")
    kind, colon, index = cfg.device.partition(":")
    number = index.isascii() and index.isdigit() and kind != "auto"
    if kind not in ("auto", "cuda", "mps", "cpu") or (colon and not number):
        raise UserError(f"unknown device {cfg.device!r}: use auto, cuda, mps or cpu (cuda:N)")


# The flags that set the terms of the memory estimates, named by the messages.
STEP_FLAGS = "--batch_size, --n_points or --window"
WEIGHT_FLAGS = "--n_embd, --n_layer, --n_positions or --n_dims"


def check_memory(cfg, device, training=True):
    """Refuse, before any work, sizes whose rough peak memory exceeds the device's. A training step
    keeps about 19 D floats per token, block and trained iteration for the backward pass
    (bench.activation_bytes measures it), beside 4 copies of the weights (with their gradients and
    Adam's moments); the evaluation runs 256 prompts at a time, keeping the error after every
    iteration, then the baselines fit every prefix (baselines.memory_needed)."""
    L, D, n = 2 * cfg.n_points, cfg.n_embd, cfg.n_points
    # The weights' bytes: the blocks, the position table and read_in.
    weights = 4 * (12 * cfg.n_layer * D + 2 * cfg.n_positions + cfg.n_dims) * D
    if training:
        step = 4 * cfg.batch_size * L * D * (20 * cfg.n_layer * cfg.loop_window + 20)
        harness.fits({STEP_FLAGS: step, WEIGHT_FLAGS: 4 * weights}, device, "a training step")
    prompts, prefixes = baselines.memory_needed(cfg.eval_prompts, cfg.n_points, cfg.n_dims)
    evaluation = 4 * 256 * (20 * L * D + 2 * cfg.eval_loops * n)
    needs = {"--n_points or --eval_loops": evaluation, WEIGHT_FLAGS: weights}
    needs.update({"--eval_prompts": prompts, "--n_points or --n_dims": prefixes})
    harness.fits(needs, device, "the evaluation")


def weight_sizes(w):
    """The sizes a checkpoint's weights imply, checked against its config when it is loaded."""
    return dict(
        n_embd=w["read_in.weight"].shape[0],
        n_dims=w["read_in.weight"].shape[1],
        n_positions=w["wpe.weight"].shape[0] // 2,
        n_layer=len({k.split(".")[1] for k in w if k.startswith("blocks.")}),
    )


def load_checkpoint(run_dir):
    """The run's checkpoint and Config; UserError if missing, corrupt, or its weights disagree with
    its config."""
    config = functools.partial(make_config, **BEFORE_INIT)  # a checkpoint's own values win
    return harness.load_checkpoint(run_dir, config, weight_sizes)


def restore_model(ckpt, cfg, device):
    """A model with the checkpoint's weights, on the device."""
    return harness.load_weights(LoopedTransformer(cfg), ckpt["model"]).to(device)


# What --resume and --eval may change in a saved run: its length, the machine, the evaluation.
CHANGEABLE = {"steps", "out", "device", "log_every", "ckpt_every", "compile", "amp"}
CHANGEABLE |= {"eval_prompts", "eval_loops", "n_points", "eval_every"}
TRAINING_ONLY = {"steps", "log_every", "ckpt_every", "eval_every"}  # refused with --eval


def saved_run(run_dir, given, resume=False):
    """A saved run's checkpoint and config: it keeps its config; only its length and evaluation
    change, and to be resumed its --steps must go past its step."""
    ckpt, saved = load_checkpoint(run_dir)
    for name, value in given.items():
        if name not in CHANGEABLE and value != getattr(saved, name):
            raise UserError(
                f"{flag(name)} {value} differs from the saved run's {getattr(saved, name)}; "
                "a saved run keeps its config"
            )
    cfg = make_config(**{**asdict(saved), "out": run_dir, **given})
    if resume and cfg.steps <= ckpt["step"]:
        raise UserError(
            f"the run in {run_dir} is at step {ckpt['step']}: give a larger --steps to train it "
            "on (--eval re-evaluates it)"
        )
    if os.path.abspath(cfg.out) != os.path.abspath(run_dir):
        # --out elsewhere is a new run folder: refused if it holds a run (made where work starts).
        harness.check_folder(cfg.out, create=False)
    return ckpt, cfg


def main(argv=None):
    # One flag per field of Config, its docstring the help; then --resume, --eval, --overwrite.
    defaults = "[defaults] are the laptop preset's; --preset paper and --task change some of them."
    intro = __doc__.split("\n\n")[1]
    given, args = cli.run_flags(
        argv, Config, FLAG, LIMITS, prog="looped.py", description=intro, epilog=defaults
    )
    baselines.keep_freed_memory()  # the evaluation's solvers allocate many large temporaries
    training = sorted(TRAINING_ONLY & set(given))
    if args.eval and training:
        raise UserError(f"{flag(training[0])} is for training: it does not go with --eval")
    if args.eval or args.resume:
        ckpt, cfg = saved_run(args.eval or args.resume, given, resume=bool(args.resume))
        device, ctx = harness.setup_device(cfg)
        model = restore_model(ckpt, cfg, device)  # one line, early, on mismatched weights
        if args.resume:
            return train(cfg, resume=ckpt)
        check_memory(cfg, device, training=False)
        harness.check_folder(cfg.out, reuse=True)  # its files, before the evaluation
        with harness.hold_folder(cfg.out):
            return finish(model, cfg, device, ctx)
    return train(make_config(**given), overwrite=args.overwrite)


# ---------------------------------------------------------------------------- speed, not the method
# Workarounds that change how fast the method runs, never what it computes, and the time-left
# estimate of the progress lines.


def causal_attention(q, k, v):
    """F.scaled_dot_product_attention(q, k, v, is_causal=True). Under bf16 autocast on a CPU it
    runs in fp32: its bf16 backward is slow there."""
    fp32 = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", enabled=False) if fp32 else nullcontext():
        q, k, v = (t.float() if fp32 else t for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def gelu(x):
    """GPT-2's activation, 0.5 x (1 + tanh u) with u = sqrt(2 / pi) (x + 0.044715 x^3). Under
    torch.compile it is written x sigmoid(2u), the same function, because inductor's tanh is slow
    on a CPU (`python bench.py train --compile` measures it); eager keeps F.gelu."""
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(math.sqrt(8 / math.pi) * (x + 0.044715 * x**3))
    return F.gelu(x, approximate="tanh")


def step_cost(cfg, step):
    """A training step's relative cost, for the time-left estimate: tokens times iterations, each
    of the last min(b, T) counted three times (a forward pass and a backward pass of about two)."""
    _, n, b = curriculum(cfg, step)
    return n * (b + 2 * min(b, cfg.loop_window))


def work_done(cfg, step):
    """The summed cost of steps 0 .. step - 1, a curriculum stage at a time: no table of every
    step, which would cost a long run its memory up front."""
    final = curriculum(cfg, 10**18)
    every = [e for e in (cfg.curriculum_every, cfg.loops_every) if e]
    total, s = 0, 0
    while s < step:
        # The curriculum changes only at multiples of its intervals, and not once it is complete.
        done = curriculum(cfg, s) == final
        end = step if done else min([(s // e + 1) * e for e in every] + [step])
        total, s = total + (end - s) * step_cost(cfg, s), end
    return total


if __name__ == "__main__":
    cli.cli(main)
