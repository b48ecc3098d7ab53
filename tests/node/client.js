// A gRPC caller fetchpool did not write: @grpc/grpc-js and @grpc/proto-loader with default
// channel options (unless the job gives some), loading proto/fetchpool/v1/fetch.proto.
//
//   node client.js '<job JSON>'
//
// job: {target, rpc: "Fetch"|"FetchMany"|"FetchStream"|"FetchManyPacked"|"FetchStreamPacked",
//       requests: [FetchRequest...],
//       concurrency, max_message_bytes, deadline_ms, channel_options: {...}, proto_path: [dirs],
//       steps: [{send: i} | {await: n} | {sleep_ms: ms}]  (FetchStream only; default: send all)}
// Prints one JSON line per whole result ({id, index, status_code, error_kind, error_message,
// body_size, body_length, sha256, parts, encoding, text_length, text_sha256}), then one
// {"done": true, code, details, error_info_reason, retry_delay_seconds, field_violations}.
// Large results are joined with the README's own snippet (the ```js block after
// "<!-- node-reassembly -->"), so the README shows code that works.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const ROOT = path.resolve(__dirname, '..', '..');
const job = JSON.parse(process.argv[2]);
const LOAD = { keepCase: true, defaults: true, longs: String, enums: String, includeDirs: job.proto_path || [] };

const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
const snippet = readme.split('<!-- node-reassembly -->')[1].match(/```js\n([\s\S]*?)```/)[1];
const wholeResults = new Function(`${snippet}\nreturn wholeResults;`)();

const fetchpool = grpc.loadPackageDefinition(
  protoLoader.loadSync(path.join(ROOT, 'proto/fetchpool/v1/fetch.proto'), LOAD)).fetchpool.v1;
const client = new fetchpool.FetchService(job.target, grpc.credentials.createInsecure(), job.channel_options || {});
const started = Date.now();
const options = job.deadline_ms ? { deadline: new Date(started + job.deadline_ms) } : {};
const partsSeen = new Map();

function print(result) {
  const text = Buffer.from(result.text || '', 'utf8');
  console.log(JSON.stringify({
    id: result.id, index: result.index, status_code: result.status_code,
    error_kind: result.error ? result.error.kind : '', error_message: result.error ? result.error.message : '',
    body_size: Number(result.body_size), body_length: result.body.length,
    sha256: crypto.createHash('sha256').update(result.body).digest('hex'),
    parts: partsSeen.get(result.index) || 1, encoding: result.encoding,
    text_length: text.length, text_sha256: crypto.createHash('sha256').update(text).digest('hex'),
    elapsed_ms: Date.now() - started,
  }));
}

function statusDetails(error) {
  // google.rpc.Status from the grpc-status-details-bin trailer, decoded with protobufjs.
  const out = {};
  const raw = error && error.metadata && error.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return out;
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) =>
    LOAD.includeDirs.map((dir) => path.join(dir, target)).find((file) => fs.existsSync(file)) || target;
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  for (const any of root.lookupType('google.rpc.Status').decode(raw).details) {
    const name = any.type_url.split('/').pop();
    if (!['google.rpc.ErrorInfo', 'google.rpc.RetryInfo', 'google.rpc.BadRequest'].includes(name)) continue;
    const type = root.lookupType(name);
    const detail = type.toObject(type.decode(any.value), { longs: Number, defaults: true });
    if (name === 'google.rpc.ErrorInfo') Object.assign(out, { error_info_reason: detail.reason, error_info_metadata: detail.metadata });
    if (name === 'google.rpc.RetryInfo') out.retry_delay_seconds = detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9;
    if (name === 'google.rpc.BadRequest') out.field_violations = detail.field_violations.map((v) => v.field);
  }
  return out;
}

let finished = false;
function done(error) {
  if (finished) return;  // grpc-js may emit 'end' after 'error'
  finished = true;
  const line = { done: true, code: error ? error.code : 0, details: error ? error.details : '', elapsed_ms: Date.now() - started };
  console.log(JSON.stringify(Object.assign(line, statusDetails(error))));
  client.close();
}

function countParts(call) {
  const count = (message) => partsSeen.set(message.index, message.part + 1);
  call.on('data', (message) => (message.results ? message.results.forEach(count) : count(message)));
}

if (job.rpc === 'Fetch') {
  client.Fetch(job.requests[0], options, (error, result) => {
    if (result) print(result);
    done(error);
  });
} else if (job.rpc.startsWith('FetchMany')) {
  const call = client[job.rpc](
    { requests: job.requests, concurrency: job.concurrency || 0, max_message_bytes: job.max_message_bytes || 0 }, options);
  countParts(call);
  wholeResults(call, print);
  call.on('error', done);
  call.on('end', () => done(null));
} else {
  const call = client[job.rpc](options);
  countParts(call);
  let received = 0;
  const waiters = [];
  wholeResults(call, (result) => {
    print(result);
    received += 1;
    while (waiters.length && waiters[0].n <= received) waiters.shift().resolve();
  });
  let failed = false;
  call.on('error', (error) => { failed = true; done(error); });
  call.on('end', () => { if (!failed) done(null); });
  const steps = job.steps || job.requests.map((_, i) => ({ send: i }));
  (async () => {
    for (const step of steps) {
      if (failed) return;
      if ('send' in step) {
        const request = job.requests[step.send];
        call.write(job.rpc.endsWith('Packed') ? { requests: [request] } : request);
      }
      if ('await' in step) await new Promise((resolve) => (received >= step.await ? resolve() : waiters.push({ n: step.await, resolve })));
      if ('sleep_ms' in step) await new Promise((resolve) => setTimeout(resolve, step.sleep_ms));
    }
    call.end();
  })();
}
