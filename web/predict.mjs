// Run an exported looped transformer in Node.js: onnxruntime-web's wasm backend, the package the
// page loads, and any export.py graph. Prompts in, predictions out, as JSON:
//
//   npm ci --prefix web
//   node web/predict.mjs linreg.onnx prompts.json > predictions.json
//
// prompts.json: {"xs": (batch, n, d) nested lists, "ys": (batch, n), "n_loops": L}, "n_loops" for
// a --dynamic-loops graph only. Prints {"preds": (batch, n)}, entry i predicting y_i from the pairs
// before it, and the graph's other outputs as it has them: "loops" (batch,), the loops each prompt
// of an --until-converged graph used, and "every" (batch, L, n) of an --every-loop one. A mistake
// is one line on stderr and exit code 2.
import { readFile } from "node:fs/promises";
import * as ort from "onnxruntime-web";
import { onnxMetadata } from "./metadata.mjs";

function fail(message) {
  console.error(`predict.mjs: ${message}`);
  process.exit(2);
}

function firstLine(e) {
  return String(e.message || e).split("\n")[0];
}

// A flat typed array as nested lists of the given dims; int64 values become numbers.
function nested(data, dims) {
  if (dims.length <= 1) return Array.from(data, Number);
  const size = dims.slice(1).reduce((a, b) => a * b, 1);
  return Array.from({ length: dims[0] }, (_, i) =>
    nested(data.subarray(i * size, (i + 1) * size), dims.slice(1)));
}

// The prompts as float32 tensors, checked as Predictor checks them, or a failure that says what
// is wrong with them.
function tensors(request, path, meta) {
  const { xs, ys } = request;
  const rows = (a, length) => Array.isArray(a) && a.length === length;
  const B = xs?.length, n = xs?.[0]?.length, d = xs?.[0]?.[0]?.length;
  if (!Array.isArray(xs) || !Array.isArray(ys) || !B || !n || !d) {
    fail(`${path} needs "xs", (batch, n, d) nested lists, and "ys", (batch, n)`);
  }
  if (!xs.every((x) => rows(x, n) && x.every((p) => rows(p, d))) || !rows(ys, B) ||
    !ys.every((y) => rows(y, n))) {
    fail(`${path}: "xs" must be (batch, n, d) and "ys" (batch, n), each row as long as the first`);
  }
  const flatX = xs.flat(2), flatY = ys.flat();
  // Finite in float32, as the graph computes: 1e300 is a number, and infinite there.
  if (![...flatX, ...flatY].every((v) => typeof v === "number" && Number.isFinite(Math.fround(v)))) {
    fail(`${path}: "xs" and "ys" must hold numbers within float32's range (3.4e38) only`);
  }
  if (d !== Number(meta.n_dims)) fail(`xs has d = ${d}, the model takes d = ${meta.n_dims}`);
  if (n > Number(meta.max_points)) {
    fail(`prompts have ${n} points; the model takes 1 to ${meta.max_points}`);
  }
  return {
    xs: new ort.Tensor("float32", Float32Array.from(flatX), [B, n, d]),
    ys: new ort.Tensor("float32", Float32Array.from(flatY), [B, n]),
  };
}

const [model, prompts, ...extra] = process.argv.slice(2);
if (!model || !prompts || extra.length) fail("usage: node web/predict.mjs MODEL.onnx PROMPTS.json");
let request, bytes, meta;
try {
  request = JSON.parse(await readFile(prompts, "utf8"));
} catch (e) {
  fail(`cannot read the prompts in ${prompts}: ${firstLine(e)}`);
}
if (typeof request !== "object" || request === null || Array.isArray(request)) {
  fail(`${prompts} must hold an object: {"xs": ..., "ys": ...}`);
}
try {
  bytes = await readFile(model);
  meta = onnxMetadata(bytes);
} catch (e) {
  fail(`cannot read ${model}: ${firstLine(e)}`);
}
if (!meta.n_dims || !meta.max_points) {
  fail(`${model} has no looped metadata: was it made by export.py?`);
}
const feeds = tensors(request, prompts, meta);
ort.env.wasm.numThreads = 1; // the page's setting; threads gain little at this size
let session;
try {
  session = await ort.InferenceSession.create(bytes);
} catch (e) {
  fail(`${model} is not a loadable ONNX model: ${firstLine(e)}`);
}
const loops = request.n_loops;
if (meta.n_loops === "dynamic") {
  if (!Number.isInteger(loops) || loops < 1 || loops > 10000) {
    fail(`${model} takes the loop count: give "n_loops", a whole number from 1 to 10,000`);
  }
  feeds.n_loops = new ort.Tensor("int64", BigInt64Array.from([BigInt(loops)]), []);
} else if (loops !== undefined) {
  fail(meta.n_loops === "adaptive"
    ? `${model} stops each prompt when it has converged: leave "n_loops" out`
    : `${model} runs ${meta.n_loops} loops: leave "n_loops" out, or export with --dynamic-loops`);
}
let out;
try {
  out = await session.run(feeds);
} catch (e) {
  fail(`onnxruntime-web failed to run ${model}: ${firstLine(e)}`);
}
const result = Object.fromEntries(
  session.outputNames.map((name) => [name, nested(out[name].data, out[name].dims)]));
process.stdout.write(`${JSON.stringify(result)}\n`);
