// Node.js steps of scripts/n8n-e2e: replica set setup, the credential and reject-probe files,
// and the checks on what n8n wrote and what perfagg merged. Run only from scripts/n8n-e2e,
// which sets N8N_DIR to the n8n install whose MongoDB driver this file borrows.
//
//   node scripts/n8n-e2e.js free-port
//   node scripts/n8n-e2e.js initiate PORT
//   node scripts/n8n-e2e.js credential TEMPLATE OUTPUT URI DATABASE
//   node scripts/n8n-e2e.js reject-probe SURVEY_WORKFLOW OUTPUT
//   node scripts/n8n-e2e.js check-staging URI DATABASE METRICS_WORKFLOW SURVEY_WORKFLOW
//   node scripts/n8n-e2e.js check-merged URI DATABASE EXPECTED_FILE TIMEOUT_SECONDS
//   node scripts/n8n-e2e.js check-rejects URI DATABASE TIMEOUT_SECONDS
//   node scripts/n8n-e2e.js check-status STATUS_JSON_FILE
//
// Every check prints what it found and exits 1 on the first mismatch.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');

const n8nDir = process.env.N8N_DIR;
if (!n8nDir) {
  console.error('n8n-e2e.js: N8N_DIR is not set; run scripts/n8n-e2e instead of this file');
  process.exit(2);
}
// The driver that n8n's MongoDB node itself loads, so the checks decode BSON as n8n does.
const nodesBaseDir = path.join(n8nDir, 'node_modules', 'n8n-nodes-base');
const { MongoClient, ObjectId, Timestamp, BSON } = require(
  require.resolve('mongodb', { paths: [nodesBaseDir] }),
);

const POLL_INTERVAL_MS = 250;
const PROBE_WORKFLOW_ID = 'perfaggRejectPrb';

// Items that the reject probe inserts, and for each one the fragments its reject reasons must contain.
const PROBE_ITEMS = [
  {
    entity_name: 'Reject Probe',
    entity_type: 'dpe',
    date: '2025-09-25',
    csat: 4,
    neutral: 1,
    // dsat is left out, so the MongoDB node stores null in a required field.
  },
  {
    entity_name: 'Reject Probe',
    entity_type: 'dpe',
    // The Date Fields option turns a string that JavaScript cannot parse into 1970-01-01.
    date: '25.09.2025',
    csat: 4,
    neutral: 1,
    dsat: 0,
  },
];
const PROBE_REASON_FRAGMENTS = [['`dsat` is null'], ['1970-01-01', 'merge.min_date']];

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function readJson(file) {
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

function writeJson(file, value) {
  fs.writeFileSync(file, `${JSON.stringify(value, null, 2)}\n`);
}

// Returns the workflow's MongoDB Insert node, failing if there is not exactly one.
function insertNode(workflow) {
  const nodes = workflow.nodes.filter((node) => node.type === 'n8n-nodes-base.mongoDb');
  assert.equal(nodes.length, 1, `${workflow.name}: expected one MongoDB node`);
  assert.equal(nodes[0].parameters.operation, 'insert', `${workflow.name}: operation`);
  return nodes[0];
}

function splitList(list) {
  return (list || '')
    .split(',')
    .map((name) => name.trim())
    .filter((name) => name !== '');
}

// Prints a free TCP port on 127.0.0.1. Another process may take it before mongod binds it, in
// which case mongod fails to start and the run fails with its log.
async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  console.log(port);
}

// Initiates a one-member replica set on 127.0.0.1:PORT and waits until it is primary.
async function initiate(port, timeoutSeconds = 30) {
  const deadline = Date.now() + timeoutSeconds * 1000;
  const direct = new MongoClient(`mongodb://127.0.0.1:${port}/?directConnection=true`, {
    serverSelectionTimeoutMS: timeoutSeconds * 1000,
  });
  try {
    await direct.db('admin').command({
      replSetInitiate: { _id: 'rs0', members: [{ _id: 0, host: `127.0.0.1:${port}` }] },
    });
    for (;;) {
      const hello = await direct.db('admin').command({ hello: 1 });
      if (hello.isWritablePrimary) {
        return;
      }
      if (Date.now() > deadline) {
        throw new Error(`replica set on port ${port} has no primary after ${timeoutSeconds} s`);
      }
      await sleep(POLL_INTERVAL_MS);
    }
  } finally {
    await direct.close();
  }
}

// Writes the credential template with the test deployment's connection string and database.
function credential(templateFile, outputFile, uri, database) {
  const credentials = readJson(templateFile);
  assert.equal(credentials.length, 1, `${templateFile}: expected one credential`);
  assert.equal(credentials[0].type, 'mongoDb', `${templateFile}: credential type`);
  credentials[0].data.connectionString = uri;
  credentials[0].data.database = database;
  writeJson(outputFile, credentials);
}

// Writes a copy of the survey workflow whose Code node emits PROBE_ITEMS instead.
function rejectProbe(surveyWorkflowFile, outputFile) {
  const workflow = readJson(surveyWorkflowFile);
  workflow.id = PROBE_WORKFLOW_ID;
  workflow.name = 'perfagg e2e reject probe';
  const code = workflow.nodes.find((node) => node.type === 'n8n-nodes-base.code');
  assert.ok(code, `${surveyWorkflowFile}: no Code node`);
  code.parameters.jsCode = `return ${JSON.stringify(PROBE_ITEMS)}.map((json) => ({ json }));\n`;
  writeJson(outputFile, workflow);
}

function bsonType(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  if (value instanceof Date) return 'date';
  if (value && value._bsontype) return value._bsontype.toLowerCase();
  return typeof value;
}

// Checks what n8n's MongoDB node stored, field by field, against the documented behaviour.
async function checkStaging(uri, database, metricsWorkflowFile, surveyWorkflowFile) {
  const client = new MongoClient(uri);
  try {
    const db = client.db(database);
    // promoteValues: false keeps int32 and double apart, as perfagg's Rust driver decodes them.
    const raw = { promoteValues: false };
    const metrics = await db.collection('staging_metrics').find({}, raw).sort({ _id: 1 }).toArray();
    const surveys = await db.collection('staging_surveys').find({}, raw).sort({ _id: 1 }).toArray();
    console.log(`staging_metrics: ${metrics.length} documents, staging_surveys: ${surveys.length}`);

    // Calculate Metrics ran twice with three items each, and Process Survey once with two items.
    assert.equal(metrics.length, 6, 'staging_metrics document count');
    assert.equal(surveys.length, 2, 'staging_surveys document count');

    const metricsFields = splitList(insertNode(readJson(metricsWorkflowFile)).parameters.fields);
    const surveyFields = splitList(insertNode(readJson(surveyWorkflowFile)).parameters.fields);
    for (const [documents, fields] of [[metrics, metricsFields], [surveys, surveyFields]]) {
      for (const document of documents) {
        assert.equal(bsonType(document._id), 'objectid', '_id type');
        assert.deepEqual(Object.keys(document), ['_id', ...fields], 'stored fields and their order');
      }
    }

    const byName = (documents, name) => documents.find((document) => document.entity_name === name);
    const john = byName(metrics, 'John Doe');
    const jane = byName(metrics, 'Jane Smith');
    const team = byName(metrics, 'Billing EMEA');
    const expectations = [
      ['John Doe sct 2.5', bsonType(john.sct), 'double'],
      ['Jane Smith sct 3.0', bsonType(jane.sct), 'int32'],
      ['John Doe cases 15', bsonType(john.cases), 'int32'],
      ['metrics date', bsonType(john.date), 'string'],
      ['Jane Smith empty sample_cases', bsonType(jane.sample_cases), 'array'],
      ['John Doe metadata', bsonType(john.metadata), 'object'],
      ['Billing EMEA metadata left out', bsonType(team.metadata), 'null'],
      ['survey date with Date Fields', bsonType(surveys[0].date), 'date'],
      ['John Doe satisfaction left out', bsonType(byName(surveys, 'John Doe').satisfaction), 'null'],
      ['Jane Smith satisfaction 78.5', bsonType(byName(surveys, 'Jane Smith').satisfaction), 'double'],
    ];
    for (const [what, actual, expected] of expectations) {
      assert.equal(actual, expected, `staging type of ${what}`);
    }
    assert.equal(jane.sample_cases.length, 0, 'Jane Smith sample_cases stays an empty array');
    assert.equal(surveys[0].date.toISOString(), '2025-09-25T00:00:00.000Z', 'Date Fields day');
    console.log('staging documents: stored types match the documentation');
  } finally {
    await client.close();
  }
}

// Returns a copy of `document` with every key sorted, so comparisons ignore field order.
function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value === null || typeof value !== 'object') return value;
  return Object.fromEntries(
    Object.keys(value)
      .sort()
      .map((key) => [key, sortKeys(value[key])]),
  );
}

// Splits a target document into the fields compared with the expected file and a list of
// problems with the per-run fields (_id, created_at, updated_at, sources).
async function normalizeTarget(db, target) {
  const problems = [];
  const { _id, created_at: createdAt, updated_at: updatedAt, sources, ...stable } = target;
  if (!(_id instanceof ObjectId)) problems.push('_id is not an ObjectId');
  if (!(createdAt instanceof Date)) problems.push('created_at is not a date');
  if (!(updatedAt instanceof Date)) problems.push('updated_at is not a date');
  if (createdAt > updatedAt) problems.push('created_at is after updated_at');

  // Each source entry must name the newest staging document for this key.
  const key = { entity_name: target.entity_name, entity_type: target.entity_type };
  const stagingOf = { metrics: 'staging_metrics', surveys: 'staging_surveys' };
  for (const [source, collection] of Object.entries(stagingOf)) {
    const newest = await db.collection(collection).find(key).sort({ _id: -1 }).limit(1).next();
    const entry = sources ? sources[source] : undefined;
    if (!newest && entry) problems.push(`sources.${source} is set but no staging document exists`);
    if (newest && !entry) problems.push(`sources.${source} is missing`);
    if (newest && entry) {
      if (!(entry.cluster_time instanceof Timestamp)) {
        problems.push(`sources.${source}.cluster_time is not a timestamp`);
      }
      if (!newest._id.equals(entry.staging_id)) {
        problems.push(`sources.${source}.staging_id is ${entry.staging_id}, newest is ${newest._id}`);
      }
    }
  }
  const json = BSON.EJSON.serialize(stable, { relaxed: true });
  return { stable: sortKeys(json), problems };
}

async function readTargets(db) {
  const targets = await db
    .collection('performance_data')
    .find({})
    .sort({ entity_name: 1, entity_type: 1, date: 1 })
    .toArray();
  const normalized = [];
  for (const target of targets) {
    normalized.push(await normalizeTarget(db, target));
  }
  return normalized;
}

function describeMismatch(expected, actual) {
  try {
    assert.deepEqual(actual, expected);
    return null;
  } catch (error) {
    return error.message;
  }
}

// Waits until performance_data equals the expected documents, then also until no change for
// a second, so a late merge of the re-run cannot slip past the comparison.
async function checkMerged(uri, database, expectedFile, timeoutSeconds) {
  const expected = sortKeys(readJson(expectedFile).documents);
  const client = new MongoClient(uri);
  const deadline = Date.now() + Number(timeoutSeconds) * 1000;
  try {
    const db = client.db(database);
    let mismatch = 'nothing read yet';
    let matchedSince = null;
    for (;;) {
      const targets = await readTargets(db);
      const problems = targets.flatMap((target) => target.problems);
      mismatch =
        problems.length > 0
          ? problems.join('\n')
          : describeMismatch(expected, targets.map((target) => target.stable));
      if (mismatch === null) {
        matchedSince = matchedSince ?? Date.now();
        if (Date.now() - matchedSince >= 1000) {
          console.log(`performance_data: ${targets.length} documents equal the expected ones`);
          const rejects = await db.collection('staging_rejects').countDocuments();
          assert.equal(rejects, 0, 'staging_rejects must be empty before the reject probe');
          return;
        }
      } else {
        matchedSince = null;
      }
      if (Date.now() > deadline) {
        throw new Error(`performance_data after ${timeoutSeconds} s:\n${mismatch}`);
      }
      await sleep(POLL_INTERVAL_MS);
    }
  } finally {
    await client.close();
  }
}

// Waits for the probe's two rejects and checks their fields. The probe's key must not reach
// performance_data.
async function checkRejects(uri, database, timeoutSeconds) {
  const client = new MongoClient(uri);
  const deadline = Date.now() + Number(timeoutSeconds) * 1000;
  try {
    const db = client.db(database);
    const probes = await db
      .collection('staging_surveys')
      .find({ entity_name: 'Reject Probe' })
      .sort({ _id: 1 })
      .toArray();
    assert.equal(probes.length, PROBE_ITEMS.length, 'reject probe staging documents');
    for (const [index, probe] of probes.entries()) {
      let reject = null;
      while (!reject) {
        reject = await db.collection('staging_rejects').findOne({ staging_id: probe._id });
        if (!reject && Date.now() > deadline) {
          throw new Error(`no reject for staging_surveys ${probe._id} after ${timeoutSeconds} s`);
        }
        if (!reject) await sleep(POLL_INTERVAL_MS);
      }
      assert.equal(reject.source, 'staging_surveys', 'reject source');
      assert.deepEqual(reject.document, probe, 'reject document is the staging document');
      assert.ok(Array.isArray(reject.reasons), 'reject reasons is an array');
      assert.ok(reject.reasons.length > 0, 'reject reasons is not empty');
      for (const fragment of PROBE_REASON_FRAGMENTS[index]) {
        assert.ok(
          reject.reasons.some((reason) => reason.includes(fragment)),
          `no reason of ${probe._id} contains ${JSON.stringify(fragment)}: ${reject.reasons}`,
        );
      }
      assert.ok(reject.cluster_time instanceof Timestamp, 'reject cluster_time is a timestamp');
      assert.ok(reject.rejected_at instanceof Date, 'reject rejected_at is a date');
      console.log(`staging_rejects: ${probe._id}: ${reject.reasons.join('; ')}`);
    }
    const merged = await db.collection('performance_data').countDocuments({ entity_name: 'Reject Probe' });
    assert.equal(merged, 0, 'a rejected staging document must not create a target document');
  } finally {
    await client.close();
  }
}

// Checks the counts in the output of `perfagg status --json` after the reject probe.
function checkStatus(statusFile) {
  const status = readJson(statusFile);
  const expectedTargets = readJson(
    path.join(__dirname, '..', 'examples', 'n8n', 'expected-performance-data.json'),
  ).documents.length;
  assert.equal(status.target_documents, expectedTargets, 'perfagg status: target_documents');
  assert.equal(status.rejects, PROBE_ITEMS.length, 'perfagg status: rejects');
  console.log(`perfagg status: target_documents ${status.target_documents}, rejects ${status.rejects}`);
}

async function main(argv) {
  const [command, ...args] = argv;
  switch (command) {
    case 'free-port':
      return freePort();
    case 'initiate':
      return initiate(args[0]);
    case 'credential':
      return credential(...args);
    case 'reject-probe':
      return rejectProbe(...args);
    case 'check-staging':
      return checkStaging(...args);
    case 'check-merged':
      return checkMerged(...args);
    case 'check-rejects':
      return checkRejects(...args);
    case 'check-status':
      return checkStatus(...args);
    default:
      throw new Error(`unknown command ${JSON.stringify(command)}; see the usage at the top of this file`);
  }
}

main(process.argv.slice(2)).catch((error) => {
  console.error(`n8n-e2e.js: ${error.message}`);
  process.exit(1);
});
