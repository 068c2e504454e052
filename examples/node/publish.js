#!/usr/bin/env node
// Publish ordered_tasks messages to Redis from Node.js, without Celery and without npm packages.
//
// Follows docs/partitioning.rst: canonical key -> SHA-256 -> jump hash -> queue, a Celery
// protocol-2 JSON body, the ordered_key / ordered_partition headers, and kombu's Redis envelope
// (LPUSH onto the queue's list; workers pop from the other end).
//
//   node publish.js --redis redis://127.0.0.1:6379/0 --prefix ordered --partitions 16 \
//        --task accounts.tasks.add_members --key 42 --kwargs '{"account_id": 42, "office": "HQ"}'
//   node publish.js --vectors 1,8,16,1024 account-1 42     (print the partitions of keys)
"use strict";

const crypto = require("crypto");
const net = require("net");

const JUMP = 2862933555777941757n;
const MASK = (1n << 64n) - 1n;
const MAX_KEY_LENGTH = 255; // code points

function canonicalKey(key) {
  if (typeof key === "bigint") return key.toString(10); // integers beyond 2^53: pass a BigInt or a string
  if (typeof key === "number") {
    if (!Number.isSafeInteger(key)) throw new Error(`key ${key} is not a safe integer; pass it as a string or BigInt`);
    return String(key);
  }
  if (typeof key !== "string" || key.length === 0) throw new Error("the key must be a non-empty string or an integer");
  if ([...key].length > MAX_KEY_LENGTH) throw new Error(`the key has more than ${MAX_KEY_LENGTH} characters`);
  return key;
}

function keyHash(canonical) {
  return crypto.createHash("sha256").update(canonical, "utf8").digest().readBigUInt64BE(0);
}

function jumpHash(key, buckets) {
  let b = -1n;
  let j = 0n;
  const n = BigInt(buckets);
  while (j < n) {
    b = j;
    key = (key * JUMP + 1n) & MASK;
    j = BigInt(Math.floor(Number(b + 1n) * (2 ** 31 / Number((key >> 33n) + 1n))));
  }
  return Number(b);
}

function partitionOf(key, partitions) {
  return jumpHash(keyHash(canonicalKey(key)), partitions);
}

function envelope({ task, args, kwargs, key, partition, queue }) {
  const id = crypto.randomUUID();
  const body = JSON.stringify([args, kwargs, { callbacks: null, errbacks: null, chain: null, chord: null }]);
  return JSON.stringify({
    body: Buffer.from(body, "utf8").toString("base64"),
    "content-encoding": "utf-8",
    "content-type": "application/json",
    headers: {
      lang: "js", task, id, root_id: id, parent_id: null, group: null, retries: 0,
      eta: null, expires: null, argsrepr: JSON.stringify(args), kwargsrepr: JSON.stringify(kwargs),
      origin: "node-example", ordered_key: key, ordered_partition: partition,
      ordered_published_at: Date.now() / 1000,
    },
    properties: {
      correlation_id: id, reply_to: "", delivery_mode: 2, priority: 0, body_encoding: "base64",
      delivery_tag: crypto.randomUUID(), delivery_info: { exchange: queue, routing_key: queue },
    },
  });
}

function resp(...parts) {
  return `*${parts.length}\r\n` + parts.map((p) => `$${Buffer.byteLength(p)}\r\n${p}\r\n`).join("");
}

function send(url, commands) {
  const { hostname, port, pathname } = new URL(url);
  const db = pathname.replace("/", "") || "0";
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ host: hostname, port: Number(port || 6379) }, () => {
      socket.write(resp("SELECT", db) + commands.map((c) => resp(...c)).join(""));
    });
    let replies = "";
    socket.on("data", (chunk) => {
      replies += chunk.toString();
      if (replies.includes("-ERR")) { socket.destroy(); reject(new Error(replies)); }
      if (replies.split("\r\n").length > commands.length + 1) { socket.end(); resolve(replies); }
    });
    socket.on("error", reject);
  });
}

function parseArgs(argv) {
  const out = { rest: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i].startsWith("--")) out[argv[i].slice(2)] = argv[++i];
    else out.rest.push(argv[i]);
  }
  return out;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  if (opts.vectors) {
    for (const raw of opts.rest) {
      const key = /^-?\d+$/.test(raw) ? BigInt(raw) : raw;
      console.log(JSON.stringify([raw, opts.vectors.split(",").map((p) => partitionOf(key, Number(p)))]));
    }
    return;
  }
  const partitions = Number(opts.partitions || 16);
  const keys = (opts.key || "").split(",");
  const commands = [];
  for (const [index, raw] of keys.entries()) {
    const key = canonicalKey(raw);
    const partition = partitionOf(key, partitions);
    const queue = `${opts.prefix || "ordered"}.${partition}`;
    const kwargs = JSON.parse((opts.kwargs || "{}").replaceAll("$KEY", key).replaceAll("$N", String(index)));
    commands.push(["LPUSH", queue, envelope({ task: opts.task, args: [], kwargs, key, partition, queue })]);
  }
  await send(opts.redis || "redis://127.0.0.1:6379/0", commands);
  console.log(`published ${commands.length} message(s)`);
}

module.exports = { canonicalKey, keyHash, jumpHash, partitionOf };
if (require.main === module) main().catch((err) => { console.error(err.message); process.exit(1); });
