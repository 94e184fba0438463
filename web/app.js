// The page: onnxruntime-web runs a looped transformer exported by `python export.py RUN_DIR
// --dynamic-loops --every-loop` on prompts drawn here, beside least squares and averaging, and
// gradient descent and Newton's iteration step by step, all computed here. Inference runs in
// onnxruntime-web's proxy worker, off the main thread, so the page never freezes; one call at 5 b
// loops returns the predictions after every loop, so the slider only redraws.
// Query parameters: ?model=URL (default linreg.onnx), ?seed=N, ?ort=URL of onnxruntime-web's
// dist/ folder (default: the pinned CDN copy; the browser test passes its local npm copy).
import { onnxMetadata } from "./metadata.mjs";

const ORT_CDN = "https://cdn.jsdelivr.net/npm/onnxruntime-web@1.31.1/dist/";
const params = new URLSearchParams(location.search);
const ORT_BASE = new URL(params.get("ort") || ORT_CDN, location.href).href.replace(/\/?$/, "/");
const MODEL_URL = params.get("model") || "linreg.onnx";
// A seed is a whole number below 2^32 (the generator's state); anything else is seed 1.
const SEED = /^\d{1,10}$/.test(params.get("seed") || "") && params.get("seed") < 2 ** 32
  ? Number(params.get("seed")) : 1;
const BATCH = 64; // prompts per seed: the charts show their mean
// The linear-regression tasks of looped.py: w ~ N(0, I), x ~ N(0, I), y = w . x (+ noise).
const TASKS = { linreg: {}, noisy_linreg: { noise: 0.1 }, sparse_linreg: { sparse: 3 } };

const $ = (id) => document.getElementById(id);
const state = { session: null, meta: null, calls: Promise.resolve(), drawn: 0, runs: 0 };

// ---------------------------------------------------------------- errors: one line in the page

// A failure at loading leaves the page without a model; one later (a run) keeps the last charts.
function fail(message, fatal = true) {
  const line = String(message).split("\n")[0].slice(0, 400);
  $("error").textContent = line;
  $("error").hidden = false;
  if (!fatal) return;
  $("status").hidden = true;
  for (const id of ["draw", "loops", "own"]) $(id).disabled = true;
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

async function load() {
  const t0 = performance.now();
  await loadScript(`${ORT_BASE}ort.wasm.min.js`);
  ort.env.wasm.wasmPaths = ORT_BASE;
  ort.env.wasm.numThreads = 1; // threads need a cross-origin-isolated page; one is plenty here
  ort.env.wasm.proxy = true; // inference in onnxruntime-web's worker: the page never waits on it
  const response = await fetch(MODEL_URL).catch((e) => {
    throw new Error(`could not fetch the model ${MODEL_URL}: ${e.message}`);
  });
  if (!response.ok) {
    throw new Error(`could not fetch the model ${MODEL_URL}: HTTP ${response.status}`);
  }
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (!bytes.length) throw new Error(`${MODEL_URL} is empty: it holds no model`);
  const size = bytes.length; // before the worker takes the buffer
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
  if (meta.n_loops !== "dynamic" || meta.every_loop !== "True") {
    throw new Error(`${MODEL_URL} is not the page's kind of graph: export it with ` +
      "--dynamic-loops --every-loop, so that the page can set the loop count and draw every loop");
  }
  try {
    state.session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  } catch (e) {
    const why = String(e.message || e).split("\n")[0];
    if (/backend|wasm|fetch|worker/i.test(why)) {
      throw new Error(`onnxruntime-web could not start its wasm backend from ${ORT_BASE}`);
    }
    throw new Error(`${MODEL_URL} is corrupt: onnxruntime-web cannot read its graph`);
  }
  meta.config = JSON.parse(meta.config || "{}");
  meta.bytes = size;
  meta.d = Number(meta.n_dims);
  meta.n = Number(meta.max_points);
  meta.b = Number(meta.trained_loops);
  meta.normaliser = Number(meta.error_normaliser);
  state.meta = meta;
  await checkGraph();
  meta.loadMs = performance.now() - t0;
  performance.mark("model loaded"); // read by `python bench.py page`
}

// The graph against its metadata: its inputs and outputs by name, then one prompt at the largest
// n, whose predictions must have the shapes the metadata implies.
async function checkGraph() {
  const { d, n } = state.meta, names = (list) => list.join(", ");
  const inputs = names(state.session.inputNames), outputs = names(state.session.outputNames);
  if (inputs !== "xs, ys, n_loops" || outputs !== "preds, every") {
    throw new Error(`${MODEL_URL} has inputs (${inputs}) and outputs (${outputs}), not those ` +
      "of a looped export (xs, ys, n_loops; preds, every)");
  }
  const { dims } = await predict(new Float32Array(n * d), new Float32Array(n), 1, n, 2)
    .catch(() => {
      throw new Error(`onnxruntime-web could not run ${MODEL_URL} on one prompt of ${n} points ` +
        `(d = ${d}): its graph does not fit its metadata`);
    });
  if (String(dims.preds) !== `1,${n}` || String(dims.every) !== `1,2,${n}`) {
    throw new Error(`${MODEL_URL} returns predictions of shape (${dims.preds}) and every loop's ` +
      `(${dims.every}) for one prompt of ${n} points at 2 loops, not (1, ${n}) and (1, 2, ${n})`);
  }
}

// ---------------------------------------------------------------- the model

// One session.run at a time, in the worker: the page's calls queue behind each other, and one
// whose result is no longer wanted by the time its turn comes (stale() true) is skipped: it
// resolves to null. Returns the predictions after the last loop (B, n) and after every loop
// (B, loops, n), flat.
function predict(xs, ys, B, n, loops, stale = () => false) {
  const { d } = state.meta;
  const feeds = { // copies: the worker takes the buffers it is sent
    xs: new ort.Tensor("float32", xs.slice(), [B, n, d]),
    ys: new ort.Tensor("float32", ys.slice(), [B, n]),
    n_loops: new ort.Tensor("int64", BigInt64Array.from([BigInt(loops)]), []),
  };
  const call = state.calls.then(async () => {
    if (stale()) return null;
    state.runs += 1;
    const t0 = performance.now();
    let out;
    try {
      out = await state.session.run(feeds);
    } catch {
      throw new Error(`onnxruntime-web failed to run ${MODEL_URL} on ${B} prompt(s) of ${n} ` +
        `points at ${plural(loops, "loop")}; the charts show the last prompt it ran`);
    }
    const dims = { preds: out.preds.dims, every: out.every.dims };
    return { preds: out.preds.data, every: out.every.data, dims, ms: performance.now() - t0 };
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

// The largest eigenvalue of a symmetric matrix, by Jacobi rotations: exact to round-off.
function largestEigenvalue(S) {
  const A = S.map((row) => [...row]), d = A.length;
  for (let sweep = 0; sweep < 50; sweep++) {
    let off = 0, diagonal = 0;
    for (let p = 0; p < d; p++) {
      diagonal += A[p][p] ** 2;
      for (let q = p + 1; q < d; q++) off += A[p][q] ** 2;
    }
    if (off <= 1e-32 * diagonal) break;
    for (let p = 0; p < d; p++) {
      for (let q = p + 1; q < d; q++) {
        if (A[p][q] === 0) continue;
        const theta = (A[q][q] - A[p][p]) / (2 * A[p][q]); // the rotation that zeroes A[p][q]
        const t = (theta < 0 ? -1 : 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1), s = t * c;
        for (let k = 0; k < d; k++) { // A <- J^T A J: columns p and q, then rows p and q
          [A[k][p], A[k][q]] = [c * A[k][p] - s * A[k][q], s * A[k][p] + c * A[k][q]];
        }
        for (let k = 0; k < d; k++) {
          [A[p][k], A[q][k]] = [c * A[p][k] - s * A[q][k], s * A[p][k] + c * A[q][k]];
        }
      }
    }
  }
  return Math.max(...A.map((row, i) => row[i]));
}

// Gradient descent and Newton's iteration on rows X and targets y, as baselines.py runs them:
// G = X^T X and c = X^T y; w <- w - (G w - c) / lambda_max(G) from w = 0; M_0 = G / lambda_max^2,
// M <- 2 M - M G M, w = M c. Their predictions at x after each of 1 .. steps steps. Flat
// Float64Arrays, row-major: 64 prompts of 100 steps take a few ms, well inside a frame.
function iterates(X, y, x, steps) {
  const d = x.length, G = new Float64Array(d * d), c = new Float64Array(d);
  X.forEach((row, i) => {
    for (let a = 0; a < d; a++) {
      c[a] += row[a] * y[i];
      for (let b = 0; b < d; b++) G[a * d + b] += row[a] * row[b];
    }
  });
  const rows = Array.from({ length: d }, (_, a) => Array.from(G.subarray(a * d, (a + 1) * d)));
  const top = Math.max(largestEigenvalue(rows), 1e-12);
  const times = (A, B) => { // A B, d x d
    const out = new Float64Array(d * d);
    for (let i = 0; i < d; i++) {
      for (let k = 0; k < d; k++) {
        const aik = A[i * d + k];
        for (let j = 0; j < d; j++) out[i * d + j] += aik * B[k * d + j];
      }
    }
    return out;
  };
  const at = (M, v) => { // (M v) . x
    let s = 0;
    for (let a = 0; a < d; a++) for (let b = 0; b < d; b++) s += M[a * d + b] * v[b] * x[a];
    return s;
  };
  let w = new Float64Array(d), M = G.map((v) => v / top ** 2);
  const gd = [], newton = [];
  for (let t = 0; t < steps; t++) {
    const next = new Float64Array(d);
    for (let a = 0; a < d; a++) {
      let Gw = 0;
      for (let b = 0; b < d; b++) Gw += G[a * d + b] * w[b];
      next[a] = w[a] - (Gw - c[a]) / top;
    }
    w = next;
    const MGM = times(times(M, G), M);
    M = M.map((v, i) => 2 * v - MGM[i]);
    gd.push(dot(w, x));
    newton.push(at(M, c));
  }
  return { "gradient descent": gd, Newton: newton };
}

// At each step, the mean over the prompts of their values, and the middle 80% (rows: [prompt][t]).
function spread(rows) {
  return rows[0].map((_, t) => {
    const column = rows.map((row) => row[t]).sort((a, b) => a - b), P = column.length;
    const mean = column.reduce((s, v) => s + v, 0) / P;
    return [mean, column[Math.floor(0.1 * (P - 1))], column[Math.ceil(0.9 * (P - 1))]];
  });
}

// ---------------------------------------------------------------- charts

// A log-scale line chart, sharp at any devicePixelRatio, its legend above the plot with a sample
// of each line. series: [{label, x, y, color, width, dash, band: [lo, hi]}].
function drawChart(canvas, { series, xlabel, ylabel, vline, dot: marker, summary }) {
  const ratio = window.devicePixelRatio || 1, W = canvas.clientWidth || 520, H = W * 0.62;
  canvas.width = Math.round(W * ratio);
  canvas.height = Math.round(H * ratio);
  canvas.setAttribute("aria-label", summary);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.font = "12px system-ui, sans-serif";
  // The legend's rows: each entry a 22 px line sample and its label, wrapped to the width.
  const rows = [[]];
  let used = 0;
  for (const s of series) {
    const width = 30 + ctx.measureText(s.label).width + 14;
    if (used + width > W - 70 && rows.at(-1).length) {
      rows.push([]);
      used = 0;
    }
    rows.at(-1).push([s, used]);
    used += width;
  }
  const m = { l: 58, r: 12, t: 10 + 17 * rows.length, b: 42 };
  const values = series.flatMap((s) => [...s.y, ...(s.band ? s.band.flat() : [])]);
  const xs = series.flatMap((s) => s.x), ys = values.filter((v) => v > 0 && Number.isFinite(v));
  if (!ys.length) return;
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const lo = Math.max(Math.floor(Math.log10(Math.min(...ys))), -7);
  const hi = Math.max(Math.ceil(Math.log10(Math.max(...ys))), lo + 1);
  const X = (x) => m.l + ((x - x0) / (x1 - x0 || 1)) * (W - m.l - m.r);
  const height = (y) => (Math.log10(Math.max(y, 10 ** lo)) - lo) / (hi - lo);
  const Y = (y) => H - m.b - height(y) * (H - m.t - m.b);
  ctx.strokeStyle = "#e4e4e4";
  ctx.fillStyle = "#555";
  ctx.textAlign = "right";
  for (let e = lo; e <= hi; e++) {
    ctx.beginPath(); ctx.moveTo(m.l, Y(10 ** e)); ctx.lineTo(W - m.r, Y(10 ** e)); ctx.stroke();
    ctx.fillText(`1e${e}`, m.l - 6, Y(10 ** e) + 4);
  }
  ctx.textAlign = "center";
  const step = x1 - x0 <= 12 ? 1 : Math.ceil((x1 - x0) / 50) * 5; // about ten ticks
  for (let x = Math.ceil(x0 / step) * step; x <= x1; x += step) {
    ctx.fillText(x, X(x), H - m.b + 16);
  }
  ctx.fillText(xlabel, (m.l + W - m.r) / 2, H - 6);
  ctx.save(); ctx.translate(14, (m.t + H - m.b) / 2); ctx.rotate(-Math.PI / 2);
  ctx.fillText(ylabel, 0, 0); ctx.restore();
  if (vline) {
    ctx.setLineDash([5, 4]); ctx.strokeStyle = "#888";
    ctx.beginPath(); ctx.moveTo(X(vline), m.t); ctx.lineTo(X(vline), H - m.b); ctx.stroke();
    ctx.setLineDash([]);
  }
  for (const s of series.filter((s) => s.band)) { // the bands first, under every line
    ctx.fillStyle = s.color;
    ctx.globalAlpha = 0.15;
    ctx.beginPath();
    s.x.forEach((x, i) => ctx.lineTo(X(x), Y(s.band[1][i])));
    [...s.x].reverse().forEach((x, i) => ctx.lineTo(X(x), Y(s.band[0][s.x.length - 1 - i])));
    ctx.fill();
    ctx.globalAlpha = 1;
  }
  const stroke = (s, path) => {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = s.width || 2;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    path();
    ctx.stroke();
    ctx.setLineDash([]);
  };
  for (const s of series) {
    stroke(s, () => s.x.forEach((x, i) => {
      if (i) ctx.lineTo(X(x), Y(s.y[i]));
      else ctx.moveTo(X(x), Y(s.y[i]));
    }));
  }
  ctx.textAlign = "left";
  rows.forEach((row, r) => row.forEach(([s, left]) => {
    const y = 12 + 17 * r;
    stroke(s, () => { ctx.moveTo(m.l + left, y - 4); ctx.lineTo(m.l + left + 22, y - 4); });
    ctx.fillStyle = "#333";
    ctx.fillText(s.label, m.l + left + 28, y);
  }));
  ctx.lineWidth = 1;
  if (marker) {
    ctx.fillStyle = "#000";
    ctx.beginPath(); ctx.arc(X(marker[0]), Y(marker[1]), 4, 0, 2 * Math.PI); ctx.fill();
  }
}

// ---------------------------------------------------------------- the page

const fmt = (v) => (Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(3) : v.toExponential(1));
const vec = (w) => `(${w.map((v) => v.toFixed(2)).join(", ")})`;
const plural = (count, word) => `${count} ${word}${count === 1 ? "" : "s"}`;
const COLORS = { model: "#1f77b4", "least squares": "#ff7f0e", averaging: "#2ca02c",
  "gradient descent": "#d62728", Newton: "#9467bd" };

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
    "first chart": "-",
    "last call": "-",
  };
  $("meta").replaceChildren(...Object.entries(rows).flatMap(([k, v]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    dd.id = `meta-${k.replace(/\W+/g, "-")}`;
    return [dt, dd];
  }));
}

// A prompt's charts: the solvers here, then one call through 5 b loops in the worker, whose
// predictions after every loop the slider then reads without another call.
async function showPrompt(seed) {
  const { meta } = state, { d, n, b } = meta, T = 5 * b;
  const drawn = ++state.drawn, stale = () => drawn !== state.drawn; // a later click supersedes
  $("status").textContent = `Running ${BATCH} prompts of seed ${seed} through ${T} loops...`;
  const prompts = drawPrompts(seed, BATCH, n, d, TASKS[meta.task]);
  const call = predict(prompts.xs, prompts.ys, BATCH, n, T, stale); // in the worker, meanwhile:
  call.catch(() => {}); // a failure is handled below, once the solvers are done
  const rows = Array.from({ length: BATCH }, (_, p) =>
    promptRows(prompts.xs, prompts.ys, p, n, d));
  const solvers = [], steps = [];
  for (let p = 0; p < BATCH && !stale(); p += 4) { // 4 prompts a task: the page stays responsive
    await new Promise((next) => setTimeout(next));
    for (const { X, y } of rows.slice(p, p + 4)) {
      solvers.push(solverPredictions(X, y, d));
      steps.push(iterates(X.slice(0, -1), y.slice(0, -1), X[n - 1], T));
    }
  }
  let out;
  try {
    out = await call;
  } catch (e) {
    return stale() || failed(e.message);
  }
  if (stale() || !out) return;
  if (!out.every.every(Number.isFinite)) {
    return failed(`${MODEL_URL}'s predictions for seed ${seed} are not finite after some of ` +
      `the ${T} loops (they overflow); the charts show the last prompt whose were`);
  }
  Object.assign(state, { prompts, rows, solvers, steps, T, every: out.every, byLoop: null });
  $("error").hidden = true; // an earlier prompt's failure is over
  $("seed").textContent = seed;
  $("w-true").textContent = vec(prompts.ws[0]);
  $("w-ls").textContent = vec(leastSquares(rows[0].X, rows[0].y, d));
  $("meta-last-call").textContent =
    `${out.ms.toFixed(0)} ms for ${BATCH} prompts through ${T} loops, every loop returned`;
  $("status").textContent = `Ready: ${meta.task}, d = ${meta.d}, b = ${meta.b}.`;
  draw();
}

function failed(message) { // a prompt the model could not run: the page keeps the last one
  fail(message, false);
  $("status").textContent = `Ready: ${state.meta.task}, d = ${state.meta.d}, b = ${state.meta.b}.`;
}

// Both charts and the table from what showPrompt computed; at most once a frame.
function scheduleDraw() {
  $("loops-value").textContent = $("loops").value;
  if (state.frame || !state.every) return;
  state.frame = requestAnimationFrame(() => { state.frame = 0; draw(); });
}

function draw() {
  const { meta, prompts, solvers, T, every } = state, { n, b } = meta, last = n - 1;
  const loops = Number($("loops").value), P = BATCH, ks = Array.from({ length: n }, (_, k) => k);
  const model = (p, t, k) => every[(p * T + t - 1) * n + k]; // after loop t
  const err = (pred, p, k) => (pred - prompts.ys[p * n + k]) ** 2 / meta.normaliser;
  const mean = (f) => ks.map((k) => Array.from({ length: P }, (_, p) => f(p, k))
    .reduce((s, v) => s + v, 0) / P);
  const name = `model, ${plural(loops, "loop")}`;
  $("loops-value").textContent = loops;
  const byK = [{ label: name, x: ks, y: mean((p, k) => err(model(p, loops, k), p, k)),
    color: COLORS.model, width: 3 }];
  for (const s of ["least squares", "averaging"]) {
    const y = mean((p, k) => err(solvers[p][s][k], p, k));
    byK.push({ label: s, x: ks, y, color: COLORS[s] });
  }
  const shownK = [Math.min(meta.d, last), last];
  drawChart($("chart-k"), { series: byK, xlabel: "k, examples before the query",
    ylabel: "normalised squared error", summary: summarise(byK, "at k = ", shownK) });
  // Against loops: the same for every loop count, computed once a prompt (byLoop), and the dot.
  state.byLoop ||= againstLoops();
  const byLoop = [...state.byLoop.series];
  if ($("own").checked) {
    byLoop.push({ label: "the shown prompt, model", x: byLoop[0].x, y: state.byLoop.own,
      color: "#000", width: 1, dash: [3, 3] });
  }
  drawChart($("chart-loops"), { series: byLoop, xlabel: "loop iteration (a step of each solver)",
    ylabel: `normalised squared error, k = ${last}`, vline: b, dot: [loops, byLoop[0].y[loops - 1]],
    summary: summarise(byLoop, "after loop ", [1, b, T]) });
  $("model-column").textContent = name;
  const { X, y } = state.rows[0];
  $("prompt").tBodies[0].replaceChildren(...X.map((x, k) => {
    const tr = document.createElement("tr");
    for (const v of [k, vec(x), fmt(y[k]), fmt(model(0, loops, k)),
      fmt(solvers[0]["least squares"][k]), fmt(solvers[0].averaging[k])]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    return tr;
  }));
  if ($("meta-first-chart").textContent === "-") {
    const { startTime } = performance.mark("first chart"); // read by `python bench.py page`
    $("meta-first-chart").textContent = `${startTime.toFixed(0)} ms after the page opened`;
  }
}

// The error at the last position after each loop: the model's, gradient descent's and Newton's
// (one step a loop), each a mean over the prompts with the band of the middle 80%; and the shown
// prompt's own, the model's.
function againstLoops() {
  const { meta, prompts, steps, T, every } = state, { n } = meta, last = n - 1;
  const err = (pred, p) => (pred - prompts.ys[p * n + last]) ** 2 / meta.normaliser;
  const model = (p, t) => every[(p * T + t - 1) * n + last]; // after loop t
  const ts = Array.from({ length: T }, (_, t) => t + 1);
  const curves = {
    model: Array.from({ length: BATCH }, (_, p) => ts.map((t) => err(model(p, t), p))),
  };
  for (const s of ["gradient descent", "Newton"]) {
    curves[s] = steps.map((st, p) => st[s].map((pred) => err(pred, p)));
  }
  const series = Object.entries(curves).map(([label, rows]) => {
    const stats = spread(rows);
    return { label: label === "model" ? "model (mean, middle 80%)" : label, x: ts,
      y: stats.map((s) => s[0]), band: [stats.map((s) => s[1]), stats.map((s) => s[2])],
      color: COLORS[label], width: label === "model" ? 3 : 2 };
  });
  return { series, own: curves.model[0] };
}

// A chart in words, for a screen reader: each line's value at a few x.
function summarise(series, where, at) {
  const points = [...new Set(at.map(Math.round))];
  return series.map((s) => `${s.label}: ` + points.map((x) =>
    `${where}${x} ${fmt(s.y[s.x.indexOf(x)] ?? NaN)}`).join(", ")).join("; ");
}

async function main() {
  await load();
  const { meta } = state;
  $("trained-b").textContent = meta.b;
  $("loops").max = 5 * meta.b;
  $("loops").value = meta.b;
  showModel();
  for (const id of ["draw", "loops", "own"]) $(id).disabled = false;
  $("draw").onclick = () => showPrompt(Math.floor(Math.random() * 1e6));
  $("loops").oninput = scheduleDraw;
  $("own").onchange = scheduleDraw;
  window.addEventListener("resize", scheduleDraw);
  await showPrompt(SEED);
}

// For tests and the console: looped.predict(xs (B, n, d) nested arrays, ys (B, n), loops)
// resolves to the predictions (B, n) as nested arrays; looped.iterates(xs, ys, steps) to each
// prompt's gradient-descent and Newton predictions at its last position after every step;
// looped.runs() counts the model's calls.
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
  runs: () => state.runs, // the model calls run so far, the skipped ones not counted
  iterates: (xs, ys, steps) => xs.map((X, p) =>
    iterates(X.slice(0, -1), ys[p].slice(0, -1), X.at(-1), steps)),
};
ready.catch((e) => fail(e.message || e));
