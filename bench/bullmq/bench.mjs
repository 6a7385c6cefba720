#!/usr/bin/env node
// BullMQ peer for herald's `make bench-queue`: the same no-op workload on the same Redis.
//
//   node bench.mjs --redis redis://127.0.0.1:6379 --jobs 100000 --concurrency 50 --prefix <unique>
//
// (a) enqueue: Queue.addBulk of N no-op jobs in chunks of --chunk (1,000), awaited one after another;
// (b) process: ONE Worker (library defaults: autorun, default drainDelay, no limiter) with the given
//     concurrency and a no-op async processor, timed from its construction until N jobs have
//     completed (counted from the worker's own 'completed'/'failed' events);
// (c) cleanup: queue.obliterate({force: true}) plus any key left under the prefix.
// Finished jobs are removed as they finish (removeOnComplete/removeOnFail: true by default, or
// {count: K} with --keep K), so Redis memory stays bounded.
// Output: `bullmq: <key> <value>` lines; the last two are always
//   bullmq: enqueue_jobs_per_sec <float>
//   bullmq: process_jobs_per_sec <float>
import { createRequire } from 'node:module';
import { parseArgs } from 'node:util';
import { Queue, Worker } from 'bullmq';

const require = createRequire(import.meta.url);
const BULLMQ_VERSION = require('bullmq/package.json').version;

function usage(msg) {
  if (msg) console.error(`bench.mjs: ${msg}`);
  console.error(
    'usage: node bench.mjs [--redis URL] [--jobs N] [--concurrency C] [--prefix P]\n' +
      '                     [--chunk 1000] [--keep 0] [--queue noop] [--timeout 600]',
  );
  process.exit(2);
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      redis: { type: 'string', default: process.env.REDIS_URL || 'redis://127.0.0.1:6379' },
      jobs: { type: 'string', default: '100000' },
      concurrency: { type: 'string', default: '50' },
      prefix: { type: 'string', default: `herald-bench-bullmq-${process.pid}-${Date.now()}` },
      chunk: { type: 'string', default: '1000' },
      keep: { type: 'string', default: '0' },
      queue: { type: 'string', default: 'noop' },
      timeout: { type: 'string', default: '600' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  }));
} catch (e) {
  usage(e.message);
}
if (args.help) usage();

function posInt(name, min = 1) {
  const v = Number(args[name]);
  if (!Number.isInteger(v) || v < min) usage(`--${name} must be an integer >= ${min}`);
  return v;
}
const jobs = posInt('jobs');
const concurrency = posInt('concurrency');
const chunk = posInt('chunk');
const keep = posInt('keep', 0);
const timeoutMs = posInt('timeout') * 1000;
const prefix = args.prefix;
const queueName = args.queue;

function connectionFromUrl(raw) {
  let u;
  try {
    u = new URL(raw);
  } catch {
    usage(`bad --redis URL: ${raw}`);
  }
  if (u.protocol !== 'redis:' && u.protocol !== 'rediss:') usage(`--redis must be redis:// or rediss://`);
  const conn = { host: u.hostname.replace(/^\[|\]$/g, '') || '127.0.0.1', port: Number(u.port || 6379) };
  if (u.username) conn.username = decodeURIComponent(u.username);
  if (u.password) conn.password = decodeURIComponent(u.password);
  const db = u.pathname.replace(/^\//, '');
  if (db) conn.db = Number(db);
  if (u.protocol === 'rediss:') conn.tls = {};
  return conn;
}
const connection = connectionFromUrl(args.redis);

// removeOnComplete/removeOnFail: true deletes a job as soon as it finishes; {count: K} keeps the last K.
const retention = keep === 0 ? true : { count: keep };
const retentionText = keep === 0 ? 'true' : `{count:${keep}}`;
const jobOpts = { removeOnComplete: retention, removeOnFail: retention };

const out = (k, v) => console.log(`bullmq: ${k} ${v}`);
const seconds = (t0) => Number(process.hrtime.bigint() - t0) / 1e9;

const queue = new Queue(queueName, { connection, prefix });
let worker;

async function cleanup() {
  if (worker) await worker.close(true).catch(() => {});
  await queue.obliterate({ force: true }).catch((e) => console.error(`bench.mjs: obliterate: ${e.message}`));
  // Anything left under the prefix (events stream, meta, ...) goes too.
  const client = await queue.client;
  let cursor = '0';
  let left = 0;
  do {
    const [next, keys] = await client.scan(cursor, 'MATCH', `${prefix}:${queueName}:*`, 'COUNT', 1000);
    cursor = next;
    if (keys.length) {
      left += keys.length;
      await client.del(...keys);
    }
  } while (cursor !== '0');
  await queue.close();
  return left;
}

async function main() {
  await queue.waitUntilReady();
  const client = await queue.client;
  const policy = await client.config('GET', 'maxmemory-policy').then((r) => r[1], () => 'unknown');

  out('version', BULLMQ_VERSION);
  out('node', process.version);
  out('redis', `${connection.host}:${connection.port}`);
  out('maxmemory_policy', policy);
  out('prefix', prefix);
  out('jobs', jobs);
  out('concurrency', concurrency);
  out('chunk', chunk);
  out('retention', `removeOnComplete=${retentionText} removeOnFail=${retentionText}`);

  const before = await queue.getJobCountByTypes('wait', 'paused', 'delayed', 'prioritized', 'active');
  if (before !== 0) throw new Error(`queue ${prefix}:${queueName} is not empty (${before} jobs); use a unique --prefix`);

  // (a) enqueue
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < jobs; i += chunk) {
    const n = Math.min(chunk, jobs - i);
    const batch = new Array(n);
    for (let j = 0; j < n; j++) batch[j] = { name: 'noop', data: { i: i + j }, opts: jobOpts };
    await queue.addBulk(batch);
  }
  const enqueueSecs = seconds(t0);
  const waiting = await queue.getWaitingCount();
  if (waiting !== jobs) throw new Error(`expected ${jobs} waiting jobs after addBulk, found ${waiting}`);

  // (b) process
  let completed = 0;
  let failed = 0;
  let resolveDone;
  const done = new Promise((r) => (resolveDone = r));
  const tick = () => {
    if (completed + failed === jobs) resolveDone();
  };
  const t1 = process.hrtime.bigint();
  worker = new Worker(queueName, async () => {}, { connection, prefix, concurrency });
  worker.on('completed', () => {
    completed++;
    tick();
  });
  worker.on('failed', () => {
    failed++;
    tick();
  });
  worker.on('error', (e) => console.error(`bench.mjs: worker error: ${e.message}`));
  let timer;
  const timedOut = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs / 1000}s: ${completed} completed, ${failed} failed of ${jobs}`)), timeoutMs);
  });
  await Promise.race([done, timedOut]);
  clearTimeout(timer);
  const processSecs = seconds(t1);
  await worker.close();
  worker = undefined;

  const leftover = await cleanup();

  out('enqueue_seconds', enqueueSecs.toFixed(3));
  out('process_seconds', processSecs.toFixed(3));
  out('completed', completed);
  out('failed', failed);
  out('leftover_keys_deleted', leftover);
  out('enqueue_jobs_per_sec', (jobs / enqueueSecs).toFixed(1));
  out('process_jobs_per_sec', (jobs / processSecs).toFixed(1));
  if (failed > 0) process.exitCode = 1;
}

main().catch(async (e) => {
  console.error(`bench.mjs: ${e.message}`);
  await cleanup().catch(() => {});
  process.exit(1);
});
