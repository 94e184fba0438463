// The page: onnxruntime-web runs a looped transformer exported by `python export.py RUN_DIR
// --dynamic-loops` on prompts drawn here, beside least squares and averaging computed here.
// Query parameters: ?model=URL (default linreg.onnx), ?seed=N, ?ort=URL of onnxruntime-web's
// dist/ folder (default: the pinned CDN copy; the browser test passes its local npm copy).
"use strict";

const ORT_CDN = "https://cdn.jsdelivr.net/npm/onnxruntime-web@1.31.1/dist/";
const params = new URLSearchParams(location.search);
const ORT_BASE = new URL(params.get("ort") || ORT_CDN, location.href).href;
const MODEL_URL = params.get("model") || "linreg.onnx";
const BATCH = 64; // prompts per seed: the error-against-k chart is their mean
// The linear-regression tasks of looped.py: w ~ N(0, I), x ~ N(0, I), y = w . x (+ noise).
const TASKS = { linreg: {}, noisy_linreg: { noise: 0.1 }, sparse_linreg: { sparse: 3 } };

const $ = (id) => document.getElementById(id);
const state = { session: null, meta: null, calls: Promise.resolve() };

// ---------------------------------------------------------------- errors: one line in the page

function fail(message) {
  const line = String(message).split("\n")[0].slice(0, 400);
  $("error").textContent = line;
  $("error").hidden = false;
  $("status").hidden = true;
  for (const id of ["draw", "loops"]) $(id).disabled = true;
}
window.addEventListener("error", (e) => fail(e.message));
window.addEventListener("unhandledrejection", (e) => fail(e.reason?.message || e.reason));

// ---------------------------------------------------------------- loading

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = src;
    script.onload = resolve;
    script.onerror = () => reject(new Error(`could not load onnxruntime-web from ${src}`));
    document.head.appendChild(script);
  });
}

// The model's metadata_props (ModelProto field 14, each a key (1) and a value (2)), read from
// its protobuf bytes: onnxruntime-web does not expose them. Every other field is skipped whole.
function onnxMetadata(bytes) {
  let pos = 0;
  const varint = (end) => {
    let value = 0, shift = 0, byte;
    do {
      if (pos >= end) throw new Error("not an ONNX file (truncated)");
      byte = bytes[pos++];
      value += (byte & 127) * 2 ** shift;
      shift += 7;
    } while (byte & 128);
    return value;
  };
  const fields = (end, visit) => {
    while (pos < end) {
      const key = varint(end), field = Math.floor(key / 8), wire = key % 8;
      if (wire === 0) varint(end);
      else if (wire === 1 || wire === 5) pos += wire === 1 ? 8 : 4;
      else if (wire === 2) {
        const stop = varint(end) + pos;
        if (stop > end) throw new Error("not an ONNX file (a field runs past the end)");
        visit(field, stop);
        pos = stop;
      } else throw new Error(`not an ONNX file (wire type ${wire})`);
    }
  };
  const meta = {}, text = new TextDecoder();
  fields(bytes.length, (field, stop) => {
    if (field !== 14) return;
    const entry = {};
    fields(stop, (f, s) => { entry[f] = text.decode(bytes.subarray(pos, s)); });
    meta[entry[1]] = entry[2];
  });
  return meta;
}

async function load() {
  const t0 = performance.now();
  await loadScript(`${ORT_BASE}ort.wasm.min.js`);
  ort.env.wasm.wasmPaths = ORT_BASE;
  ort.env.wasm.numThreads = 1; // threads need a cross-origin-isolated page; one is plenty here
  const response = await fetch(MODEL_URL).catch((e) => {
    throw new Error(`could not fetch the model ${MODEL_URL}: ${e.message}`);
  });
  if (!response.ok) {
    throw new Error(`could not fetch the model ${MODEL_URL}: HTTP ${response.status}`);
  }
  const bytes = new Uint8Array(await response.arrayBuffer());
  let meta;
  try {
    meta = onnxMetadata(bytes);
  } catch (e) {
    throw new Error(`${MODEL_URL} is corrupt: ${e.message}`);
  }
  if (!meta.task) throw new Error(`${MODEL_URL} is not a looped export (no task in its metadata)`);
  if (!(meta.task in TASKS)) {
    throw new Error(`${MODEL_URL} is a ${meta.task} model: this page runs the linear-regression ` +
      `tasks (${Object.keys(TASKS).join(", ")})`);
  }
  if (meta.n_loops !== "dynamic") {
    throw new Error(`${MODEL_URL} is unrolled at ${meta.n_loops} loops: export it with ` +
      "--dynamic-loops, so that the page can choose the loop count");
  }
  try {
    state.session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  } catch (e) {
    const why = String(e.message || e).split("\n")[0];
    if (/backend|wasm|fetch/i.test(why)) {
      throw new Error(`onnxruntime-web could not start its wasm backend from ${ORT_BASE}: ${why}`);
    }
    throw new Error(`${MODEL_URL} is corrupt: onnxruntime-web says ${why}`);
  }
  meta.config = JSON.parse(meta.config || "{}");
  meta.bytes = bytes.length;
  meta.d = Number(meta.n_dims);
  meta.n = Number(meta.max_points);
  meta.b = Number(meta.trained_loops);
  meta.normaliser = Number(meta.error_normaliser);
  meta.loadMs = performance.now() - t0;
  state.meta = meta;
}

// ---------------------------------------------------------------- the model

// One session.run at a time: the page's calls queue behind each other.
function predict(xs, ys, B, n, loops) {
  const { d } = state.meta;
  const feeds = {
    xs: new ort.Tensor("float32", xs, [B, n, d]),
    ys: new ort.Tensor("float32", ys, [B, n]),
    n_loops: new ort.Tensor("int64", BigInt64Array.from([BigInt(loops)]), []),
  };
  const call = state.calls.then(async () => {
    const t0 = performance.now();
    const out = await state.session.run(feeds);
    return { preds: out.preds.data, ms: performance.now() - t0 };
  });
  state.calls = call.catch(() => {});
  return call;
}

// ---------------------------------------------------------------- prompts and the solvers

function normalGenerator(seed) {
  let a = seed >>> 0; // mulberry32, then Box-Muller
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
}

// B prompts of the model's task: xs (B, n, d) and ys (B, n) flat, and each prompt's w.
function drawPrompts(seed, B, n, d, task) {
  const normal = normalGenerator(seed);
  const xs = new Float32Array(B * n * d), ys = new Float32Array(B * n), ws = [];
  for (let p = 0; p < B; p++) {
    const w = Array.from({ length: d }, normal);
    if (task.sparse) { // keep task.sparse random coordinates
      const order = Array.from({ length: d }, (_, i) => [normal(), i]).sort((u, v) => u[0] - v[0]);
      for (const [, i] of order.slice(task.sparse)) w[i] = 0;
    }
    for (let i = 0; i < n; i++) {
      let y = 0;
      for (let j = 0; j < d; j++) {
        const x = normal();
        xs[(p * n + i) * d + j] = x;
        y += w[j] * x;
      }
      ys[p * n + i] = y + (task.noise ? task.noise * normal() : 0);
    }
    ws.push(w);
  }
  return { xs, ys, ws };
}

// Solve A z = r by Gaussian elimination with partial pivoting (A square, small).
function solve(A, r) {
  const m = A.length, M = A.map((row, i) => [...row, r[i]]);
  for (let c = 0; c < m; c++) {
    let best = c;
    for (let i = c + 1; i < m; i++) if (Math.abs(M[i][c]) > Math.abs(M[best][c])) best = i;
    [M[c], M[best]] = [M[best], M[c]];
    for (let i = c + 1; i < m; i++) {
      const f = M[i][c] / M[c][c];
      for (let j = c; j <= m; j++) M[i][j] -= f * M[c][j];
    }
  }
  const z = new Array(m).fill(0);
  for (let i = m - 1; i >= 0; i--) {
    let s = M[i][m];
    for (let j = i + 1; j < m; j++) s -= M[i][j] * z[j];
    z[i] = s / M[i][i];
  }
  return z;
}

const dot = (u, v) => u.reduce((s, ui, i) => s + ui * v[i], 0);

// Minimum-norm least squares on rows X (k of d) and targets y, as baselines.least_squares:
// (X^T X)^-1 X^T y when k >= d, else X^T (X X^T)^-1 y.
function leastSquares(X, y, d) {
  if (X.length === 0) return new Array(d).fill(0);
  if (X.length >= d) {
    const G = Array.from({ length: d }, (_, a) => Array.from({ length: d }, (_, b) =>
      X.reduce((s, row) => s + row[a] * row[b], 0)));
    const c = Array.from({ length: d }, (_, a) => X.reduce((s, row, i) => s + row[a] * y[i], 0));
    return solve(G, c);
  }
  const alpha = solve(X.map((u) => X.map((v) => dot(u, v))), y);
  return Array.from({ length: d }, (_, a) => X.reduce((s, row, i) => s + row[a] * alpha[i], 0));
}

// Each solver's prediction at every position of one prompt, from the pairs before it.
function solverPredictions(X, y, d) {
  const ls = [], avg = [];
  for (let i = 0; i < X.length; i++) {
    ls.push(dot(leastSquares(X.slice(0, i), y.slice(0, i), d), X[i]));
    const w = new Array(d).fill(0);
    for (let j = 0; j < i; j++) for (let a = 0; a < d; a++) w[a] += (y[j] * X[j][a]) / i;
    avg.push(dot(w, X[i]));
  }
  return { "least squares": ls, averaging: avg };
}

function promptRows(xs, ys, p, n, d) {
  const X = [], y = [];
  for (let i = 0; i < n; i++) {
    X.push(Array.from(xs.subarray((p * n + i) * d, (p * n + i + 1) * d)));
    y.push(ys[p * n + i]);
  }
  return { X, y };
}

// ---------------------------------------------------------------- charts

function drawChart(canvas, { series, xlabel, ylabel, vline, dot: marker }) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  const m = { l: 58, r: 12, t: 12, b: 42 };
  ctx.clearRect(0, 0, W, H);
  const xs = series.flatMap((s) => s.x), ys = series.flatMap((s) => s.y).filter((v) => v > 0);
  if (!ys.length) return;
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const lo = Math.max(Math.floor(Math.log10(Math.min(...ys))), -7);
  const hi = Math.max(Math.ceil(Math.log10(Math.max(...ys))), lo + 1);
  const X = (x) => m.l + ((x - x0) / (x1 - x0 || 1)) * (W - m.l - m.r);
  const height = (y) => (Math.log10(Math.max(y, 10 ** lo)) - lo) / (hi - lo);
  const Y = (y) => H - m.b - height(y) * (H - m.t - m.b);
  ctx.font = "12px system-ui, sans-serif";
  ctx.strokeStyle = "#e4e4e4";
  ctx.fillStyle = "#555";
  ctx.textAlign = "right";
  for (let e = lo; e <= hi; e++) {
    ctx.beginPath(); ctx.moveTo(m.l, Y(10 ** e)); ctx.lineTo(W - m.r, Y(10 ** e)); ctx.stroke();
    ctx.fillText(`1e${e}`, m.l - 6, Y(10 ** e) + 4);
  }
  ctx.textAlign = "center";
  const step = x1 - x0 <= 12 ? 1 : Math.ceil((x1 - x0) / 50) * 5; // about ten ticks
  for (let x = Math.ceil(x0 / step) * step; x <= x1; x += step) ctx.fillText(x, X(x), H - m.b + 16);
  ctx.fillText(xlabel, (m.l + W - m.r) / 2, H - 6);
  ctx.save(); ctx.translate(14, (m.t + H - m.b) / 2); ctx.rotate(-Math.PI / 2);
  ctx.fillText(ylabel, 0, 0); ctx.restore();
  if (vline) {
    ctx.setLineDash([5, 4]); ctx.strokeStyle = "#888";
    ctx.beginPath(); ctx.moveTo(X(vline), m.t); ctx.lineTo(X(vline), H - m.b); ctx.stroke();
    ctx.setLineDash([]);
  }
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = s.width || 2;
    ctx.beginPath();
    s.x.forEach((x, i) => (i ? ctx.lineTo(X(x), Y(s.y[i])) : ctx.moveTo(X(x), Y(s.y[i]))));
    ctx.stroke();
  }
  ctx.textAlign = "left"; // the legend, on a box over the lines
  const width = Math.max(...series.map((s) => ctx.measureText(s.label).width)) + 12;
  ctx.fillStyle = "rgba(255, 255, 255, 0.85)";
  ctx.fillRect(W - m.r - width - 4, m.t + 2, width, 16 * series.length + 6);
  series.forEach((s, k) => {
    ctx.fillStyle = s.color;
    ctx.fillText(s.label, W - m.r - width + 2, m.t + 14 + 16 * k);
  });
  ctx.lineWidth = 1;
  if (marker) {
    ctx.fillStyle = "#000";
    ctx.beginPath(); ctx.arc(X(marker[0]), Y(marker[1]), 4, 0, 2 * Math.PI); ctx.fill();
  }
}

// ---------------------------------------------------------------- the page

const fmt = (v) => (Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(3) : v.toExponential(1));
const vec = (w) => `(${w.map((v) => v.toFixed(2)).join(", ")})`;

function showModel() {
  const { meta } = state, c = meta.config;
  const rows = {
    file: `${MODEL_URL}, ${(meta.bytes / 1e6).toFixed(2)} MB`,
    task: meta.task,
    "d, points": `${meta.d}, up to ${meta.n} pairs`,
    "b, T": `${meta.b} loops trained, the last ${c.loop_window} in the loss`,
    model: `D ${c.n_embd}, ${c.n_head} heads, ${c.n_layer} block(s) looped`,
    training: `${c.steps} steps, ${c.preset} preset, seed ${c.seed}`,
    "load time": `${meta.loadMs.toFixed(0)} ms (onnxruntime-web and the model)`,
    "last call": "-",
    "loop sweep": "-",
  };
  $("meta").replaceChildren(...Object.entries(rows).flatMap(([k, v]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    dd.id = `meta-${k.replace(/\W+/g, "-")}`;
    return [dt, dd];
  }));
}

async function showLoops(loops) {
  const { meta, prompts, solvers } = state, { d, n } = meta;
  $("loops-value").textContent = loops;
  const { preds, ms } = await predict(prompts.xs, prompts.ys, BATCH, n, loops);
  $("meta-last-call").textContent = `${ms.toFixed(1)} ms for ${BATCH} prompts at ${loops} loops`;
  const err = (p, i) => (p - prompts.ys[i]) ** 2 / meta.normaliser;
  const mean = (f) => Array.from({ length: n }, (_, k) =>
    Array.from({ length: BATCH }, (_, p) => f(p, k)).reduce((s, v) => s + v, 0) / BATCH);
  const ks = Array.from({ length: n }, (_, k) => k);
  const model = mean((p, k) => err(preds[p * n + k], p * n + k));
  const series = [{ label: `model, ${loops} loops`, x: ks, y: model, color: "#1f77b4", width: 3 }];
  ["least squares", "averaging"].forEach((name, s) => series.push({
    label: name, x: ks, y: mean((p, k) => err(solvers[p][name][k], p * n + k)),
    color: ["#ff7f0e", "#2ca02c"][s],
  }));
  drawChart($("chart-k"), {
    series, xlabel: "k, examples before the query", ylabel: "normalised squared error",
  });
  $("model-column").textContent = `model, ${loops} loops`;
  const { X, y } = promptRows(prompts.xs, prompts.ys, 0, n, d);
  $("prompt").tBodies[0].replaceChildren(...X.map((x, k) => {
    const tr = document.createElement("tr");
    for (const v of [k, vec(x), fmt(y[k]), fmt(preds[k]), fmt(solvers[0]["least squares"][k]),
      fmt(solvers[0].averaging[k])]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    return tr;
  }));
  drawLoopChart();
}

function drawLoopChart() {
  const { curve, meta } = state, loops = Number($("loops").value);
  if (!curve.length) return;
  const x = curve.map((_, i) => i + 1);
  drawChart($("chart-loops"), {
    series: [{ label: `model, k = ${meta.n - 1}`, x, y: curve, color: "#1f77b4" }],
    xlabel: "loop iteration", ylabel: "normalised squared error", vline: meta.b,
    dot: loops <= curve.length ? [loops, curve[loops - 1]] : null,
  });
}

// The shown prompt's error at its last position after 1, 2, ..., 5 b loops, drawn as it grows.
async function sweepLoops(seed) {
  const { meta, prompts } = state, { d, n } = meta, last = n - 1;
  const xs = prompts.xs.subarray(0, n * d), ys = prompts.ys.subarray(0, n);
  const t0 = performance.now();
  for (let t = 1; t <= 5 * meta.b; t++) {
    const { preds } = await predict(xs, ys, 1, n, t);
    if (state.seed !== seed) return; // another prompt was drawn meanwhile
    state.curve.push((preds[last] - ys[last]) ** 2 / meta.normaliser);
    if (t % 5 === 0 || t === 5 * meta.b) drawLoopChart();
  }
  $("meta-loop-sweep").textContent =
    `${(performance.now() - t0).toFixed(0)} ms for the ${5 * meta.b} calls of the curve`;
}

async function showPrompt(seed) {
  const { meta } = state, { d, n } = meta;
  state.seed = seed;
  $("seed").textContent = seed;
  state.prompts = drawPrompts(seed, BATCH, n, d, TASKS[meta.task]);
  state.solvers = Array.from({ length: BATCH }, (_, p) => {
    const { X, y } = promptRows(state.prompts.xs, state.prompts.ys, p, n, d);
    return solverPredictions(X, y, d);
  });
  const { X, y } = promptRows(state.prompts.xs, state.prompts.ys, 0, n, d);
  $("w-true").textContent = vec(state.prompts.ws[0]);
  $("w-ls").textContent = vec(leastSquares(X, y, d));
  state.curve = [];
  await showLoops(Number($("loops").value));
  await sweepLoops(seed);
}

async function main() {
  await load();
  const { meta } = state;
  $("trained-b").textContent = meta.b;
  $("loops").max = 5 * meta.b;
  $("loops").value = meta.b;
  showModel();
  $("status").textContent = `Ready: ${meta.task}, d = ${meta.d}, b = ${meta.b}.`;
  for (const id of ["draw", "loops"]) $(id).disabled = false;
  $("draw").onclick = () => showPrompt(Math.floor(Math.random() * 1e6));
  $("loops").oninput = () => showLoops(Number($("loops").value));
  await showPrompt(Number(params.get("seed") || 1));
}

// For tests and the console: looped.predict(xs (B, n, d) nested arrays, ys (B, n), loops)
// resolves to the predictions (B, n) as nested arrays.
const ready = main();
window.looped = {
  ready,
  predict: async (xs, ys, loops) => {
    await ready;
    const B = xs.length, n = xs[0].length;
    const flat = [Float32Array.from(xs.flat(2)), Float32Array.from(ys.flat())];
    const { preds } = await predict(...flat, B, n, loops);
    return Array.from({ length: B }, (_, p) => Array.from(preds.subarray(p * n, (p + 1) * n)));
  },
};
ready.catch((e) => fail(e.message || e));
