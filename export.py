"""Export a trained looped transformer to ONNX, verify it, and run it in any app with onnxruntime.

    python export.py RUN_DIR --loops 30 -o linreg_b30.onnx      # unrolled at 30 loop iterations
    python export.py RUN_DIR --dynamic-loops -o linreg.onnx     # the loop count is an input
    python export.py RUN_DIR --until-converged 0.01 -o adaptive.onnx  # stops when settled

The exported graph takes xs (batch, n, d) and ys (batch, n), float32, with batch and n dynamic
(n up to the trained maximum), and returns the predictions (batch, n) after the last loop:
entry i predicts y_i from the pairs before it. An --until-converged graph is an ONNX Loop that
stops each prompt when its predictions settle, and returns the loops each prompt used as a
second output, "loops" (batch,) int64. It carries its own description in the ONNX
metadata (task, d, maximum points, loops, error normaliser, training config, version).

`Predictor` needs only numpy and onnxruntime: this module imports torch, onnx and looped.py
only inside the functions that export and verify, so an app can copy this one file beside its
code and `from export import Predictor`. Export latency: `python bench.py export RUN_DIR`.
"""

import dataclasses
import json
import logging
import numbers
import os
import sys
import time
import types
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

VERSION = "0.2.0"
PARITY_TOL = 1e-4  # max |onnxruntime - PyTorch| on fresh prompts, float32 graphs
PARITY_TOL_FP16 = 5e-2  # the same for --fp16 graphs: half precision keeps about 3 digits
WIDE = 128  # from this D on, a batch smaller than the cores runs on all of them (see Predictor)
MAX_LOOPS = 10_000  # the most loops a graph runs: looped.MAX_LOOPS (Predictor imports no torch)
# An unrolled graph holds every loop it runs: each one adds about 0.8 s of export and 65 KB of
# graph at the laptop size (2-core AMD EPYC), so it goes to 5 b; --dynamic-loops to MAX_LOOPS.
UNROLLED = 5


class VerificationError(Exception):
    """The exported graph does not compute what PyTorch computes: exit code 1, file deleted."""


# -------------------------------------------------------------- inference (numpy + onnxruntime)


class Predictor:
    """Run an exported looped transformer: `Predictor("model.onnx")(xs, ys)` -> predictions (B, n).

    CUDA where onnxruntime can really run there, else the CPU (`provider` says which). On CUDA the
    inputs and outputs are bound to the device (IO binding), so a call copies only the prompt in and
    the predictions out. On the CPU a batch is split into one shard per core, each on one thread:
    onnxruntime's own threads speed this model's many small operations up little (1.35x at batch 64
    on 2 cores, `bench.py export`). A batch smaller than the cores runs on one thread, or on all of
    them for a wide model (D >= WIDE): at batch 1, D = 256 takes 16.3 ms on all cores against 23.6
    on one, while D = 64 takes 1.46 ms on all against 1.16 on one."""

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
        self.outputs = ["preds", "loops"] if self.adaptive else ["preds"]
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

    def __call__(self, xs, ys, n_loops=None, return_loops=False):
        """Predictions (B, n); with return_loops also the loops each prompt used (B,), int64."""
        if return_loops and not self.adaptive:
            raise ValueError("only an --until-converged model reports the loops it used")
        out = self.run(*self.check(xs, ys), n_loops)
        return tuple(out) if return_loops else out[0]

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


# ---------------------------------------------------------------------------- export (torch)


def wrappers():
    """The torch modules that export traces, `wrappers().UntilConverged(model, tol, max_loops)`:
    made here so that importing this module imports no torch (see Predictor)."""
    import torch

    class Loops(torch.nn.Module):
        """The loop written out n_loops times, only the last read-out returned; or, n_loops None,
        the loop count an int64 input of forward: torch.while_loop becomes an ONNX Loop."""

        def __init__(self, model, n_loops=None):
            super().__init__()
            self.model, self.n_loops = model, n_loops

        def forward(self, xs, ys, n_loops=None):
            if self.n_loops is not None:
                return self.model(xs, ys, self.n_loops, self.n_loops - 1)[:, -1]  # (B, n)
            P = self.model.embed(xs, ys)  # (B, L, D)
            _, Y = torch.while_loop(
                lambda t, Y: t < n_loops,
                lambda t, Y: (t + 1, self.model.iterate(Y, P)),
                (torch.zeros_like(n_loops), torch.zeros_like(P)),
            )
            return self.model.read(Y)

    class UntilConverged(torch.nn.Module):
        """Adaptive depth, at most max_loops loops: see until_converged."""

        def __init__(self, model, tol, max_loops, signal="prediction"):
            super().__init__()
            self.model, self.tol, self.max_loops, self.signal = model, tol, max_loops, signal

        forward = until_converged

    return types.SimpleNamespace(Loops=Loops, UntilConverged=UntilConverged)


def until_converged(self, xs, ys):
    """UntilConverged's forward, adaptive depth: a prompt freezes (its state, predictions and loop
    count stop changing) once the relative change of its predictions (signal "prediction":
    ||p_t - p_{t-1}|| / ||p_t|| over its positions, p_0 the read-out of Y_0 = 0) or of its loop
    state ("state": ||Y_t - Y_{t-1}|| / ||Y_t||) falls below tol; the loop ends when all have frozen
    or after max_loops. Freezing per prompt makes a prompt's answer independent of the rest of its
    batch, so a batch split over cores gives the same numbers as one whole, where a whole-batch
    stop would make each answer depend on its neighbours. Returns preds (B, n), loops (B,) int64."""
    import torch

    model, B = self.model, xs.shape[0]
    P = model.embed(xs, ys)  # (B, L, D)
    Y = torch.zeros_like(P)
    # (iterations, Y_0, p_0, converged, loops used); the last two fresh (B,) tensors, not views:
    # what the loop carries must keep its strides from one iteration to the next.
    start = (torch.zeros((), dtype=torch.int64), Y, model.read(Y))
    start += tuple(torch.zeros(B, dtype=t, device=xs.device) for t in (torch.bool, torch.int64))

    def unfinished(t, Y, p, done, loops):
        return (t < self.max_loops) & ~done.all()

    def iteration(t, Y, p, done, loops):
        Y_next = model.iterate(Y, P)
        p_next = model.read(Y_next)  # (B, n)
        new, old = (Y_next, Y) if self.signal == "state" else (p_next, p)
        size = new.flatten(1).norm(dim=1).clamp(min=1e-30)
        change = (new - old).flatten(1).norm(dim=1) / size
        return (
            t + 1,
            torch.where(done[:, None, None], Y, Y_next),
            torch.where(done[:, None], p, p_next),
            done | (change < self.tol),
            torch.where(done, loops, t + 1),
        )

    if torch.compiler.is_exporting():  # one ONNX Loop
        state = torch.while_loop(unfinished, iteration, start)
    else:  # eagerly, the same functions go round a plain loop: torch.while_loop would trace them
        state = start
        while unfinished(*state):
            state = iteration(*state)
    return state[2], state[4]  # preds, loops


def onnx_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, **_):
    """Causal attention written so that the masked scores never reach an Exp: the exporter turns
    F.scaled_dot_product_attention into Softmax(scores + mask) with -3.4e38 in the mask, and
    onnxruntime's Softmax takes a slow path whenever exp underflows (measured: 6.6x slower on
    this model's rows of 22 scores, 27% of a batch-64 run). Equal to softmax(q k^T / sqrt(hs)
    + causal mask) v; export() swaps it in for the trace only, and verify() checks the result
    against the untouched model."""
    import torch

    assert attn_mask is None and dropout_p == 0 and is_causal, "written for causal attention only"
    L = q.shape[-2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    keep = causal.to(q.dtype)  # (L, L): 1 for a key already seen, 0 for a later one
    hide = torch.zeros_like(keep).masked_fill(~causal, float("-inf"))  # 0 or -inf, only for the max
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, L, L)
    top = (s + hide).amax(-1, keepdim=True)  # the row max over the seen keys
    e = ((s - top) * keep).exp() * keep  # a later key gives exp(0) * 0; Mul, not Where: 2x faster
    return (e / e.sum(-1, keepdim=True)) @ v


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
):
    """Export, write metadata, verify; returns the verification report (a dict). until_converged:
    the tolerance of an adaptive graph (UntilConverged), at most max_loops (default 5 b) loops."""
    import onnx

    import harness
    import looped

    model, cfg = load_model(run_dir)
    check_output(out)  # before any work
    loops, max_loops = check_request(
        model, cfg, run_dir, n_loops, dynamic_loops, fp16, until_converged, max_loops, signal
    )
    forms, adaptive = wrappers(), {}
    if loops == "adaptive":
        wrapper = forms.UntilConverged(model, until_converged, max_loops, signal)
        adaptive = {"tolerance": until_converged, "max_loops": max_loops, "signal": signal}
    else:
        wrapper = forms.Loops(model, None if loops == "dynamic" else loops)
    t0 = time.perf_counter()
    proto = trace(wrapper, cfg, loops)
    if fp16:
        proto = half_precision(proto)
    # The graph's description, as strings: what Predictor and apps read.
    meta = dict(task=cfg.task, n_dims=cfg.n_dims, max_points=cfg.n_positions, n_loops=loops)
    meta.update(trained_loops=cfg.n_loops, **adaptive)  # adaptive: tolerance, max_loops, signal
    meta.update(error_normaliser=looped.error_normaliser(cfg.task, cfg.n_dims))
    meta.update(precision="fp16" if fp16 else "fp32", config=json.dumps(dataclasses.asdict(cfg)))
    meta.update(version=VERSION, producer="looped export.py")
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in meta.items()})
    # The graph is verified before it replaces anything at `out`: a failure leaves no file.
    with harness.atomic(out) as tmp:
        onnx.save(proto, tmp)  # one self-contained file: the weights are small
        size, seconds = os.path.getsize(tmp) / 1e6, time.perf_counter() - t0
        say(f"exported {out} ({size:.1f} MB) in {seconds:.1f} s")
        try:
            report = verify(tmp, model, cfg, loops, fp16, wrapper if adaptive else None)
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


def trace(wrapper, cfg, loops):
    """The wrapper traced into an ONNX graph (a ModelProto) by torch's exporter, with the batch and
    point axes symbolic; "dynamic" loops are an int64 input, "adaptive" ones a second output."""
    from unittest import mock  # not at the top: 25 ms that every app using Predictor would pay

    # Imported now, not lazily inside the export: a signal that lands in a lazy import leaves a
    # half-made module, whose error would replace the signal's one line.
    import torch._dynamo  # noqa: F401
    import torch.export

    import looped

    # Example shapes must avoid 1 (a size-1 example freezes that axis) and the maximum.
    n_example = max(2, min(cfg.n_points, cfg.n_positions) - 1)
    gen = torch.Generator().manual_seed(0)
    args = looped.TASKS[cfg.task](2, n_example, cfg.n_dims, cfg.n_dims, gen)
    batch = torch.export.Dim("batch", min=1)
    points = torch.export.Dim("n_points", min=1, max=cfg.n_positions)
    shapes = {"xs": {0: batch, 1: points}, "ys": {0: batch, 1: points}}
    if loops == "dynamic":
        args, shapes["n_loops"] = (*args, torch.tensor(3)), None
    logging.getLogger("torch").setLevel(logging.ERROR)
    attention = "torch.nn.functional.scaled_dot_product_attention"
    with warnings.catch_warnings(), mock.patch(attention, onnx_attention):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            dynamic_shapes=shapes,
            verbose=False,
            input_names=list(shapes),
            output_names=["preds", "loops"] if loops == "adaptive" else ["preds"],
            optimize=isinstance(loops, int) and loops <= 20,
        )
    return program.model_proto


def half_precision(proto):
    """The graph with float16 weights and arithmetic; its inputs and outputs stay float32, so an
    app feeds the same arrays."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    half = OnnxModel(convert_float_to_float16(proto, keep_io_types=True))
    half.topological_sort()  # the converter appends its input casts at the end of the graph
    # The types recorded for inner values are forgotten, in the Loop bodies too: the converter
    # leaves some of a Loop body's at float32, and the checker infers them afresh.
    graphs = [half.model.graph]
    while graphs:
        graph = graphs.pop()
        del graph.value_info[:]
        for node in graph.node:
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return half.model


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
    at 1 and b for a dynamic one, and for an adaptive one against its PyTorch module (adaptive,
    an UntilConverged), the loop counts equal. VerificationError on any failure."""
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
                # so the counts may differ by one; the predictions are compared where they agree.
                if np.abs(got_used - used).max() > 1:
                    raise VerificationError(
                        f"loops used: onnxruntime {got_used.tolist()}, torch {used.tolist()}"
                    )
                worst = max(worst, gap(got[got_used == used], expected[got_used == used]))
                tried = f"until converged (used {used.tolist()})"
                continue
            for b in tried:  # an unrolled graph takes its own loop count as well
                expected = model(xs, ys, b)[:, -1].numpy()  # (B, n) after loop b
                worst = max(worst, gap(predictor(x, y, b), expected))
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
        "predictions (or --stop-on state) falls below TOL (a number above 0); a second output "
        "gives the loops used",
        "--max-loops": f"with --until-converged: the most loops, {loops} (default 5 b)",
        "--stop-on": "with --until-converged: the change that is tested [prediction]",
    }
    parser = cli.doc_parser("export.py", __doc__)
    add = parser.add_argument
    add("run_dir", help="a looped.py run folder (with ckpt.pt)")
    add("--loops", type=loops, dest="n_loops", metavar="LOOPS", help=helps["--loops"])
    add("--dynamic-loops", action="store_true", help=helps["--dynamic-loops"])
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
