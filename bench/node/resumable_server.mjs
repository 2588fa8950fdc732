// Vercel's resumable-stream as a peer of the benchmark: one Node process that produces every
// stream (as the process running a generation would) and serves subscribers over HTTP.
//
//   node resumable_server.mjs <port> <streams>      (REDIS_URL names the Redis it uses)
//
// Tokens arrive on stdin, one per line: "<stream> <text>". Each becomes one SSE event whose
// id is the stream's length in characters after it, so a client's Last-Event-ID is exactly
// the skipCharacters that resumeExistingStream() takes: GET /s/<stream> resumes there.
// Every subscriber is a resumer (the producer's own stream is drained here), so each takes
// the library's Redis pub/sub path: one PUBLISH per subscriber per event.
import { webcrypto } from "node:crypto";
import http from "node:http";
import readline from "node:readline";
import { createResumableStreamContext } from "resumable-stream";

// The library calls the global crypto.randomUUID(), which Node 18 (Debian 12's) lacks.
globalThis.crypto ??= webcrypto;

const [port, streams] = process.argv.slice(2).map(Number);
const context = createResumableStreamContext({ waitUntil: null });
const feeds = [];
const lengths = [];

function event(stream, text) {
  const body = `data: ${text}\n\n`;
  // "id: <n>\n" counts towards n itself: settle the number of digits.
  let end = lengths[stream] + body.length + 5;
  end = lengths[stream] + body.length + 5 + String(end).length;
  end = lengths[stream] + body.length + 5 + String(end).length;
  const chunk = `id: ${end}\n${body}`;
  if (lengths[stream] + chunk.length !== end) throw new Error(`offset of ${chunk} is wrong`);
  lengths[stream] = end;
  return chunk;
}

async function drain(stream) {
  const reader = stream.getReader();
  while (!(await reader.read()).done) {}
}

async function produce(i) {
  lengths[i] = 0;
  const produced = await context.createNewResumableStream(String(i), () =>
    new ReadableStream({ start(controller) { feeds[i] = controller; } }),
  );
  // The producer's own reader: the process that generates keeps reading its stream.
  drain(produced).catch((error) => console.error(`stream ${i}: ${error}`));
}

await Promise.all(Array.from({ length: streams }, (_, i) => produce(i)));

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const space = line.indexOf(" ");
  const stream = Number(line.slice(0, space));
  feeds[stream].enqueue(event(stream, line.slice(space + 1)));
});

// Resolves once the client has taken what was written, or has gone.
function writable(res) {
  return new Promise((resolve) => {
    const done = () => {
      res.off("drain", done);
      res.off("close", done);
      resolve();
    };
    res.on("drain", done);
    res.on("close", done);
  });
}

async function follow(req, res, stream) {
  let reader = null;
  res.on("close", () => reader?.cancel().catch(() => {}));
  const last = req.headers["last-event-id"];
  const resumed = await context.resumeExistingStream(stream, last ? Number(last) : undefined);
  if (!resumed) {
    res.writeHead(204).end();
    return;
  }
  reader = resumed.getReader();
  if (res.destroyed) {
    await reader.cancel();
    return;
  }
  res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (!res.write(value) && !res.destroyed) await writable(res);
  }
  res.end();
}

const server = http.createServer((req, res) => {
  const match = /^\/s\/(\d+)$/.exec(req.url);
  if (!match || Number(match[1]) >= streams) {
    res.writeHead(404).end();
    return;
  }
  follow(req, res, match[1]).catch((error) => {
    // The library gives up on a resume whose producer does not answer within 1 s: a 503 the
    // load generator counts, rather than an unhandled rejection that ends the server.
    console.error(`GET ${req.url}: ${error}`);
    if (!res.headersSent) res.writeHead(503);
    res.end();
  });
});
server.listen(port, "127.0.0.1", 4096);
