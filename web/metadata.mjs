// An ONNX model's metadata_props (ModelProto field 14, each a key (1) and a value (2)), read from
// its protobuf bytes, every other field skipped whole: export.py describes the model there (task,
// n_dims, max_points, n_loops, every_loop, ...), and onnxruntime-web does not expose it. For the
// page (app.js) and Node.js (predict.mjs).
export function onnxMetadata(bytes) {
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
