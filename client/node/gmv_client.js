// Calls every RPC of gmv.v1.AttributionService from the .proto alone, and prints one JSON
// object with what came back:
//   [GMV_TLS_CA=ca.pem] [GMV_API_KEY=gmv_...] node gmv_client.js HOST:PORT IMAGE_FILE...
'use strict';
const fs = require('fs');
const path = require('path');
const { grpc, attribute, unary, createClient } = require('./gmv_proto');

function attributeStream(client, requests) {
  return new Promise((resolve, reject) => {
    const results = [];
    const call = client.AttributeStream({ deadline: Date.now() + 30000 });
    call.on('data', (result) => results.push(result));
    call.on('error', reject);
    call.on('end', () => resolve(results));
    requests.forEach((request) => call.write(request));
    call.end();
  });
}

async function main() {
  const [target, ...files] = process.argv.slice(2);
  const client = createClient(target);
  const info = await unary(client, 'GetIndexInfo', {});
  const requests = files.map((file) => ({
    generation_id: `node-${path.basename(file, path.extname(file))}`, image: fs.readFileSync(file), top_k: 5,
    tenant_id: 'node',
  }));
  const credits = await attribute(client, requests[0]);
  const results = await attributeStream(client, requests);
  let invalid = null;
  try {
    await attribute(client, { generation_id: 'bad', image: Buffer.from('garbage'), top_k: 0 });
  } catch (error) {
    invalid = grpc.status[error.code];
  }
  const valuation = await unary(client, 'GetValuation', { tenant_id: 'node', since: { seconds: 0, nanos: 0 } });
  const top = await unary(client, 'TopContributors', { tenant_id: 'node', limit: 3 });
  console.log(JSON.stringify({ info, credits, results, invalid, valuation, top }));
  client.close();
}

main().catch((error) => { console.error(error); process.exit(1); });
