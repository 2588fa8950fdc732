// Vercel's resumable-stream as a peer of the benchmark: one Node process that produces every
// stream (as the process running a generation would) and serves subscribers over HTTP.
//
//   node resumable_server.mjs <port> <streams>      (REDIS_URL names the Redis it uses)
//
// Tokens arrive on stdin, one per line: "<stream> <text>". Each becomes one SSE event whose
// id is the stream's length in characters after it, so a client's Last-Event-ID is exactly
// the skipCharacters that resumeExistingStream() takes: GET /s/<stream> resumes there.
import http from "node:http";
import readline from "node:readline";
import { createResumableStreamContext } from "resumable-stream";

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

for (let i = 0; i < streams; i++) {
  lengths.push(0);
  const produced = await context.createNewResumableStream(String(i), () =>
    new ReadableStream({ start(controller) { feeds[i] = controller; } }),
  );
  drain(produced); // the producer's own reader: the process that generates keeps reading
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const space = line.indexOf(" ");
  const stream = Number(line.slice(0, space));
  feeds[stream].enqueue(event(stream, line.slice(space + 1)));
});

const server = http.createServer(async (req, res) => {
  const match = /^\/s\/(\d+)$/.exec(req.url);
  if (!match || Number(match[1]) >= streams) {
    res.writeHead(404).end();
    return;
  }
  const last = req.headers["last-event-id"];
  const stream = await context.resumeExistingStream(match[1], last ? Number(last) : undefined);
  if (!stream) {
    res.writeHead(204).end();
    return;
  }
  res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
  const reader = stream.getReader();
  req.on("close", () => reader.cancel().catch(() => {}));
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    res.write(value);
  }
  res.end();
});
server.listen(port, "127.0.0.1", 4096);
