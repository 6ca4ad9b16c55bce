// A server of several collections, called from the .proto alone: lists the collections, then
// attributes one image against each named collection, and tries no name and an unknown name.
//   node collections_client.js HOST:PORT IMAGE_FILE COLLECTION...
'use strict';
const fs = require('fs');
const path = require('path');
const { grpc, gmv, attribute } = require('./gmv_proto');

async function status(promise) {
  try {
    await promise;
    return 'OK';
  } catch (error) {
    return grpc.status[error.code];
  }
}

async function main() {
  const [target, file, ...collections] = process.argv.slice(2);
  const client = new gmv.AttributionService(target, grpc.credentials.createInsecure());
  const unary = (method, request) => new Promise((resolve, reject) =>
    client[method](request, (error, reply) => (error ? reject(error) : resolve(reply))));
  const listed = (await unary('ListCollections', {})).collections.map((info) => info.collection);
  const image = fs.readFileSync(file);
  const stem = path.basename(file, path.extname(file));
  const byCollection = {};
  for (const collection of collections) {
    const info = await unary('GetIndexInfo', { collection });
    const credits = await attribute(client, { generation_id: `node-${collection}-${stem}`, image, collection,
                                              top_k: 5, skip_ledger: true });
    byCollection[collection] = { info_collection: info.collection, contributors: credits.map((c) => c.contributor_id),
                                 training_ids: credits.map((c) => c.training_id) };
  }
  const unnamed = await status(attribute(client, { generation_id: `node-unnamed-${stem}`, image, skip_ledger: true }));
  const unknown = await status(attribute(client, { generation_id: `node-unknown-${stem}`, image,
                                                   collection: 'no_such_collection', skip_ledger: true }));
  const unnamedInfo = await status(unary('GetIndexInfo', {}));
  console.log(JSON.stringify({ listed, byCollection, unnamed, unknown, unnamedInfo }));
  client.close();
}

main().catch((error) => { console.error(error); process.exit(1); });
