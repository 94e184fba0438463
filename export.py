"""Export a trained looped transformer to ONNX, verify it, and run it in any app with onnxruntime.

    python export.py RUN_DIR --loops 30 -o linreg_b30.onnx      # unrolled at 30 loop iterations
    python export.py RUN_DIR --dynamic-loops -o linreg.onnx     # the loop count is an input
    python export.py RUN_DIR --dynamic-loops --every-loop -o every.onnx  # and every loop's output
    python export.py RUN_DIR --until-converged 0.01 -o adaptive.onnx  # stops when settled

The exported graph takes xs (batch, n, d) and ys (batch, n), float32, with batch and n dynamic
(n up to the trained maximum), and returns the predictions (batch, n) after the last loop
(a --dynamic-loops graph takes the loop count, at least 1, as an int64 input n_loops):
entry i predicts y_i from the pairs before it. An --until-converged graph is an ONNX Loop that
stops each prompt when its predictions settle, and returns the loops each prompt used as a
second output, "loops" (batch,) int64. It carries its own description in the ONNX
metadata (task, d, maximum points, loops, error normaliser, training config, version). The graph
is written node by node from the weights (onnx_graph), in standard ONNX of opset 23, and checked
against the PyTorch model before it is saved.

`Predictor` needs only numpy and onnxruntime: this module imports torch, onnx and looped.py
only inside the functions that export and verify, so an app can copy this one file beside its
code and `from export import Predictor`. Export latency: `python bench.py export RUN_DIR`.
"""

import dataclasses
import functools
import json
import numbers
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

VERSION = "0.3.0"
PARITY_TOL = 1e-4  # max |onnxruntime - PyTorch| on fresh prompts, float32 graphs
PARITY_TOL_FP16 = 5e-2  # the same for --fp16 graphs: half precision keeps about 3 digits
WIDE = 128  # from this D on, a batch smaller than the cores runs on all of them (see Predictor)
MAX_LOOPS = 10_000  # the most loops a graph runs: looped.MAX_LOOPS (Predictor imports no torch)
# The smallest --until-converged. verify() lets onnxruntime and PyTorch stop a prompt one loop apart
# (the change tested is a difference of nearly equal float32 numbers); at 3e-6 the default run's
# graph stopped one 2 loops apart, at 1e-5 none more than one.
MIN_TOLERANCE = 1e-5
# An unrolled graph holds every loop it runs, 17 nodes each, so it goes to 5 b; --dynamic-loops,
# one Loop, to MAX_LOOPS.
UNROLLED = 5


class VerificationError(Exception):
    """The exported graph does not compute what PyTorch computes: exit code 1, file deleted."""


# -------------------------------------------------------------- inference (numpy + onnxruntime)


class Predictor:
    """Run an exported looped transformer: `Predictor("model.onnx")(xs, ys)` -> predictions (B, n).

    device "auto": CUDA where onnxruntime can really run there, else the CPU (`provider` says
    which); "cuda" is an error where it cannot, "cpu" never tries. On CUDA the inputs and outputs
    are bound to the device (IO binding), so a call copies only the prompt in and the predictions
    out. On the CPU a batch is split into one shard per core, each on one thread:
    onnxruntime's own threads split this model's many small operations less well (at batch 64 on
    2 cores of an AMD EPYC, the shards are 1.15 to 1.25 times faster than one session on both). A
    batch smaller than the cores runs on one thread, or on all of them for a wide model
    (D >= WIDE): at batch 1, D = 256 (n 41) takes 17 ms on both cores against 30 on one, while
    D = 64 takes 0.86 to 0.96 ms on both against 0.85 on one."""

    def __init__(self, path, device="auto"):
        import onnxruntime as ort

        if device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path must be a file name, got {path!r}")
        # Fatal messages only: without a GPU, onnxruntime logs its fallback to the CPU as an error.
        ort.set_default_logger_severity(4)
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        if not os.path.isfile(path):
            raise ValueError(f"no ONNX model at {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # parallel over the batch instead (see run)
        try:
            self.session = s = ort.InferenceSession(path, options, providers=providers)
        except Exception as e:  # onnxruntime raises its own types for unreadable graphs
            first = str(e).splitlines()[0][:200]
            raise ValueError(f"{path} is not a loadable ONNX model: {first}") from None
        # get_available_providers lists CUDA even without a GPU; the session knows what it got
        self.provider = s.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and self.device != "cuda":
            raise ValueError(
                "device='cuda', but onnxruntime cannot run on CUDA here (no GPU, or onnxruntime "
                "without CUDA): use device='auto' or 'cpu'"
            )
        self.meta = meta = s.get_modelmeta().custom_metadata_map
        if "n_dims" not in meta:
            raise ValueError(f"{path} has no looped metadata: was it made by export.py?")
        try:
            wide = json.loads(meta["config"]).get("n_embd", 0) >= WIDE and self.device == "cpu"
            self.n_dims, self.max_points = int(meta["n_dims"]), int(meta["max_points"])
            self.loops = meta["n_loops"]  # a number, "dynamic" or "adaptive"
        except (KeyError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{path} has incomplete or corrupt looped metadata ({type(e).__name__}: {e})"
            ) from None
        self.adaptive = self.loops == "adaptive"  # bench.py reads it
        self.dynamic_loops = self.loops == "dynamic"  # n_loops is an input: pass it per call
        self.every = meta.get("every_loop") == "True"  # also every iteration's predictions
        self.outputs = ["preds"] + ["loops"] * self.adaptive + ["every"] * self.every
        inputs = ["xs", "ys", "n_loops"] if self.loops == "dynamic" else ["xs", "ys"]
        graph = ([v.name for v in s.get_inputs()], [v.name for v in s.get_outputs()])
        if graph != (inputs, self.outputs):
            raise ValueError(
                f"{path}: its graph's inputs and outputs {graph} are not what its metadata "
                f"(n_loops {self.loops}) implies, {(inputs, self.outputs)}"
            )
        affinity = getattr(os, "sched_getaffinity", None)  # Linux only
        self.cores = len(affinity(0)) if affinity else os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.cores)  # for the CPU shards; starts no thread yet
        # With fewer prompts than cores, a wide model runs faster on all cores in one session.
        self.wide = ort.InferenceSession(path, providers=providers) if wide else None

    def __call__(self, xs, ys, n_loops=None, return_loops=False, return_every=False):
        """Predictions (B, n); with return_loops also the loops each prompt used (B,), int64; with
        return_every also the predictions after every iteration (B, n_loops, n)."""
        if return_loops and not self.adaptive:
            raise ValueError("only an --until-converged model reports the loops it used")
        if return_every and not self.every:
            raise ValueError("only an --every-loop model returns every iteration's predictions")
        out = self.run(*self.check(xs, ys), n_loops)
        return tuple(out) if return_loops or return_every else out[0]

    def run(self, xs, ys, n_loops):
        feeds = {"xs": xs, "ys": ys}
        whole = isinstance(n_loops, (int, np.integer)) and not isinstance(n_loops, bool)
        if n_loops is not None and not (whole and 1 <= n_loops <= MAX_LOOPS):
            raise ValueError(
                f"n_loops must be a whole number from 1 to {MAX_LOOPS:,}, got {n_loops!r}"
            )
        if self.loops == "dynamic":
            if n_loops is None:
                raise ValueError("this model takes the loop count per call: pass n_loops")
            feeds["n_loops"] = np.array(int(n_loops), dtype=np.int64)
        elif self.adaptive and n_loops is not None:
            raise ValueError(
                f"this model chooses its own loop count, at most {self.meta.get('max_loops')}"
            )
        elif n_loops is not None and n_loops != int(self.loops):
            raise ValueError(
                f"this model was exported at {self.loops} loops; "
                f"export with --dynamic-loops to choose per call"
            )
        if self.device == "cpu":  # one shard of the batch per core, each on one thread
            k = min(self.cores, len(xs))
            if k < self.cores and self.wide is not None:
                return self.wide.run(self.outputs, feeds)
            if k == 1:
                return self.session.run(self.outputs, feeds)

            def shard(x, y):
                return self.session.run(self.outputs, {**feeds, "xs": x, "ys": y})

            shards = self.pool.map(shard, np.array_split(xs, k), np.array_split(ys, k))
            return [np.concatenate(parts) for parts in zip(*shards)]
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        for name in self.outputs:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def check(self, xs, ys):
        """Inputs as float32 arrays of the right shape, or a ValueError that says what is wrong."""
        arrays = []
        for name, a, rank, shape in (("xs", xs, 3, "(batch, n, d)"), ("ys", ys, 2, "(batch, n)")):
            try:
                a = np.asarray(a)
            except (ValueError, TypeError, RuntimeError) as e:  # ragged lists; a tensor in a graph
                first = str(e).splitlines()[0]
                raise ValueError(f"{name} must be a {shape} array: {first}") from None
            if a.ndim != rank:
                raise ValueError(f"{name} must have rank {rank}, got shape {a.shape}")
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"{name} must be floating point, got {a.dtype}")
            with np.errstate(over="ignore"):  # an overflow is reported below, as a ValueError
                a = np.ascontiguousarray(a, dtype=np.float32)
            # Checked after the cast, since a value finite in float64 (1e300) can be inf in float32.
            if not np.isfinite(a).all():
                raise ValueError(
                    f"{name} has NaN or infinite values, or values beyond float32's range (3.4e38)"
                )
            arrays.append(a)
        xs, ys = arrays
        if xs.shape[2] != self.n_dims:
            raise ValueError(f"xs has d = {xs.shape[2]}, the model takes d = {self.n_dims}")
        if ys.shape != xs.shape[:2]:
            raise ValueError(f"ys has shape {ys.shape}, expected (batch, n) = {xs.shape[:2]}")
        if not 1 <= xs.shape[1] <= self.max_points:
            n, most = xs.shape[1], self.max_points
            raise ValueError(f"prompts have {n} points; the model takes 1 to {most}")
        if xs.shape[0] < 1:
            raise ValueError("the batch is empty")
        return xs, ys


# ---------------------------------------------------------------------------- export (torch, onnx)


def adaptive_depth(model, xs, ys, tolerance, max_loops, signal="prediction"):
    """Adaptive depth in PyTorch, what an --until-converged graph computes: a prompt freezes (its
    state, predictions and loop count stop changing) once the relative change of its predictions
    (signal "prediction": ||p_t - p_{t-1}|| / ||p_t|| over its positions, p_0 the read-out of
    Y_0 = 0) or of its loop state ("state": ||Y_t - Y_{t-1}|| / ||Y_t||) falls below tolerance;
    the loop ends when all have frozen or after max_loops. Freezing per prompt makes a prompt's
    answer independent of the rest of its batch, so a batch split over cores gives the same
    numbers as one whole. Returns preds (B, n), loops (B,) int64."""
    import torch

    P = model.embed(xs, ys)  # (B, L, D)
    Y = torch.zeros_like(P)
    p, done, loops = model.read(Y), torch.zeros(len(xs), dtype=torch.bool), 0
    for t in range(1, max_loops + 1):
        Y_next = model.iterate(Y, P)
        p_next = model.read(Y_next)  # (B, n)
        new, old = (Y_next, Y) if signal == "state" else (p_next, p)
        change = (new - old).flatten(1).norm(dim=1) / new.flatten(1).norm(dim=1).clamp(min=1e-30)
        Y, p = torch.where(done[:, None, None], Y, Y_next), torch.where(done[:, None], p, p_next)
        loops, done = torch.where(done, loops, t), done | (change < tolerance)
        if done.all():
            break
    return p, loops


class Graph:
    """ONNX nodes written in order: `x = g("Add", a, b)` appends a node and returns its output's
    name (k names with outputs=k), each new; `g.const(value)` adds a constant, shared by the graph
    and its Loop bodies (g.body()), which read the outer graph's names. embed sets the shapes
    `view` [-1, L, D], `rows` [-1, n] and `n` [n]; onnx_graph `step`, the nodes of one iteration."""

    def __init__(self, weights, prefix=""):
        self.nodes, self.weights, self.prefix = [], weights, prefix

    def __call__(self, op_type, *inputs, outputs=1, **attributes):
        from onnx import helper

        names = [f"{self.prefix}{op_type}{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attributes))
        return names if outputs > 1 else names[0]

    def const(self, value, dtype=np.int64):
        self.weights[name := f"const{len(self.weights)}"] = np.asarray(value, dtype)
        return name

    def body(self):  # a Loop body's nodes: the same constants, the outer graph's names in view
        body = Graph(self.weights, "body_")
        body.view, body.rows, body.n, body.step = self.view, self.rows, self.n, self.step
        return body


def onnx_graph(model, cfg, loops, fp16=False, adaptive=None, step=None, every=False):
    """The model as an ONNX graph (a ModelProto with its description), written node by node from
    its weights. The loop state is a (B L, D) matrix, so that each linear layer is one Gemm with its
    bias, and a block is ONNX's fused operators: LayerNormalization, Attention (causal, the heads
    split inside) and Gelu (tanh), 17 nodes an iteration. loops: an int, the loop unrolled;
    "dynamic", an ONNX Loop whose count is an int64 input; "adaptive", a Loop that stops each
    prompt once it settles (adaptive: tolerance, max_loops, signal, as adaptive_depth). fp16:
    float16 weights and arithmetic, float32 inputs and outputs. every, with "dynamic": a second
    output, every iteration's predictions (B, n_loops, n). step(g, cfg, Y, P): the nodes of one
    iteration (default `iteration`; bench.py swaps in its matrix products alone)."""
    from onnx import TensorProto as T

    if every and loops != "dynamic":
        raise ValueError(f"every goes with the dynamic loop count, not loops={loops!r}")
    real = T.FLOAT16 if fp16 else T.FLOAT
    g = Graph({k: w.detach().float().numpy() for k, w in model.state_dict().items()})
    P, g.step = embed(g, cfg, real), step or iteration  # in the Loop bodies too
    if isinstance(loops, int):
        Y = None  # Y_0 = 0: the first iteration's input is P
        for _ in range(loops):
            Y = g.step(g, cfg, Y, P)
        outputs = [read(g, Y)]
    elif loops == "dynamic":
        Y, every_loop = dynamic_loop(g, cfg, P, real, every)
        outputs = [read(g, Y)] + ([every_loop] if every else [])
    else:
        outputs = adaptive_loop(g, cfg, P, real, **adaptive)
    if fp16:
        outputs = [g("Cast", o, to=T.FLOAT) for o in outputs]  # no adaptive graph is fp16
    names = ["preds", "every" if every else "loops"][: len(outputs)]
    return as_model(g, cfg, loops, dict(zip(names, outputs)), fp16, adaptive or {})


def embed(g, cfg, real):
    """The prompt embedded as looped.LoopedTransformer.embed does, P (B L, D): read_in(x_i), and
    read_in of (y_i, 0, ..., 0), y_i times read_in's first column, interleaved x1 y1 x2 y2 ...,
    plus the positions. Sets the shapes g.view, [-1, L, D], a (B L, D) matrix seen as (B, L, D),
    g.rows, [-1, n], the predictions', and g.n, [n]."""
    from onnx import TensorProto as T

    xs, ys = (g("Cast", x, to=real) for x in ("xs", "ys")) if real != T.FLOAT else ("xs", "ys")
    read_in, D = g.weights["read_in.weight"], cfg.n_embd
    x_tokens = g("MatMul", xs, g.const(read_in.T, np.float32))  # (B, n, D)
    y_tokens = g("Mul", g("Unsqueeze", ys, g.const([2])), g.const(read_in[:, 0], np.float32))
    pairs = [g("Unsqueeze", t, g.const([2])) for t in (x_tokens, y_tokens)]  # (B, n, 1, D)
    g.n = g("Shape", "xs", start=1, end=2)
    L = g("Mul", g.n, g.const([2]))  # (1,): 2n tokens
    g.view = g("Concat", g.const([-1]), L, g.const([D]), axis=0)
    g.rows = g("Concat", g.const([-1]), g.n, axis=0)
    tokens = g("Reshape", g("Concat", *pairs, axis=2), g.view)  # (B, L, D)
    positions = g("Add", g("Slice", "wpe.weight", g.const([0]), L), "read_in.bias")  # (L, D)
    return g("Reshape", g("Add", tokens, positions), g.const([-1, D]))


def iteration(g, cfg, Y, P):
    """One loop iteration with input injection, Y_{t+1} = M(Y_t + P), on (B L, D) matrices (Y None:
    Y_0 = 0); M is the blocks, then ln_f."""
    h = P if Y is None else g("Add", Y, P)
    heads = dict(q_num_heads=cfg.n_head, kv_num_heads=cfg.n_head)
    for i in range(cfg.n_layer):
        w = f"blocks.{i}."
        qkv = linear(g, layer_norm(g, h, w + "ln_1"), w + "attn.c_attn")  # (B L, 3 D)
        q, k, v = (
            g("Reshape", t, g.view) for t in g("Split", qkv, axis=1, num_outputs=3, outputs=3)
        )
        att = g("Attention", q, k, v, is_causal=1, **heads)  # (B, L, D): it splits the heads
        h = g("Add", h, linear(g, g("Reshape", att, g.const([-1, cfg.n_embd])), w + "attn.c_proj"))
        fc = linear(g, layer_norm(g, h, w + "ln_2"), w + "mlp.c_fc")
        h = g("Add", h, linear(g, g("Gelu", fc, approximate="tanh"), w + "mlp.c_proj"))
    return layer_norm(g, h, "ln_f")


def layer_norm(g, x, name):
    return g("LayerNormalization", x, f"{name}.weight", f"{name}.bias", epsilon=1e-5)


def linear(g, x, name):  # torch's Linear, x W^T + b
    return g("Gemm", x, f"{name}.weight", f"{name}.bias", transB=1)


def read(g, Y):
    """The read-out at the x tokens, Y's even rows: (B L, D) -> predictions (B, n)."""
    x_rows = g("Slice", Y, g.const([0]), g.const([2**62]), g.const([0]), g.const([2]))
    return g("Reshape", linear(g, x_rows, "read_out"), g.rows)


def dynamic_loop(g, cfg, P, real, every=False):
    """Y after n_loops iterations (an int64 input) of an ONNX Loop, from Y_0 = 0; with every, also
    the predictions after each iteration, (B, n_loops, n), else None."""
    from onnx import TensorProto as T
    from onnx import helper

    body = g.body()
    Y = g.step(body, cfg, "Y", P)
    state = [("t", T.INT64), ("go", T.BOOL), ("Y", real)]
    # Every token's read-out, one Gemm an iteration, stacked by the Loop as a scan output; the
    # x tokens' are picked once, after it.
    scans = [(linear(body, Y, "read_out"), real)] if every else []
    loop = subgraph(body, state, [body("Identity", "go"), Y], scans)
    Y0 = g("ConstantOfShape", g("Shape", P), value=helper.make_tensor("0", real, [1], [0]))
    outs = g("Loop", "n_loops", "", Y0, body=loop, outputs=1 + every)
    if not every:
        return outs, None
    Y, reads = outs  # reads (n_loops, B L, 1): x_i's token is a prompt's row 2 i (from 0)
    pairs = g("Reshape", reads, g("Concat", g.const([0, -1]), g.n, g.const([2]), axis=0))
    x_reads = g("Gather", pairs, g.const(0), axis=3)  # (n_loops, B, n)
    return Y, g("Transpose", x_reads, perm=[1, 0, 2])


def adaptive_loop(g, cfg, P, real, tolerance, max_loops, signal):
    """The Loop of an --until-converged graph, as adaptive_depth: its state holds only the prompts
    still running and their places in the batch; each iteration writes the predictions and loop
    counts of those that settle into the outputs, (B, n) and (B,), and drops them, so that a batch
    costs about its prompts' loops, not its size times the slowest one's."""
    from onnx import TensorProto as T
    from onnx import helper

    b = g.body()
    Y = g.step(b, cfg, "Y", "P")
    p = read(b, Y)  # (A, n): A prompts still running

    def norm(x):  # per prompt: (A,)
        x, axes = (b("Reshape", x, g.view), [1, 2]) if signal == "state" else (x, [1])
        return b("ReduceL2", x, b.const(axes), keepdims=0)

    new, old = (Y, "Y") if signal == "state" else (p, "p")
    change = b("Div", norm(b("Sub", new, old)), b("Max", norm(new), b.const(1e-30, np.float32)))
    t, most = b("Add", "t", b.const(1)), g.const(max_loops)  # t: the loops run, this one too
    stop = b("Or", b("Less", change, b.const(tolerance, np.float32)), b("Equal", t, most))
    settled, running = (b("Squeeze", b("NonZero", s), b.const([0])) for s in (stop, b("Not", stop)))
    at = b("Unsqueeze", b("Gather", "idx", settled), b.const([1]))  # (S, 1): their places
    preds = b("ScatterND", "preds", at, b("Gather", p, settled))
    loops = b("ScatterND", "loops", at, b("Expand", t, b("Shape", settled)))

    def keep(x):  # the running prompts' rows of a (A L, D) matrix
        return b(
            "Reshape", b("Gather", b("Reshape", x, g.view), running), b.const([-1, cfg.n_embd])
        )

    kept = [keep(Y), keep("P"), b("Gather", p, running), b("Gather", "idx", running)]
    go = b("Greater", b("Size", running), b.const(0))
    state = [("t", T.INT64), ("go", T.BOOL), ("Y", real), ("P", real), ("p", real)]
    state += [("idx", T.INT64), ("preds", real), ("loops", T.INT64)]
    loop = subgraph(b, state, [go, *kept, preds, loops])
    Y0 = g("ConstantOfShape", g("Shape", P), value=helper.make_tensor("0", real, [1], [0]))
    p0, B = read(g, Y0), g("Shape", "xs", start=0, end=1)
    idx = g("Range", g.const(0), g("Squeeze", B, g.const([0])), g.const(1))  # (B,): 0 .. B - 1
    loops0 = g("ConstantOfShape", B, value=helper.make_tensor("0", T.INT64, [1], [0]))
    # The outputs start as p_0 and 0, each prompt's overwritten when it stops: at the latest at
    # max_loops, where every prompt still running stops.
    state = g("Loop", most, g.const(True, bool), Y0, P, p0, idx, p0, loops0, body=loop, outputs=6)
    return state[4:]  # preds, loops


def subgraph(body, inputs, outputs, scans=()):
    """A Loop's body: inputs [(name, type)] (the iteration, the condition, the state) and outputs
    the names its nodes give them in the same order (the condition, the state), then scans [(name,
    type)], values the Loop stacks over the iterations."""
    from onnx import helper

    # The iteration and the condition are scalars; the state's shapes may change.
    shapes = [[], []] + [None] * (len(inputs) - 2)
    inputs = [helper.make_tensor_value_info(n, kind, s) for (n, kind), s in zip(inputs, shapes)]
    kinds = [v.type.tensor_type.elem_type for v in inputs[1:]]
    outputs = [*zip(outputs, kinds), *scans]
    outputs = [helper.make_tensor_value_info(n, kind, None) for n, kind in outputs]
    return helper.make_graph(body.nodes, "loop_body", inputs, outputs)


def as_model(g, cfg, loops, outputs, fp16, adaptive):
    """The graph as a ModelProto: inputs xs, ys (and n_loops for "dynamic"), outputs {name: the
    value} (preds, and loops or every), the weights it reads, and its description in metadata."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    import looped

    g.nodes += [helper.make_node("Identity", [o], [name]) for name, o in outputs.items()]
    used, half = set(used_names(g.nodes)), np.float16 if fp16 else np.float32
    weights = [
        numpy_helper.from_array(w.astype(half) if w.dtype == np.float32 else w, name)
        for name, w in g.weights.items()
        if name in used
    ]
    axes = ["batch", "n_points"]
    inputs = [("xs", T.FLOAT, [*axes, cfg.n_dims]), ("ys", T.FLOAT, axes), ("n_loops", T.INT64, [])]
    inputs = inputs[: 3 if loops == "dynamic" else 2]
    kinds = {"preds": (T.FLOAT, axes), "loops": (T.INT64, axes[:1])}
    kinds["every"] = (T.FLOAT, ["batch", "n_loops", "n_points"])
    outs = [(name, *kinds[name]) for name in outputs]
    info = [[helper.make_tensor_value_info(*v) for v in vs] for vs in (inputs, outs)]
    graph = helper.make_graph(g.nodes, "looped", *info, weights)
    opset = [helper.make_opsetid("", 23)]  # Attention is new in opset 23
    proto = helper.make_model(graph, opset_imports=opset, ir_version=11, producer_name="looped")
    # The graph's description, as strings: what Predictor and apps read.
    meta = dict(task=cfg.task, n_dims=cfg.n_dims, max_points=cfg.n_positions, n_loops=loops)
    meta.update(trained_loops=cfg.n_loops, **adaptive)  # adaptive: tolerance, max_loops, signal
    meta.update({"every_loop": True} if "every" in outputs else {})
    meta.update(error_normaliser=looped.error_normaliser(cfg.task, cfg.n_dims))
    meta.update(precision="fp16" if fp16 else "fp32", config=json.dumps(dataclasses.asdict(cfg)))
    meta.update(version=VERSION, producer="looped export.py")
    helper.set_model_props(proto, {k: str(v) for k, v in meta.items()})
    return proto


def used_names(nodes):
    """Every name the nodes read, in their Loop bodies too."""
    for node in nodes:
        yield from node.input
        for attribute in node.attribute:
            yield from used_names(attribute.g.node)


def load_model(run_dir):
    """(model in eval mode on the CPU, its Config) from a looped.py run folder; UserError if not."""
    import looped

    ckpt, cfg = looped.load_checkpoint(run_dir)
    return looped.restore_model(ckpt, cfg, "cpu").eval(), cfg


def export(
    run_dir,
    out,
    n_loops=None,
    dynamic_loops=False,
    fp16=False,
    say=print,
    until_converged=None,
    max_loops=None,
    signal="prediction",
    every_loop=False,
):
    """Export, verify; returns the verification report (a dict). until_converged: the tolerance
    of an adaptive graph (adaptive_depth), at most max_loops (default 5 b) loops. every_loop, with
    dynamic_loops: every iteration's predictions as a second output."""
    import onnx

    import harness

    if every_loop and not dynamic_loops:
        raise harness.UserError("--every-loop goes with --dynamic-loops")
    model, cfg = load_model(run_dir)
    check_output(out)  # before any work
    loops, max_loops = check_request(
        model, cfg, run_dir, n_loops, dynamic_loops, fp16, until_converged, max_loops, signal
    )
    adaptive = {}  # an adaptive graph's stopping rule, in its metadata too
    if loops == "adaptive":
        adaptive = {"tolerance": until_converged, "max_loops": max_loops, "signal": signal}
    t0 = time.perf_counter()
    proto = onnx_graph(model, cfg, loops, fp16, adaptive, every=every_loop)
    reference = functools.partial(adaptive_depth, model, **adaptive) if adaptive else None
    # The graph is verified before it replaces anything at `out`: a failure leaves no file.
    with harness.atomic(out) as tmp:
        onnx.save(proto, tmp)  # one self-contained file: the weights are small
        size, seconds = os.path.getsize(tmp) / 1e6, time.perf_counter() - t0
        say(f"exported {out} ({size:.1f} MB) in {seconds:.1f} s")
        try:
            report = verify(tmp, model, cfg, loops, fp16, reference)
        except VerificationError:
            raise
        except Exception as e:  # any failure, not only a parity miss
            raise VerificationError(f"{type(e).__name__}: {e}") from None
    for key, value in report.items():
        say(f"  {key}: {value}")
    return report


def check_request(model, cfg, run_dir, n_loops, dynamic_loops, fp16, until, max_loops, signal):
    """(loops, max_loops): the graph's loop count as its metadata gives it (an int, "dynamic" or
    "adaptive") and an adaptive graph's most loops (default 5 b); or UserError before any work.
    The model's predictions must be finite there (load_checkpoint refused weights that are not)."""
    import torch

    import cli
    import looped
    from harness import UserError

    loops = "dynamic"
    if until is not None:
        if dynamic_loops or n_loops is not None:
            raise UserError(
                "--until-converged chooses the loop count: it excludes --loops and --dynamic-loops"
            )
        max_loops = min(5 * cfg.n_loops, MAX_LOOPS) if max_loops is None else max_loops
        cli.Count(1, MAX_LOOPS).check("--max-loops", max_loops)
        real = isinstance(until, numbers.Real) and not isinstance(until, bool)
        if not (real and until > 0 and np.isfinite(until)):
            raise UserError(f"--until-converged must be a finite number above 0, got {until}")
        if until < MIN_TOLERANCE:
            raise UserError(
                f"--until-converged {until:g} is below {MIN_TOLERANCE:g}: float32 round-off then "
                "moves the change it tests enough that onnxruntime and PyTorch stop more than one "
                "loop apart"
            )
        if fp16:  # half precision rounds the change it tests by about as much as the tolerances
            raise UserError("--until-converged needs fp32: it does not go with --fp16")
        loops, max_loops = "adaptive", int(max_loops)
    elif dynamic_loops and n_loops is not None:
        raise UserError(
            "--loops and --dynamic-loops exclude each other: the loop count is an input"
        )
    elif not dynamic_loops:
        n_loops = cfg.n_loops if n_loops is None else n_loops
        unrolled = cli.Count(1, UNROLLED * cfg.n_loops)
        whole = isinstance(n_loops, numbers.Integral) and not isinstance(n_loops, bool)
        if not (whole and unrolled.holds(n_loops)):
            raise UserError(
                f"--loops must be {unrolled} for this run ({UNROLLED} b, b = {cfg.n_loops}), got "
                f"{n_loops}: an unrolled graph holds every loop; --dynamic-loops takes up to "
                f"{MAX_LOOPS:,}"
            )
        loops = int(n_loops)
    if signal not in ("prediction", "state"):
        raise UserError(f"--stop-on must be prediction or state, got {signal!r}")
    at = {"adaptive": max_loops, "dynamic": cfg.n_loops}.get(loops, loops)
    gen = torch.Generator().manual_seed(0)
    xs, ys = looped.TASKS[cfg.task](8, cfg.n_points, cfg.n_dims, cfg.n_dims, gen)
    with torch.no_grad():
        if not model(xs, ys, at)[:, -1].isfinite().all():
            raise UserError(
                f"{run_dir}: the model's predictions after {at} loops are not finite; "
                "nothing was exported"
            )
    return loops, max_loops


def check_output(out):
    """UserError, before any work, unless out is a new name or a writable regular .onnx file outside
    any run folder, where a file can be made and removed (as the export's .tmp file will be)."""
    from harness import RUN_FILES, UserError, special

    if not isinstance(out, (str, os.PathLike)) or isinstance(os.fspath(out), bytes):
        raise UserError(f"-o must be a file name, got {out!r}")
    out = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(out))
    if not out.endswith(".onnx") or os.path.basename(out) == ".onnx":
        raise UserError(f"-o {out}: give a file name that ends in .onnx")
    if special(out):
        raise UserError(f"cannot write {out}: it is not a regular file (a folder, link or device)")
    if os.path.exists(out) and not os.access(out, os.W_OK):
        raise UserError(f"cannot write {out}: it is read-only")
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {out}: folder {folder} does not exist")
    if any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES[:2]):
        raise UserError(f"cannot write {out}: {folder} is a run folder; write the model beside it")
    try:
        os.close(os.open(out + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.remove(out + ".tmp")
    except FileExistsError:
        raise UserError(
            f"cannot write {out}: {out}.tmp is in the way (from another export?)"
        ) from None
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror})") from None


def gap(got, expected):
    """max |got - expected|, infinite where either is not finite (NaN would compare as a pass)."""
    if not (np.isfinite(got).all() and np.isfinite(expected).all()):
        return float("inf")
    return float(np.abs(got - expected).max(initial=0))


def verify(path, model, cfg, loops, fp16=False, adaptive=None):
    """The ONNX checker, symbolic batch and point axes, and parity with PyTorch on fresh prompts
    at a batch size and prompt length unlike the export example: at `loops` for an unrolled graph,
    at 1 and b for a dynamic one (every iteration's predictions too, where it returns them), and
    for an adaptive one against adaptive (adaptive_depth at its rule): loop counts at most one
    apart, and each prompt's prediction the model's at the count the graph reports.
    VerificationError on any failure."""
    import onnx
    import torch

    import looped

    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        raise VerificationError(f"ONNX checker: {str(e).splitlines()[0]}") from None
    for inp in onnx.load(path).graph.input[:2]:
        dims = inp.type.tensor_type.shape.dim
        if not (dims[0].dim_param and dims[1].dim_param):
            raise VerificationError(f"input {inp.name} has a fixed batch or point axis: {dims}")
    predictor, gen, worst = Predictor(path), torch.Generator().manual_seed(7), 0.0
    tried, half = [loops] if isinstance(loops, int) else [1, cfg.n_loops], cfg.n_positions // 2 + 1
    for batch, points in ((3, cfg.n_positions), (5, half)):
        xs, ys = looped.TASKS[cfg.task](batch, points, cfg.n_dims, cfg.n_dims, gen)
        x, y = xs.numpy(), ys.numpy()
        with torch.no_grad():
            if adaptive is not None:
                expected, used = (t.numpy() for t in adaptive(xs, ys))
                got, got_used = predictor(x, y, return_loops=True)
                # A change within round-off of the tolerance may stop one loop apart in the two,
                # so the counts may differ by one; each prompt's prediction must be the model's
                # at the count the graph reports.
                if np.abs(got_used - used).max() > 1:
                    raise VerificationError(
                        f"loops used: onnxruntime {got_used.tolist()}, torch {used.tolist()}"
                    )
                at_own = model(xs, ys, int(got_used.max()))[np.arange(batch), got_used - 1]
                worst = max(worst, gap(got, at_own.numpy()))
                tried = f"until converged (used {used.tolist()})"
                continue
            for b in tried:  # an unrolled graph takes its own loop count as well
                expected = model(xs, ys, b).numpy()  # (B, b, n): after each loop up to b
                got = predictor(x, y, b, return_every=predictor.every)
                got, every = got if predictor.every else (got, expected)
                worst = max(worst, gap(got, expected[:, -1]), gap(every, expected))
    tol = PARITY_TOL_FP16 if fp16 else PARITY_TOL
    parity = (
        f"max |onnxruntime - torch| = {worst:.2e} (tolerance {tol:g}) at batch 3 and 5, "
        f"n = {cfg.n_positions} and {half}, loops {tried}"
    )
    if not worst <= tol:
        raise VerificationError(parity)
    report = {"checker": "passed", "symbolic axes": "batch, n_points", "parity": parity}
    return {**report, "provider": predictor.provider}


# ---------------------------------------------------------------------------- command line


def main(argv=None):
    """export.py's command line: its flags are export()'s arguments."""
    import cli

    loops = cli.Count(1, MAX_LOOPS)
    helps = {
        "--loops": f"loop iterations to unroll, 1 to {UNROLLED} b (default: the trained b)",
        "--dynamic-loops": f"the loop count is an int64 input instead, 1 to {MAX_LOOPS:,} per call",
        "--out": "output file, a new name or an .onnx file to replace; never in a run folder "
        "(default: RUN_DIR.onnx, beside the run folder)",
        "--until-converged": "adaptive depth: stop each prompt when the relative change of its "
        f"predictions (or --stop-on state) falls below TOL (at least {MIN_TOLERANCE:g}); a second "
        "output gives the loops used",
        "--max-loops": f"with --until-converged: the most loops, {loops} (default 5 b)",
        "--stop-on": "with --until-converged: the change that is tested [prediction]",
        "--every-loop": "with --dynamic-loops: a second output, every (batch, n_loops, n), the "
        "predictions after every iteration (for plots of error against loops)",
    }
    parser = cli.doc_parser("export.py", __doc__)
    add = parser.add_argument
    add("run_dir", help="a looped.py run folder (with ckpt.pt)")
    add("--loops", type=loops, dest="n_loops", metavar="LOOPS", help=helps["--loops"])
    add("--dynamic-loops", action="store_true", help=helps["--dynamic-loops"])
    add("--every-loop", action="store_true", help=helps["--every-loop"])
    add("-o", "--out", help=helps["--out"])
    add("--fp16", action="store_true", help="half-precision weights, for GPU inference")
    add("--until-converged", type=cli.positive, metavar="TOL", help=helps["--until-converged"])
    add("--max-loops", type=loops, help=helps["--max-loops"])
    add("--stop-on", choices=["prediction", "state"], dest="signal", help=helps["--stop-on"])
    args = parser.parse_args(argv)
    if args.until_converged is None and (args.max_loops is not None or args.signal):
        parser.error("--max-loops and --stop-on go with --until-converged")
    run = os.path.normpath(args.run_dir)  # the default: runs/linreg -> runs/linreg.onnx
    default = (os.path.abspath(run) if os.path.basename(run) in (".", "..") else run) + ".onnx"
    given = {k: v for k, v in vars(args).items() if v is not None}  # the rest: export's defaults
    try:
        export(given.pop("run_dir"), given.pop("out", default), **given)
    except VerificationError as e:
        print(f"export.py: verification failed, file deleted: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    import cli

    cli.cli(main)
