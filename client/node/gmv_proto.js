// The gmv.v1 package loaded from the .proto alone, and a promise for one Attribute call:
// what every Node.js example client here shares.
'use strict';
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');
const definition = protoLoader.loadSync('gmv/v1/attribution.proto', {
  includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, defaults: true,
});
const gmv = grpc.loadPackageDefinition(definition).gmv.v1;

// Resolves with the streamed credits of one generation, rank 1 first.
function attribute(client, request) {
  return new Promise((resolve, reject) => {
    const credits = [];
    const call = client.Attribute(request, { deadline: Date.now() + 30000 });
    call.on('data', (credit) => credits.push(credit));
    call.on('error', reject);
    call.on('end', () => resolve(credits));
  });
}

module.exports = { grpc, gmv, attribute };
