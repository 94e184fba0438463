"""web/: the page runs the committed model in a real headless browser, Debian's chromium driven by
Playwright, with every request that is not to the test's own server blocked. Its onnxruntime-web is
the local copy `npm ci --prefix web` installs; .ci/run installs all three."""

import functools
import http.server
import os
import shutil
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "web")
MODEL = os.path.join(WEB, "linreg.onnx")
ORT_LOCAL = "node_modules/onnxruntime-web/dist/"
CHROMIUM = shutil.which("chromium")
missing = [
    what
    for what, ok in [
        ("Debian's chromium (apt-get install chromium)", CHROMIUM),
        ("onnxruntime-web (npm ci --prefix web)", os.path.isdir(os.path.join(WEB, ORT_LOCAL))),
    ]
    if not ok
]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"the browser test needs {', '.join(missing)}"
)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright (pip install playwright)"
)


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
    with sync_api.sync_playwright() as p:
        # The flags keep chromium from calling home, which a closed network refuses.
        flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        flags += ["--disable-component-update", "--disable-sync", "--no-first-run"]
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        yield browser
        browser.close()


def open_page(browser, base, query):
    """The page at base with query, every other host blocked; (page, errors, blocked requests)."""
    page = browser.new_page()
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
    page.evaluate("window.looped.ready")  # the model loaded, its charts and loop sweep drawn
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
    for name in ("load-time", "last-call", "loop-sweep"):
        print(name, page.locator(f"#meta-{name}").inner_text())
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
    os.mkdir(extra / "no-wasm")  # onnxruntime-web's script without its wasm files
    shutil.copy(os.path.join(WEB, ORT_LOCAL, "ort.wasm.min.js"), extra / "no-wasm")
    cases = {
        f"ort={ORT_LOCAL}&model=extra/tree.onnx": "is a decision_tree model",
        f"ort={ORT_LOCAL}&model=extra/unrolled.onnx": "export it with --dynamic-loops",
        f"ort={ORT_LOCAL}&model=extra/corrupt.onnx": "is corrupt",
        f"ort={ORT_LOCAL}&model=extra/noise.onnx": "extra/noise.onnx",
        f"ort={ORT_LOCAL}&model=extra/missing.onnx": "HTTP 404",
        "ort=extra/no-wasm/": "could not start its wasm backend",
        "ort=extra/nowhere/": "could not load onnxruntime-web",
    }
    for query, says in cases.items():
        page, _, _ = open_page(browser, base, query)
        with pytest.raises(sync_api.Error):
            page.evaluate("window.looped.ready")
        message = page.locator("#error")
        assert message.is_visible() and says in message.inner_text(), (query, message.inner_text())
        assert "\n" not in message.inner_text() and page.locator("#draw").is_disabled()
        page.close()
