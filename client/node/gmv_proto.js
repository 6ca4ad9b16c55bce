// The gmv.v1 package loaded from the .proto alone, and promises for its calls that ride out a
// server restart: what every Node.js example client here shares.
//
// `attribute` and `unary` retry UNAVAILABLE (server down, restarting or warming up) and
// RESOURCE_EXHAUSTED (queue full) until the call's deadline (`timeoutMs`, 30 s by default),
// sleeping a "full jitter" exponential backoff between attempts: uniform in
// [0, min(maxBackoffMs, initialBackoffMs * multiplier ** n)] (100 ms, x2, capped at 2 s). Every
// attempt carries the call's deadline, no sleep reaches past it, and the last error is the one
// rejected with. `retries: N` also caps the attempts at N + 1 (default: no cap but the deadline);
// `onRetry({ attempt, delayMs, error })` is called before each sleep. Retrying Attribute is
// safe: the server records each generation_id once and replays it. Streams are not retried.
'use strict';
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');
const definition = protoLoader.loadSync('gmv/v1/attribution.proto', {
  includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, defaults: true,
});
const gmv = grpc.loadPackageDefinition(definition).gmv.v1;

const RETRY_DEFAULTS = {
  timeoutMs: 30000, initialBackoffMs: 100, multiplier: 2, maxBackoffMs: 2000, retries: Infinity, onRetry: null,
};
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.RESOURCE_EXHAUSTED]);

// RESOURCE_EXHAUSTED is also gRPC's answer to a message over a size limit: never retried.
function isRetryable(error) {
  return RETRYABLE.has(error.code) && !/larger than max/.test(error.details || '');
}

// The sleep before retry number `retry` (0 = the first), in ms.
function backoffDelayMs(retry, options = {}) {
  const o = { ...RETRY_DEFAULTS, ...options };
  return Math.random() * Math.min(o.maxBackoffMs, o.initialBackoffMs * o.multiplier ** Math.min(retry, 64));
}

// Resolves with attempt(deadline)'s value, retrying as described above.
const MIN_ATTEMPT_MS = 5; // an attempt with less time left than this is not made

async function withRetry(attempt, options = {}) {
  const o = { ...RETRY_DEFAULTS, ...options };
  const deadline = o.deadline !== undefined ? Number(o.deadline) : Date.now() + o.timeoutMs;
  for (let made = 1; ; made += 1) {
    try {
      return await attempt(deadline);
    } catch (error) {
      if (!isRetryable(error) || made > o.retries) throw error;
      const delayMs = backoffDelayMs(made - 1, o);
      if (Date.now() + delayMs >= deadline) throw error;
      if (o.onRetry) o.onRetry({ attempt: made, delayMs, error });
      await new Promise((resolve) => setTimeout(resolve, delayMs));
      // A timer that overshot leaves too little time for an attempt to do anything but time out
      // (the caller would see DEADLINE_EXCEEDED instead of why the last one failed).
      if (deadline - Date.now() < MIN_ATTEMPT_MS) throw error;
    }
  }
}

// Sends `authorization: Bearer <key>` (a key from `gmv keys create`) on every call, over TLS
// or plaintext alike.
function apiKeyInterceptor(apiKey) {
  return (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      metadata.set('authorization', `Bearer ${apiKey}`);
      next(metadata, listener);
    },
  });
}

// Channel credentials: TLS trusting the CA in the PEM file `caFile` (GMV_TLS_CA when not
// given), else plaintext.
function channelCredentials(caFile = process.env.GMV_TLS_CA) {
  return caFile ? grpc.credentials.createSsl(require('fs').readFileSync(caFile)) : grpc.credentials.createInsecure();
}

// A client whose channel reconnects at least every max(1 s, maxBackoffMs) while the server is
// away (gRPC's default backoff grows to 120 s, failing calls fast meanwhile). options.apiKey
// (default: GMV_API_KEY) goes with every call.
function createClient(target, credentials = channelCredentials(), options = {}) {
  const reconnectMs = Math.max(1000, options.maxBackoffMs || RETRY_DEFAULTS.maxBackoffMs);
  const apiKey = options.apiKey || process.env.GMV_API_KEY;
  return new gmv.AttributionService(target, credentials, {
    'grpc.initial_reconnect_backoff_ms': 1000, 'grpc.max_reconnect_backoff_ms': reconnectMs,
    ...(apiKey ? { interceptors: [apiKeyInterceptor(apiKey)] } : {}),
    ...(options.channelOptions || {}),
  });
}

// Resolves with the streamed credits of one generation, rank 1 first.
function attribute(client, request, options = {}) {
  return withRetry((deadline) => new Promise((resolve, reject) => {
    const credits = [];
    const call = client.Attribute(request, { deadline });
    call.on('data', (credit) => credits.push(credit));
    call.on('error', reject);
    call.on('end', () => resolve(credits));
  }), options);
}

// Resolves with the reply of a unary method, e.g. unary(client, 'GetIndexInfo', {}).
function unary(client, method, request, options = {}) {
  return withRetry((deadline) => new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, reply) => (error ? reject(error) : resolve(reply)));
  }), options);
}

module.exports = {
  grpc, gmv, attribute, unary, withRetry, createClient, channelCredentials, isRetryable, backoffDelayMs, RETRY_DEFAULTS,
};
