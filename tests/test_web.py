"""web/: the page runs the committed model in a real headless browser, Debian's chromium driven by
Playwright, with every request that is not to the test's own server blocked; web/predict.mjs runs
any export in Node.js. Their onnxruntime-web is the local copy `npm ci --prefix web` installs;
.ci/run installs all of them."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import baselines
import export

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "web")
MODEL = os.path.join(WEB, "linreg.onnx")
ORT_LOCAL = "node_modules/onnxruntime-web/dist/"
CHROMIUM, NODE = shutil.which("chromium"), shutil.which("node")
pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(WEB, ORT_LOCAL)),
    reason="the page and predict.mjs need onnxruntime-web (npm ci --prefix web)",
)
try:
    from playwright import sync_api
except ImportError:
    sync_api = None


class Files(http.server.SimpleHTTPRequestHandler):
    """web/ at /, and the test's own files (bad models, a wasm-less copy) at /extra/."""

    extra = None

    def translate_path(self, path):
        if path.startswith("/extra/"):
            return os.path.join(self.extra, path[len("/extra/") :].split("?")[0])
        return super().translate_path(path)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    extra = tmp_path_factory.mktemp("extra")
    handler = functools.partial(type("Handler", (Files,), {"extra": str(extra)}), directory=WEB)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/", extra
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or sync_api is None:
        pytest.skip(
            "the browser test needs Debian's chromium (apt-get install chromium) and playwright "
            "(pip install playwright)"
        )
    with sync_api.sync_playwright() as p:
        # The flags keep chromium from calling home, which a closed network refuses.
        flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        flags += ["--disable-component-update", "--disable-sync", "--no-first-run"]
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        yield browser
        browser.close()


LONG_TASKS = """window.longTasks = [];
new PerformanceObserver((list) => {
  for (const task of list.getEntries()) window.longTasks.push(task.duration);
}).observe({ type: "longtask", buffered: true });"""


def open_page(browser, base, query, **context):
    """The page at base with query, every other host blocked, its main thread's long tasks
    recorded from the start in window.longTasks; (page, errors, blocked requests)."""
    page = browser.new_context(**context).new_page()
    page.add_init_script(LONG_TASKS)
    errors, blocked = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))

    def local_only(route):
        if route.request.url.startswith(base):
            return route.continue_()
        blocked.append(route.request.url)
        return route.abort()

    page.route("**/*", local_only)
    page.goto(f"{base}index.html?{query}")
    return page, errors, blocked


def test_the_page_predicts_as_onnxruntime_python_does(server, browser):
    base, _ = server
    page, errors, blocked = open_page(browser, base, f"ort={ORT_LOCAL}&seed=3")
    page.evaluate("window.looped.ready")  # the model loaded, its charts drawn
    rng = np.random.default_rng(0)
    session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, n in [(3, 11), (2, 6)]:
        xs = rng.standard_normal((batch, n, 5)).astype(np.float32)
        ys = (xs @ rng.standard_normal(5)).astype(np.float32)
        for loops in [1, 7, 20, 100]:
            want = session.run(None, {"xs": xs, "ys": ys, "n_loops": np.array(loops)})[0]
            got = page.evaluate(
                "([xs, ys, loops]) => window.looped.predict(xs, ys, loops)",
                [xs.tolist(), ys.tolist(), loops],
            )
            worst = max(worst, float(np.abs(np.array(got) - want).max()))
    print(f"largest |web - python| = {worst:.2e}")
    assert worst < 1e-4
    assert page.locator("#error").is_hidden() and not errors, errors
    assert page.locator("#status").inner_text().startswith("Ready: linreg, d = 5, b = 20")
    assert len(page.locator("#prompt tbody tr").all()) == 11 and not blocked
    for name in ("load-time", "first-chart", "last-call"):
        print(name, page.locator(f"#meta-{name}").inner_text())
    page.close()


def test_the_page_never_freezes_fits_a_phone_and_draws_the_solvers(server, browser):
    """Inference runs off the main thread: no task there reaches 250 ms from navigation through
    30 slider steps (a margin a busy CI machine keeps; an idle one stays under 50 ms). At 390 px
    nothing scrolls sideways, and at devicePixelRatio 3 the charts are drawn at 3 pixels a point,
    each with a text alternative. Gradient descent and Newton's iteration computed in the page
    are baselines.py's, step by step."""
    base, _ = server
    phone = dict(viewport={"width": 390, "height": 800}, device_scale_factor=3)
    # ?ort= without its trailing slash still names the folder; a seed not a number is seed 1.
    query = f"ort={ORT_LOCAL.rstrip('/')}&seed=abc"
    page, errors, _ = open_page(browser, base, query, **phone)
    page.evaluate("window.looped.ready")
    assert page.locator("#seed").inner_text() == "1"
    page.locator("#loops").focus()
    for _ in range(30):
        page.keyboard.press("ArrowRight")
    page.wait_for_timeout(500)
    longest = max(page.evaluate("window.longTasks"), default=0)
    print(f"longest main-thread task: {longest:.0f} ms")
    assert longest < 250 and page.locator("#loops-value").inner_text() == "50" and not errors
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for chart in ("chart-k", "chart-loops"):
        size = page.evaluate(
            f"[{chart!r}].map((id) => document.getElementById(id))"
            ".map((c) => [c.width, c.clientWidth, c.getAttribute('aria-label')])[0]"
        )
        assert size[0] == round(3 * size[1]) and "model" in size[2], size
    # Eight quick clicks on "Draw another prompt": the prompts they supersede are never run.
    runs = page.evaluate("window.looped.runs()")
    for _ in range(8):
        page.locator("#draw").click()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Ready')")
    assert page.evaluate("window.looped.runs()") - runs <= 2 and page.locator("#error").is_hidden()
    rng = np.random.default_rng(1)
    xs, ys = rng.standard_normal((4, 11, 5)), rng.standard_normal((4, 11))
    got = page.evaluate(
        "([xs, ys]) => window.looped.iterates(xs, ys, 40)", [xs.tolist(), ys.tolist()]
    )
    for name, iterates in baselines.ITERATES.items():
        want = iterates(torch.from_numpy(xs), torch.from_numpy(ys), 40)[:, :, -1].numpy()
        assert np.abs(np.array([g[name] for g in got]) - want).max() < 1e-4, name
    page.close()


def edited(metadata):
    """The committed model with its metadata changed: a model the page must refuse."""
    model = onnx.load(MODEL)
    for prop in model.metadata_props:
        prop.value = metadata.get(prop.key, prop.value)
    return model.SerializeToString()


def test_bad_input_is_one_line_in_the_page(server, browser):
    base, extra = server
    (extra / "tree.onnx").write_bytes(edited({"task": "decision_tree"}))
    (extra / "unrolled.onnx").write_bytes(edited({"n_loops": "20"}))
    (extra / "corrupt.onnx").write_bytes(open(MODEL, "rb").read()[:50_000])
    (extra / "noise.onnx").write_bytes(np.random.default_rng(0).bytes(5000))
    (extra / "empty.onnx").write_bytes(b"")
    (extra / "d4.onnx").write_bytes(edited({"n_dims": "4"}))  # its graph takes d = 5
    (extra / "longer.onnx").write_bytes(edited({"max_points": "30"}))  # its positions hold 11
    renamed = onnx.load(MODEL)  # a graph whose input is called x, not xs
    for node in renamed.graph.node:
        node.input[:] = ["x" if name == "xs" else name for name in node.input]
    renamed.graph.input[0].name = "x"
    (extra / "renamed.onnx").write_bytes(renamed.SerializeToString())
    os.mkdir(extra / "no-wasm")  # onnxruntime-web's script without its wasm files
    shutil.copy(os.path.join(WEB, ORT_LOCAL, "ort.wasm.min.js"), extra / "no-wasm")
    cases = {
        f"ort={ORT_LOCAL}&model=extra/tree.onnx": "is a decision_tree model",
        f"ort={ORT_LOCAL}&model=extra/unrolled.onnx": "export it with --dynamic-loops --every-loop",
        f"ort={ORT_LOCAL}&model=extra/corrupt.onnx": "is corrupt",
        f"ort={ORT_LOCAL}&model=extra/noise.onnx": "extra/noise.onnx",
        f"ort={ORT_LOCAL}&model=extra/missing.onnx": "HTTP 404",
        f"ort={ORT_LOCAL}&model=extra/empty.onnx": "extra/empty.onnx is empty",
        f"ort={ORT_LOCAL}&model=extra/d4.onnx": "its graph does not fit its metadata",
        f"ort={ORT_LOCAL}&model=extra/longer.onnx": "its graph does not fit its metadata",
        f"ort={ORT_LOCAL}&model=extra/renamed.onnx": "has inputs (x, ys, n_loops)",
        "ort=extra/no-wasm/": "could not start its wasm backend",
        "ort=extra/nowhere/": "could not load onnxruntime-web",
    }
    for query, says in cases.items():
        page, _, _ = open_page(browser, base, query)
        with pytest.raises(sync_api.Error):
            page.evaluate("window.looped.ready")
        message = page.locator("#error")
        assert message.is_visible() and says in message.inner_text(), (query, message.inner_text())
        # A sentence of the page's, never the runtime's own text or a path into its source.
        assert not any(raw in message.inner_text() for raw in ("ERROR_CODE", ".cc:", ".h:"))
        assert "\n" not in message.inner_text() and page.locator("#draw").is_disabled()
        page.close()


def node_predicts(model, request, tmp_path):
    """web/predict.mjs on a model and a request (JSON): (exit code, stdout, stderr)."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(request))
    script = os.path.join(WEB, "predict.mjs")
    r = subprocess.run(
        [NODE, script, str(model), str(prompts)], capture_output=True, text=True, timeout=120
    )
    return r.returncode, r.stdout, r.stderr


@pytest.mark.skipif(not NODE, reason="predict.mjs needs Node.js")
def test_node_predicts_as_python_does_for_every_kind_of_export(trained_run, tmp_path):
    """An unrolled, a --dynamic-loops --every-loop and an --until-converged export give in Node.js
    (onnxruntime-web, wasm) what they give in Python (onnxruntime), every output; a mistake in the
    prompts or the loop count is one line of the script's and exit code 2."""
    graphs = {
        "unrolled.onnx": dict(n_loops=4),
        "every.onnx": dict(dynamic_loops=True, every_loop=True),
        "adaptive.onnx": dict(until_converged=0.01),
    }
    rng, worst = np.random.default_rng(0), 0.0
    xs = rng.standard_normal((3, 9, 4)).astype(np.float32)
    ys = (xs @ rng.standard_normal(4)).astype(np.float32)
    prompts = {"xs": xs.tolist(), "ys": ys.tolist()}
    for name, options in graphs.items():
        path = tmp_path / name
        export.export(trained_run, str(path), say=lambda *a: None, **options)
        predictor = export.Predictor(str(path), device="cpu")
        loops = 7 if predictor.dynamic_loops else None
        request = prompts | ({"n_loops": loops} if loops else {})
        code, out, err = node_predicts(path, request, tmp_path)
        assert code == 0, err
        got = json.loads(out)
        want = predictor(
            xs, ys, loops, return_loops=predictor.adaptive, return_every=predictor.every
        )
        want = dict(zip(predictor.outputs, want if isinstance(want, tuple) else [want]))
        assert set(got) == set(want) == set(predictor.outputs)
        same = np.ones(len(xs), bool)
        if "loops" in want:  # a change within round-off of the tolerance may stop a loop apart
            assert np.abs(np.array(got["loops"]) - want["loops"]).max() <= 1
            same = np.array(got["loops"]) == want["loops"]
        for key in set(want) - {"loops"}:
            worst = max(worst, float(np.abs(np.array(got[key]) - want[key])[same].max()))
        assert same.any()
    print(f"largest |node - python| = {worst:.2e}")
    assert worst < 1e-4
    rows = [xs[0].tolist(), None]
    mistakes = [
        ("every.onnx", prompts, 'give "n_loops", a whole number'),
        ("every.onnx", prompts | {"n_loops": 1.5}, 'give "n_loops", a whole number'),
        ("unrolled.onnx", prompts | {"n_loops": 3}, 'runs 4 loops: leave "n_loops" out'),
        ("adaptive.onnx", prompts | {"n_loops": 3}, 'converged: leave "n_loops" out'),
        (
            "unrolled.onnx",
            {"xs": xs[:, :, :2].tolist(), "ys": ys.tolist()},
            "the model takes d = 4",
        ),
        ("unrolled.onnx", {"xs": [[[0.0] * 4] * 10], "ys": [[0.0] * 10]}, "takes 1 to 9"),
        ("unrolled.onnx", {"xs": rows, "ys": ys[:2].tolist()}, "each row as long as the first"),
        ("unrolled.onnx", {"xs": [[[1e300] * 4]], "ys": [[0.0]]}, "within float32's range"),
        ("unrolled.onnx", None, "must hold an object"),
        ("/nonexistent.onnx", prompts, "cannot read"),
        (WEB + "/index.html", prompts, "not an ONNX file"),
        ("bare.onnx", prompts, "no looped metadata"),
    ]
    onnx.save(
        onnx.helper.make_model(onnx.helper.make_graph([], "bare", [], [])), tmp_path / "bare.onnx"
    )
    for name, request, says in mistakes:
        code, out, err = node_predicts(tmp_path / name, request, tmp_path)
        assert code == 2 and not out and says in err and len(err.splitlines()) == 1, (name, err)
