// Many generations over one AttributeStream, from the .proto alone: writes every image as fast
// as the stream takes it (no waiting for results; only write()'s return value and 'drain', i.e.
// HTTP/2 flow control, slow it down), collects every AttributionResult, and prints one JSON
// summary.
//   node stream_client.js HOST:PORT [--collection NAME] [--tenant ID] [--top-k K] [--skip-ledger]
//                         [--id-prefix P] [--deadline-s S] IMAGE_FILE_OR_DIR...
// A directory contributes its (non-hidden) files, sorted by name. Each generation_id is the id
// prefix + the file's name without its extension. Exit status: 0 when the call completed (items
// may still have failed: see each result's `error`), 1 when the call itself failed, 2 on bad
// arguments.
'use strict';
const fs = require('fs');
const path = require('path');
const { grpc, gmv } = require('./gmv_proto');

const USAGE = 'usage: node stream_client.js HOST:PORT [--collection NAME] [--tenant ID] [--top-k K] '
  + '[--skip-ledger] [--id-prefix P] [--deadline-s S] IMAGE_FILE_OR_DIR...';

function parseArgs(argv) {
  const options = { collection: '', tenant: '', topK: 0, skipLedger: false, idPrefix: '', deadlineS: 600, paths: [] };
  const valued = { '--collection': 'collection', '--tenant': 'tenant', '--top-k': 'topK', '--id-prefix': 'idPrefix',
                   '--deadline-s': 'deadlineS' };
  const rest = [];
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--skip-ledger') {
      options.skipLedger = true;
    } else if (arg in valued) {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      options[valued[arg]] = argv[i += 1];
    } else if (arg.startsWith('--')) {
      throw new Error(`unknown option ${arg}`);
    } else {
      rest.push(arg);
    }
  }
  options.topK = Number(options.topK);
  options.deadlineS = Number(options.deadlineS);
  if (!Number.isInteger(options.topK) || options.topK < 0) throw new Error('--top-k must be a whole number >= 0');
  if (!(options.deadlineS > 0)) throw new Error('--deadline-s must be a positive number');
  [options.target, ...options.paths] = rest;
  if (!options.target || !options.paths.length) throw new Error('a target and at least one image are needed');
  return options;
}

// Every image file named, directories expanded (their non-hidden files, sorted), in order.
function imageFiles(paths) {
  const files = [];
  for (const given of paths) {
    if (fs.statSync(given).isDirectory()) {
      fs.readdirSync(given).filter((name) => !name.startsWith('.')).sort()
        .map((name) => path.join(given, name))
        .filter((file) => fs.statSync(file).isFile())
        .forEach((file) => files.push(file));
    } else {
      files.push(given);
    }
  }
  return files;
}

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));
const LEDGER_NAMES = Object.fromEntries(gmv.LedgerState.type.value.map((v) => [v.number, v.name]));

function summarise(result) {
  const credits = result.credits || [];
  const error = result.error
    ? { code: result.error.code, name: CODE_NAMES[result.error.code] || String(result.error.code),
        message: result.error.message }
    : null;
  return {
    generation_id: result.generation_id, quality: result.quality, credits: credits.length,
    credit_sum: credits.reduce((sum, credit) => sum + credit.credit, 0),
    contributors: (result.contributors || []).length, ledger: LEDGER_NAMES[result.ledger] || String(result.ledger),
    error,
  };
}

function stream(client, options, files) {
  return new Promise((resolve) => {
    const results = [];
    let finished = false;
    let written = 0;
    const call = client.AttributeStream({ deadline: Date.now() + options.deadlineS * 1000 });
    const finish = (callError) => {
      if (!finished) {
        finished = true;
        resolve({ results, written, callError });
      }
    };
    call.on('data', (result) => results.push(result));
    call.on('error', (error) => finish(error));
    call.on('end', () => finish(null));

    // As fast as the stream takes them: write until write() says the buffer is full, go on at
    // 'drain'. Results are read concurrently by the 'data' handler above.
    let next = 0;
    const writeMore = () => {
      while (!finished && next < files.length) {
        const file = files[next];
        next += 1;
        const request = {
          generation_id: options.idPrefix + path.basename(file, path.extname(file)),
          image: fs.readFileSync(file), top_k: options.topK, tenant_id: options.tenant,
          skip_ledger: options.skipLedger, collection: options.collection,
        };
        written += 1;
        if (!call.write(request)) {
          call.once('drain', writeMore);
          return;
        }
      }
      if (!finished) call.end();
    };
    writeMore();
  });
}

async function main() {
  let options;
  let files;
  try {
    options = parseArgs(process.argv.slice(2));
    files = imageFiles(options.paths);
  } catch (error) {
    console.error(`${error.message}\n${USAGE}`);
    process.exit(2);
  }
  const ids = files.map((file) => options.idPrefix + path.basename(file, path.extname(file)));
  const duplicate = ids.find((id, i) => ids.indexOf(id) !== i);
  if (duplicate !== undefined) {
    console.error(`two files give generation_id '${duplicate}': each generation needs its own id\n${USAGE}`);
    process.exit(2);
  }

  const client = new gmv.AttributionService(options.target, grpc.credentials.createInsecure());
  const started = process.hrtime.bigint();
  const { results, written, callError } = await stream(client, options, files);
  const wallS = Number(process.hrtime.bigint() - started) / 1e9;
  client.close();

  const generations = results.map(summarise);
  const errors = {};
  generations.filter((g) => g.error).forEach((g) => { errors[g.error.name] = (errors[g.error.name] || 0) + 1; });
  const summary = {
    target: options.target,
    sent: written,
    results: generations.length,
    ok: generations.filter((g) => !g.error).length,
    with_credits: generations.filter((g) => !g.error && g.credits > 0).length,
    errors, // per status name, over the failed items
    call_status: callError ? (CODE_NAMES[callError.code] || String(callError.code)) : 'OK',
    call_error: callError ? { code: callError.code, name: CODE_NAMES[callError.code], details: callError.details } : null,
    wall_s: wallS,
    generations, // in the order they came back
  };
  // Exit once the whole summary is written: a pipe takes it asynchronously, and process.exit
  // before then would cut it off.
  process.stdout.write(`${JSON.stringify(summary)}\n`, () => process.exit(callError ? 1 : 0));
}

main().catch((error) => { console.error(error); process.exit(1); });
