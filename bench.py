"""Every speed measurement of the project, one command each; each prints a table.

    python bench.py train           # a training step: eager, compiled, CUDA graphs; fp32, bf16
    python bench.py loop            # steps per second of the real training loop
    python bench.py baselines       # the batched solvers against per-prompt scikit-learn
    python bench.py export RUN_DIR  # PyTorch eager against onnxruntime: fixed b, adaptive depth
    python bench.py web             # the web page's model call in headless Chromium
    python bench.py page            # the page's load, first chart and longest main-thread tasks

With --save the table also goes to results/bench_NAME.json (bench_NAME_cuda.json on a GPU), with
the command, the machine and the torch version: `python experiments.py report` shows the saved
tables in docs/results.md.
Compare speeds only as ratios measured in one run: other work on the machine moves the seconds.
"""

import contextlib
import datetime
import functools
import importlib.util
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import torch

import baselines
import cli
import export
import harness
import looped
import report


def seconds(fn, repeats, warmup=1, device=None):
    """Median wall time of fn() over repeats calls, after the warm-up calls (which compile, fill
    caches and pay for lazy imports); CUDA is synchronised around every call."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else lambda: None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def provenance():
    """What a result file records about where it was made: the machine, torch, torch's threads."""
    return {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def machine():
    """The hardware a number was measured on: the CPU's model and cores, and the GPU if any."""
    cpu = open("/proc/cpuinfo").read() if os.path.isfile("/proc/cpuinfo") else ""
    found = re.search(r"model name\s*: (.*)", cpu)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{found.group(1) if found else platform.processor()}, {os.cpu_count()} cores{gpu}"


class Table:
    """Rows printed as they are measured, kept for --save as numbers and as printed cells."""

    def __init__(self, title, columns, widths, digits=2):
        self.title, self.columns, self.widths, self.digits = title, columns, widths, digits
        self.rows, self.text = [], []
        print(title, self.line(columns), sep="\n")

    def line(self, cells):  # the first column left-aligned, the others right-aligned
        first, *rest = zip(cells, self.widths)
        return f"{first[0]:<{first[1]}}" + "".join(f"{c:>{w}}" for c, w in rest)

    def add(self, *cells):
        self.rows.append(list(cells))
        digits = [self.digits if isinstance(c, str) or abs(c) < 100 else 1 for c in cells]
        self.text.append([c if isinstance(c, str) else f"{c:.{d}f}" for c, d in zip(cells, digits)])
        print(self.line(self.text[-1]), flush=True)

    def save(self, path, command):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        record = {"command": command, **provenance(), "date": datetime.date.today().isoformat()}
        record |= {key: getattr(self, key) for key in ("title", "columns", "rows", "text")}
        harness.write_json(path, record, indent=1)
        print(f"saved {path}")


# ---------------------------------------------------------------------------- training


MODES = ["eager", "compiled", "reduce-overhead", "captured", "captured eager"]  # bench_train's


def bench_train(device, presets=("laptop", "paper"), modes=None):
    """ms per training step, prompts/s and FLOP/s against this machine's matmul peak, for the laptop
    preset and the paper's linreg model (b 20, T 15, D 256), fp32 and bf16 autocast, at the final
    curriculum stage. Modes: "eager"; "compiled", M compiled as --compile does (all it does on a CPU
    or under torchrun); on CUDA also "captured", what --compile runs on one GPU (the compiled M, the
    whole step one CUDA graph: CapturedSteps), "captured eager" (the same, M eager) and
    "reduce-overhead" (M's calls as torch.compile's CUDA graphs, the rest eager). modes: those to
    time (default all that the device runs)."""
    here = MODES if device.type == "cuda" else MODES[:2]  # the others need CUDA
    modes = list(dict.fromkeys(modes or here))
    if not set(modes) <= set(here):
        raise harness.UserError(f"--modes {' '.join(modes)}: {device} runs only {', '.join(here)}")
    # CapturedSteps warms up uncaptured on purpose: the capturable optimiser's warning is noise.
    warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")
    peak = {False: matmul_peak(device, torch.float32), True: matmul_peak(device, torch.bfloat16)}
    table = Table(
        f"training step, batch 64, {device}, {torch.get_num_threads()} threads; matmul peak "
        f"(4096^2): fp32 {peak[False] / 1e9:.0f}, bf16 {peak[True] / 1e9:.0f} GFLOP/s",
        "model|mode|dtype|ms/step|prompts/s|GFLOP/s|of peak %|saved MB|peak MB".split("|"),
        [8, 17, 6, 10, 11, 9, 11, 10, 9],
    )
    # The captured rows go last: a failed capture can leave CUDA unusable for the rows after it.
    rows = itertools.product(presets, modes, (False, True))
    for preset, mode, amp in sorted(rows, key=lambda r: r[1].startswith("captured")):
        row = time_step(preset, mode, amp, device, peak)
        if row is not None:
            table.add(*row)
    return table


def time_step(preset, mode, amp, device, peak):
    """bench_train's row for one model, mode and precision, or None where a capture failed."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = looped.make_config("linreg", preset, eval_prompts=64)
    torch.manual_seed(0)
    model = looped.LoopedTransformer(cfg).to(device)
    captured, cuda = mode.startswith("captured"), device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=cuda, capturable=captured)
    # bf16 autocast even on a CPU without native bf16, where looped.py trains in fp32; the
    # compiled modes turn autocast's weight cache off, as --compile does.
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=mode == "eager")
    ctx = bf16 if amp else contextlib.nullcontext()
    xs, ys = looped.eval_prompts(cfg, device)[:2]  # batch 64
    args = (xs, ys, cfg.n_loops, cfg.n_loops - cfg.loop_window)
    with FlopCounterMode(display=False) as counter:  # counted on the eager model
        looped.train_step(model, opt, ctx, *args)
    saved = activation_bytes(model, ctx, *args)
    # Each row compiles afresh, since dynamo keeps at most 8 graphs of one function.
    torch._dynamo.reset()
    if mode in ("compiled", "captured"):
        looped.compile_backbone(model)
    elif mode == "reduce-overhead":
        model.backbone = torch.compile(model.backbone, dynamic=True, mode="reduce-overhead")
    step = harness.CapturedSteps(looped.train_step) if captured else looped.train_step

    def run():
        if mode == "reduce-overhead":  # a new step: its CUDA graphs may overwrite the last outputs
            torch.compiler.cudagraph_mark_step_begin()
        return step(model, opt, ctx, *args)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # CapturedSteps runs 3 warm-up steps, then the capture: one more untimed call.
    repeats = 20 if preset == "laptop" or cuda else 3
    t = seconds(run, repeats, warmup=4 if captured else 3, device=device)
    if captured and step.failed:  # said by CapturedSteps; the eager fallback is not this row
        return None
    flops, dtype = counter.get_total_flops() / t, "bf16" if amp else "fp32"
    memory = [saved / 1e6, torch.cuda.max_memory_allocated() / 1e6 if cuda else "-"]
    return [preset, mode, dtype, 1000 * t, 64 / t, flops / 1e9, 100 * flops / peak[amp], *memory]


def bench_loop(device, preset, steps):
    """Steps per second of the real training loop, looped.train on linear regression for its first
    steps, with curriculum changes (b every 500 steps, d and n every 5000 at the paper's), prompts
    drawn on the device, logging every 100 steps and a checkpoint every 1000, but not the evaluation
    after it. Eager and --compile (on one GPU the step as CUDA graphs, one per curriculum stage), in
    bf16 where the device has it. The 500k-step hours are at the rate past step 1000, with short
    prompts: later, longer ones take longer where arithmetic, not launches, bounds the step."""
    amp = device.type != "cpu" or harness.cpu_has_bf16()
    rates = "mode|dtype|steps/s|steps/s after 1000|first 1000 s".split("|")
    table = Table(
        f"training loop, linreg --preset {preset}, {steps} steps, {device}, "
        f"{torch.get_num_threads()} threads",
        rates + [f"{steps} steps s", "500k at that rate h"],
        [10, 6, 9, 20, 14, 16, 21],
    )
    given = dict(steps=steps, device=str(device), amp=amp, log_every=100, ckpt_every=1000)
    given.update(eval_prompts=16, eval_loops=looped.make_config("linreg", preset).n_loops)
    for compiled in (False, True):
        torch._dynamo.reset()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = looped.make_config("linreg", preset, compile=compiled, out=f"{tmp}/run", **given)
            looped.train(cfg, quiet=True)
            ms = report.step_times(cfg.out)
        first = sum(m for b, m in ms if b <= 1000) / 1000
        total = sum(m for _, m in ms) / 1000
        late = (steps - 1000) / max(total - first, 1e-9)  # steps/s past step 1000
        rate, after = (late, [late, first]) if steps > 1000 else (steps / total, ["-", "-"])
        mode, dtype = "compiled" if compiled else "eager", "bf16" if amp else "fp32"
        table.add(mode, dtype, steps / total, *after, total, looped.PAPER["steps"] / rate / 3600)
    return table


def matmul_peak(device, dtype, size=4096):
    """FLOP/s of a square matmul: the ceiling that the training step is measured against."""
    a = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / seconds(lambda: a @ a, repeats=5, device=device)


def activation_bytes(model, ctx, xs, ys, n_loops, n_no_grad):
    """Bytes the forward pass keeps for the backward pass (the b - T no-grad loops keep none)."""
    storages = {}  # views of one tensor share its storage: count each storage once

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(xs, ys, n_loops, n_no_grad)
    return sum(storages.values())


# ---------------------------------------------------------------------------- baselines


def sklearn_reference(name, xs, ys):
    """The same fits one prompt and one prefix at a time with scikit-learn, as the original code
    does (Garg et al.'s baselines loop over prefixes and prompts); None if it has no such model."""
    from sklearn import ensemble, linear_model, neighbors, tree

    models = {  # i: the prefix's length
        "least squares": lambda i: linear_model.LinearRegression(fit_intercept=False),
        "ridge": lambda i: linear_model.Ridge(alpha=0.01, fit_intercept=False),
        "3-NN": lambda i: neighbors.KNeighborsRegressor(n_neighbors=min(3, i)),
        "Lasso": lambda i: linear_model.Lasso(alpha=0.01, fit_intercept=False, max_iter=100_000),
        "greedy tree": lambda i: tree.DecisionTreeRegressor(max_depth=2),
        "greedy tree, sign(x)": lambda i: tree.DecisionTreeRegressor(max_depth=4),
    }
    boost = baselines.BOOSTED  # the same settings as the batched boosting
    models["boosted trees"] = lambda i: ensemble.GradientBoostingRegressor(
        max_depth=boost["depth"], n_estimators=boost["n_trees"], learning_rate=boost["lr"]
    )
    models["boosted trees, sign(x)"] = models["boosted trees"]
    if name not in models:
        return None
    X, Y = np.sign(xs.numpy()) if "sign" in name else xs.numpy(), ys.numpy()
    preds = np.zeros(Y.shape)
    for b, i in itertools.product(range(len(X)), range(1, X.shape[1])):
        preds[b, i] = models[name](i).fit(X[b, :i], Y[b, :i]).predict(X[b, i : i + 1])[0]
    return preds


def bench_baselines(prompts, ref_prompts, names):
    """Time every baseline on `prompts` prompts of its task at paper scale beside per-prompt
    scikit-learn fits on the same prompts. The task's prompts matter: how long a Lasso path or a
    scikit-learn tree takes depends on the data (pure nodes stop growing, noise adds events)."""
    if importlib.util.find_spec("sklearn") is None:  # a test and benchmark dependency only
        raise harness.UserError(
            "bench.py baselines compares with scikit-learn: pip install scikit-learn"
        )
    warnings.filterwarnings("ignore")  # sklearn's Lasso warns on the underdetermined prefixes
    baselines.keep_freed_memory()
    table = Table(
        f"time to score {prompts} prompts of the baseline's task at every prefix length "
        f"(d = 20, the paper's n); scikit-learn timed on {ref_prompts} prompts and scaled; "
        f"{torch.get_num_threads()} threads",
        "baseline|task|n|batched s|sklearn s|speed-up".split("|"),
        [24, 15, 5, 12, 12, 10],
    )
    for name in names:
        task = next((t for t, shown in baselines.TASK_BASELINES.items() if name in shown), "linreg")
        n = looped.PAPER_TASKS[task]["n_points"]
        xs, ys = looped.TASKS[task](prompts, n, 20, 20, torch.Generator().manual_seed(0))
        fit = baselines.BASELINES[name]
        fit(xs[:2], ys[:2])  # warm-up, untimed: first calls pay for imports and caches
        done = sklearn_reference(name, xs[:1], ys[:1])  # None where scikit-learn has no such model
        ours = seconds(functools.partial(fit, xs, ys), repeats=1, warmup=0)
        few = functools.partial(sklearn_reference, name, xs[:ref_prompts], ys[:ref_prompts])
        ref = seconds(few, repeats=1, warmup=0) * prompts / ref_prompts
        table.add(name, task, str(n), ours, *(["-", "-"] if done is None else [ref, ref / ours]))
    return table


# ---------------------------------------------------------------------------- export


def bench_export(run_dir, n_loops=None, repeats=20, tols=(0.03, 0.01)):
    """Median latency of PyTorch eager and onnxruntime at batch 1 and 64, measured in one run: the
    graph unrolled at n_loops (default b), the --dynamic-loops graph at n_loops, and the adaptive
    graphs (--until-converged at each of tols, at most 5 b loops) with the mean loops they used;
    the error at k = n - 1 of each, all on the same prompts; and each graph's time over that of its
    matrix products alone (matmuls_alone, at the loops it ran), the floor no fusion goes below."""
    model, cfg = export.load_model(run_dir)
    n_loops, most = n_loops or cfg.n_loops, min(5 * cfg.n_loops, export.MAX_LOOPS)
    # its loop count and finite predictions, as export.py checks them
    request = dict(dynamic_loops=False, fp16=False, until=None, max_loops=None, signal="prediction")
    export.check_request(model, cfg, run_dir, n_loops, **request)
    norm = looped.error_normaliser(cfg.task, cfg.n_dims)
    graphs = predictors(model, cfg, n_loops, most, tols)
    floor = graphs.pop("matmuls alone")
    gen = torch.Generator().manual_seed(0)  # each batch size's prompts, the same for every graph
    prompts = {
        B: looped.TASKS[cfg.task](B, cfg.n_points, cfg.n_dims, cfg.n_dims, gen) for B in (1, 64)
    }
    # The floor of each batch size, timed once: every graph's row is read against it.
    alone = {
        B: 1000 * seconds(functools.partial(floor, xs.numpy(), ys.numpy()), repeats)
        for B, (xs, ys) in prompts.items()
    }
    table = Table(
        f"{cfg.task}: d {cfg.n_dims}, n {cfg.n_points}, D {cfg.n_embd}, {torch.get_num_threads()} "
        f"threads, onnxruntime on {floor.provider}; median of {repeats}",
        "graph|batch|torch eager ms|onnxruntime ms|speed-up|matmuls alone ms|x matmuls".split("|")
        + ["mean loops", "error, last k"],
        [16, 6, 16, 16, 10, 18, 11, 12, 14],
        digits=3,
    )
    for (name, predictor), batch in itertools.product(graphs.items(), (1, 64)):
        xs, ys = prompts[batch]
        x, y = xs.numpy(), ys.numpy()
        loop_count = n_loops if predictor.dynamic_loops else None
        tol = predictor.adaptive and float(predictor.meta["tolerance"])
        adaptive = (export.adaptive_depth, model, xs, ys, tol, most)
        args = adaptive if predictor.adaptive else (model, xs, ys, n_loops, n_loops - 1)
        with torch.inference_mode():
            eager = 1000 * seconds(functools.partial(*args), repeats)
        ort = 1000 * seconds(functools.partial(predictor, x, y, loop_count), repeats)
        out = predictor(x, y, loop_count, return_loops=predictor.adaptive)
        preds, mean_loops = (out[0], float(out[1].mean())) if predictor.adaptive else (out, n_loops)
        error = float(((preds[:, -1] - y[:, -1]) ** 2).mean() / norm)
        # The floor at the loops this graph ran: an adaptive graph's mean, not n_loops.
        ratio = ort / (alone[batch] * mean_loops / n_loops)
        table.add(name, str(batch), eager, ort, eager / ort, alone[batch], ratio, mean_loops, error)
    return table


def predictors(model, cfg, n_loops, most, tols):
    """bench_export's graphs, each in a Predictor: unrolled and dynamic at n_loops, the matrix
    products alone, and adaptive at each of tols (at most `most` loops)."""
    graphs = {
        f"{n_loops} loops": export.onnx_graph(model, cfg, n_loops),
        f"{n_loops} loops, Loop": export.onnx_graph(model, cfg, "dynamic"),
        "matmuls alone": export.onnx_graph(model, cfg, n_loops, step=matmuls_alone),
    }
    for tol in tols:
        stop = dict(tolerance=tol, max_loops=most, signal="prediction")
        graphs[f"until {tol:g}"] = export.onnx_graph(model, cfg, "adaptive", adaptive=stop)
    with tempfile.TemporaryDirectory() as tmp:  # a session keeps its graph once made
        for name, proto in graphs.items():
            onnx.save(proto, path := os.path.join(tmp, f"{len(os.listdir(tmp))}.onnx"))
            graphs[name] = export.Predictor(path)
    return graphs


def matmuls_alone(g, cfg, Y, P):
    """A loop iteration cut to its matrix products at the model's shapes, an export.onnx_graph step:
    per block q, k, v (D to 3 D), the attention's projection (D to D) and the MLP's (D to 4 D, 4 D
    to D); no input injection, norms, attention or activation."""
    h = P if Y is None else Y
    for i in range(cfg.n_layer):
        w = f"blocks.{i}."
        g("Gemm", h, w + "attn.c_attn.weight", transB=1)  # computed, though nothing reads it
        for name in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            h = g("Gemm", h, f"{w}{name}.weight", transB=1)
    return h


# ---------------------------------------------------------------------------- the web page

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
ORT_WEB = "node_modules/onnxruntime-web/dist/"  # the copy `npm ci --prefix web` installs
LONG_TASKS = """window.longTasks = [];
new PerformanceObserver((list) => {
  for (const task of list.getEntries()) window.longTasks.push(task.duration);
}).observe({ type: "longtask", buffered: true });"""  # main-thread tasks over 50 ms, from the start
TIME_IN_PAGE = """async ([xs, ys, loops, repeats]) => {
  await window.looped.predict(xs, ys, loops);  // warm-up
  const times = [];
  for (let i = 0; i < repeats; i++) {
    const t0 = performance.now();
    await window.looped.predict(xs, ys, loops);
    times.push(performance.now() - t0);
  }
  return times.sort((a, b) => a - b)[repeats >> 1];
}"""


def bench_web(model=None, repeats=20):
    """Median latency of the page's model call (window.looped.predict: onnxruntime-web, wasm, one
    thread, in headless Chromium) at batch 1 and 64 and 20 and 100 loops, beside onnxruntime in
    Python on one thread, on the same graph (default the page's web/linreg.onnx) and prompts."""
    import onnxruntime

    model = model or os.path.join(WEB, "linreg.onnx")
    try:
        predictor = export.Predictor(model, device="cpu")  # its checks of the file
    except ValueError as e:
        raise harness.UserError(str(e)) from None
    if not predictor.every:
        raise harness.UserError(f"{model}: the page runs --dynamic-loops --every-loop exports")
    session = predictor.session  # one thread, on the CPU, as the page's wasm runs
    gen, d, n = torch.Generator().manual_seed(0), predictor.n_dims, predictor.max_points
    with page_with(model) as page:  # it checks first that chromium and onnxruntime-web are here
        with open(os.path.join(WEB, ORT_WEB, "..", "package.json")) as f:
            ort_web = json.load(f)["version"]
        table = Table(
            f"the page's model call in headless Chromium (onnxruntime-web {ort_web}, wasm, 1 "
            f"thread) beside onnxruntime {onnxruntime.__version__} in Python (1 thread), "
            f"{os.path.basename(model)}; median of {repeats}",
            ["batch", "loops", "browser ms", "python ms", "browser / python"],
            [6, 6, 12, 12, 18],
            digits=3,
        )
        for batch, loops in itertools.product((1, 64), (20, 100)):
            xs, ys = (t.numpy() for t in looped.TASKS["linreg"](batch, n, d, d, gen))
            feeds = {"xs": xs, "ys": ys, "n_loops": np.array(loops, np.int64)}
            browser_ms = page.evaluate(TIME_IN_PAGE, [xs.tolist(), ys.tolist(), loops, repeats])
            python_ms = 1000 * seconds(functools.partial(session.run, None, feeds), repeats)
            table.add(str(batch), str(loops), browser_ms, python_ms, browser_ms / python_ms)
    return table


def bench_page(loads=3):
    """The page as a person meets it, over loads page loads in headless Chromium: the time from
    navigation until onnxruntime-web and the model are loaded (and checked), until the first
    chart, and the longest task on the page's main thread (PerformanceObserver's long tasks, over
    50 ms) from navigation to the first chart and through 30 slider steps made with the keyboard.
    Medians over the loads."""
    rows = []
    for _ in range(loads):
        with page_with(os.path.join(WEB, "linreg.onnx")) as page:
            load = page.evaluate("performance.getEntriesByName('model loaded')[0].startTime")
            first = page.evaluate("performance.getEntriesByName('first chart')[0].startTime")
            loaded = max(page.evaluate("window.longTasks"), default=0)
            page.evaluate("window.longTasks = []")
            page.locator("#loops").focus()
            t0 = time.perf_counter()
            for _ in range(30):
                page.keyboard.press("ArrowRight")
            page.evaluate("new Promise(requestAnimationFrame)")  # the last step drawn
            steps = 1000 * (time.perf_counter() - t0)
            sliding = max(page.evaluate("window.longTasks"), default=0)
            rows.append([load, first, loaded, steps, sliding])
    table = Table(
        f"the page in headless Chromium, {loads} loads, medians; a long task is one over 50 ms on "
        "the page's main thread (0: none)",
        ["page", "model loaded ms", "first chart ms", "longest task ms", "30 steps ms"]
        + ["longest task ms"],
        [6, 17, 16, 17, 13, 17],
        digits=0,
    )
    table.add("index", *np.median(rows, axis=0))
    return table


@contextlib.contextmanager
def page_with(model):
    """The page (web/index.html, served from this machine) in headless Chromium, running model and
    the local onnxruntime-web, once it has loaded and drawn its first charts."""
    import http.server
    import threading

    chromium = shutil.which("chromium")
    needs = [("Debian's chromium (apt-get install chromium)", chromium)]
    needs += [("onnxruntime-web (npm ci --prefix web)", os.path.isdir(os.path.join(WEB, ORT_WEB)))]
    needs += [("playwright (pip install playwright)", importlib.util.find_spec("playwright"))]
    missing = [what for what, found in needs if not found]
    if missing:
        raise harness.UserError(
            f"bench.py web drives the page in Chromium: it needs {', '.join(missing)}"
        )
    from playwright.sync_api import sync_playwright

    class Files(http.server.SimpleHTTPRequestHandler):  # web/, and the model at /model.onnx
        def translate_path(self, path):
            return model if path.startswith("/model.onnx") else super().translate_path(path)

        def log_message(self, *args):
            pass

    files = functools.partial(Files, directory=WEB)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            browser = p.chromium.launch(executable_path=chromium, args=flags)
            page = browser.new_page()
            page.add_init_script(LONG_TASKS)
            page.goto(
                f"http://127.0.0.1:{httpd.server_port}/index.html?ort={ORT_WEB}&model=model.onnx"
            )
            page.evaluate("window.looped.ready")
            yield page
            browser.close()
    finally:
        httpd.shutdown()


# ---------------------------------------------------------------------------- command line


def flags():
    """bench.py's command line: a subcommand per benchmark, each with --save."""
    parser = cli.doc_parser("bench.py", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    steps, names, count = looped.LIMITS["steps"], list(baselines.BASELINES), cli.Count(1)
    helps = {
        "train": "training step speed (see bench_train)",
        "loop": "steps per second of the real training loop (see bench_loop)",
        "baselines": "batched solvers against per-prompt scikit-learn fits",
        "export": "PyTorch eager against onnxruntime on a trained run",
        "web": "the page's model call in headless Chromium, beside onnxruntime in Python",
        "page": "the page's load, first chart and longest main-thread tasks in headless Chromium",
    }
    add = {name: sub.add_parser(name, help=text).add_argument for name, text in helps.items()}
    text = f"the modes to time (default all; the last three on CUDA only): {', '.join(MODES)}"
    add["train"]("--modes", nargs="+", choices=MODES, metavar="MODE", help=text)
    presets = {"train": "one model only (default: both)"}
    presets["loop"] = "default: paper on CUDA, laptop elsewhere"
    for command, text in presets.items():
        add[command]("--device", default="auto", help="auto, cuda, mps or cpu")
        add[command]("--preset", choices=("laptop", "paper"), help=text)
    text = (
        f"training steps per mode, {steps}; the paper's curriculum first changes n at 5000 [6000]"
    )
    add["loop"]("--steps", type=steps, default=6000, help=text)
    text = "prompts scored by the batched solvers, at least 1, as memory allows (paper: 1280)"
    add["baselines"]("--prompts", type=count, default=1280, help=text)
    text = "prompts fitted by scikit-learn, scaled to --prompts; 1 to --prompts [16]"
    add["baselines"]("--ref_prompts", type=count, default=16, help=text)
    text = f"baselines to time (default all): {', '.join(names)}"
    add["baselines"]("--only", nargs="+", metavar="NAME", choices=names, help=text)
    add["export"]("run_dir", help="a looped.py run folder (with ckpt.pt)")
    text = f"loop iterations to unroll, 1 to {export.UNROLLED} b (default: the trained b)"
    add["export"]("--loops", type=cli.Count(1, looped.MAX_LOOPS), help=text)
    text = "a --dynamic-loops --every-loop export to run in the page (default web/linreg.onnx)"
    add["web"]("--model", help=text)
    text = "also write the table to results/bench_NAME.json (bench_NAME_cuda.json on a GPU)"
    for command in add.values():
        command("--save", action="store_true", help=text)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = flags().parse_args(argv)
    device = harness.setup_device(looped.make_config(device=getattr(args, "device", "cpu")))[0]
    if args.save:  # a GPU's tables beside the CPU's, results/bench_train_cuda.json: checked first
        name = f"bench_{args.command}" + ("" if device.type == "cpu" else f"_{device.type}")
        saved = os.path.join(report.RESULTS, f"{name}.json")
        harness.check_outputs(saved)
    if args.command == "train":
        presets = [args.preset] if args.preset else ("laptop", "paper")
        table = bench_train(device, presets, args.modes)
    elif args.command == "loop":
        preset = args.preset or ("paper" if device.type == "cuda" else "laptop")
        table = bench_loop(device, preset, args.steps)
    elif args.command == "baselines":
        # The longest prompts the timed tasks have: n = 101 (trees and networks), d = 20.
        needs = {"--prompts": sum(baselines.memory_needed(args.prompts, 101, 20))}
        harness.fits(needs, torch.device("cpu"), "timing the baselines")
        if args.ref_prompts > args.prompts:
            raise harness.UserError(
                f"--ref_prompts {args.ref_prompts} exceeds --prompts {args.prompts}"
            )
        names = args.only or [name for name in baselines.BASELINES if name != "zero"]
        table = bench_baselines(args.prompts, args.ref_prompts, names)
    elif args.command == "export":
        table = bench_export(args.run_dir, args.loops)
    elif args.command == "web":
        table = bench_web(args.model)
    else:
        table = bench_page()
    if args.save:
        table.save(saved, "python bench.py " + shlex.join(argv))


if __name__ == "__main__":
    cli.cli(main)
