// One retried call through gmv_proto.js's helpers, for tests/test_client_retry.py: prints one JSON
// object with the outcome, the time it took and each retry's sleep.
//   node retry_probe.js '{"target": "127.0.0.1:50051", "method": "Attribute" | "GetIndexInfo" | ...,
//                         "request": {...}, "options": {"timeoutMs": 5000, ...}}'
'use strict';
const { grpc, attribute, unary, createClient } = require('./gmv_proto');

async function main() {
  const { target, method, request = {}, options = {} } = JSON.parse(process.argv[2]);
  const client = createClient(target, grpc.credentials.createInsecure(), options);
  const retries = [];
  const onRetry = ({ attempt, delayMs, error }) => retries.push({ attempt, delayMs, code: grpc.status[error.code] });
  const started = Date.now();
  const outcome = { ok: false, code: 'OK', details: '', credits: 0 };
  try {
    const reply = method === 'Attribute'
      ? await attribute(client, request, { ...options, onRetry })
      : await unary(client, method, request, { ...options, onRetry });
    Object.assign(outcome, { ok: true, credits: Array.isArray(reply) ? reply.length : 0 });
  } catch (error) {
    Object.assign(outcome, { code: grpc.status[error.code], details: error.details || String(error) });
  }
  console.log(JSON.stringify({ ...outcome, elapsedMs: Date.now() - started, retries }));
  client.close();
}

main().catch((error) => { console.error(error); process.exit(1); });
