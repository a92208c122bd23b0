// A Node.js client of gyoza, built only from protos/: creates an ad-hoc run, watches it,
// raises its priority, cancels it, and prints what the watch saw as one JSON line.
//
//   node watch_run.js HOST:PORT [API_KEY]
//
// Exits 0 when the watch ended by itself with the run CANCELLED, 1 otherwise.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const TIMEOUT_MS = 20000;

function load() {
  const definition = protoLoader.loadSync('gyoza/api/v1/op_run_service.proto', {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).gyoza.api.v1;
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + TIMEOUT_MS }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

async function main() {
  const [address, apiKey] = process.argv.slice(2);
  if (!address) {
    throw new Error('usage: node watch_run.js HOST:PORT [API_KEY]');
  }
  const v1 = load();
  const client = new v1.OpRunService(address, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (apiKey) {
    metadata.set('authorization', `Bearer ${apiKey}`);
  }
  metadata.set('x-request-id', 'node-client-1');

  const created = await unary(
    client,
    'CreateOpRun',
    {
      image: 'busybox:latest',
      inputs: { fields: { greeting: { string_value: 'hello from node' } } },
      request_id: `node-${process.pid}-${Date.now()}`,
    },
    metadata,
  );
  const run = created.op_run;

  const seen = { run_id: run.id, created_state: run.state, messages: [] };
  await new Promise((resolve, reject) => {
    const stream = client.WatchOpRun({ run_id: run.id }, metadata, {
      deadline: Date.now() + TIMEOUT_MS,
    });
    let steered = false;
    stream.on('data', (message) => {
      seen.messages.push({
        sequence: message.sequence,
        state: message.op_run.state,
        priority: message.op_run.priority,
        event: message.event ? message.event.type : null,
      });
      if (!steered) {
        // The snapshot arrived: the watch is live, so every later change will reach it.
        steered = true;
        unary(client, 'UpdateOpRunPriority', { run_id: run.id, priority: 9 }, metadata)
          .then(() => unary(client, 'CancelOpRun', { run_id: run.id, reason: 'node' }, metadata))
          .catch(reject);
      }
    });
    // 'status' comes last, with the trailing metadata: the request id the server used.
    stream.on('status', (status) => {
      seen.request_id = status.metadata.get('x-request-id')[0] || null;
      if (status.code === grpc.status.OK) {
        resolve();
      }
    });
    stream.on('error', reject);
  });

  const last = seen.messages[seen.messages.length - 1];
  seen.final_state = last ? last.state : null;
  process.stdout.write(`${JSON.stringify(seen)}\n`);
  client.close();
  return seen.final_state === 'OP_RUN_STATE_CANCELLED' ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    process.stderr.write(`watch_run.js: ${error.stack || error}\n`);
    process.exit(1);
  },
);
