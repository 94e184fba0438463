// Run an exported looped transformer in Node.js: onnxruntime-web's wasm backend, the package the
// page loads, and any export.py graph. Prompts in, predictions out, as JSON:
//
//   npm ci --prefix web
//   node web/predict.mjs linreg.onnx prompts.json > predictions.json
//
// prompts.json: {"xs": (batch, n, d) nested lists, "ys": (batch, n), "loops": L}, "loops" for a
// --dynamic-loops graph only. Prints {"preds": (batch, n)}, entry i predicting y_i from the pairs
// before it, and the graph's other outputs as it has them: "loops" (batch,) of an
// --until-converged graph, "every" (batch, L, n) of an --every-loop one. A mistake is one line on
// stderr and exit code 2.
import { readFile } from "node:fs/promises";
import * as ort from "onnxruntime-web";

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

// The prompts as float32 tensors, or a failure that says what is wrong with them.
function tensors(request, path) {
  const { xs, ys } = request;
  const B = xs?.length, n = xs?.[0]?.length, d = xs?.[0]?.[0]?.length;
  if (!Array.isArray(xs) || !Array.isArray(ys) || !B || !n || !d) {
    fail(`${path} needs "xs", (batch, n, d) nested lists, and "ys", (batch, n)`);
  }
  const flatX = xs.flat(2), flatY = ys.flat();
  const rectangular = xs.every((x) => x.length === n && x.every((p) => p.length === d)) &&
    ys.length === B && ys.every((y) => y.length === n);
  if (!rectangular || flatX.length !== B * n * d || flatY.length !== B * n) {
    fail(`${path}: "xs" must be (batch, n, d) and "ys" (batch, n), each row as long as the first`);
  }
  if (![...flatX, ...flatY].every((v) => typeof v === "number" && Number.isFinite(v))) {
    fail(`${path}: "xs" and "ys" must hold finite numbers only`);
  }
  return {
    xs: new ort.Tensor("float32", Float32Array.from(flatX), [B, n, d]),
    ys: new ort.Tensor("float32", Float32Array.from(flatY), [B, n]),
  };
}

const [model, prompts, ...extra] = process.argv.slice(2);
if (!model || !prompts || extra.length) fail("usage: node web/predict.mjs MODEL.onnx PROMPTS.json");
let request, bytes;
try {
  request = JSON.parse(await readFile(prompts, "utf8"));
} catch (e) {
  fail(`cannot read the prompts in ${prompts}: ${firstLine(e)}`);
}
try {
  bytes = await readFile(model);
} catch (e) {
  fail(`cannot read ${model}: ${firstLine(e)}`);
}
const feeds = tensors(request, prompts);
ort.env.wasm.numThreads = 1; // the page's setting; Node's wasm threads gain little at this size
let session;
try {
  session = await ort.InferenceSession.create(bytes);
} catch (e) {
  fail(`${model} is not a loadable ONNX model: ${firstLine(e)}`);
}
const { loops } = request;
if (session.inputNames.includes("n_loops")) {
  if (!Number.isInteger(loops) || loops < 1 || loops > 10000) {
    fail(`${model} takes the loop count: give "loops", a whole number from 1 to 10,000`);
  }
  feeds.n_loops = new ort.Tensor("int64", BigInt64Array.from([BigInt(loops)]), []);
} else if (loops !== undefined) {
  fail(`${model} runs its own loop count: export it with --dynamic-loops to choose "loops"`);
}
let out;
try {
  out = await session.run(feeds);
} catch (e) {
  fail(`${model} could not run these prompts (is d, or n, beyond what it takes?): ${firstLine(e)}`);
}
const result = Object.fromEntries(
  session.outputNames.map((name) => [name, nested(out[name].data, out[name].dims)]));
process.stdout.write(`${JSON.stringify(result)}\n`);
