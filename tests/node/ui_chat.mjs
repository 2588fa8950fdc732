// Drives a gateway's /api/chat with the ai package's own DefaultChatTransport, as useChat does.
// node ui_chat.mjs <base url> ask <chat id> <text> [<deltas before hanging up>]
// node ui_chat.mjs <base url> resume <chat id>
// Prints one JSON line: {"status": 204} or {"chunks": [...], "text": "..."}.
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [base, mode, chatId, text, hangUpAfter] = process.argv.slice(2);
const transport = new DefaultChatTransport({
  api: `${base}/api/chat`,
  headers: process.env.TOKENRELAY_KEY ? { Authorization: `Bearer ${process.env.TOKENRELAY_KEY}` } : {},
});

async function read(stream, limit, hangUp) {
  const [forChunks, forMessage] = stream.tee();
  const chunks = [];
  const reader = forChunks.getReader();
  let deltas = 0;
  while (true) {
    const { value, done } = await reader.read();
    if (done) break;
    chunks.push(value);
    if (value.type === "text-delta" && ++deltas === limit) {
      hangUp(); // the page goes away mid-answer: the connection closes
      return { chunks, text: null };
    }
  }
  let message;
  for await (const state of readUIMessageStream({ stream: forMessage })) message = state;
  const whole = message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
  return { chunks, text: whole };
}

if (mode === "ask") {
  const abort = new AbortController();
  const stream = await transport.sendMessages({
    chatId,
    messages: [{ id: "u1", role: "user", parts: [{ type: "text", text }] }],
    trigger: "submit-message",
    messageId: undefined,
    abortSignal: abort.signal,
  });
  const limit = hangUpAfter ? Number(hangUpAfter) : Infinity;
  console.log(JSON.stringify(await read(stream, limit, () => abort.abort())));
} else {
  const stream = await transport.reconnectToStream({ chatId });
  const result = stream === null ? { status: 204 } : await read(stream, Infinity, () => {});
  console.log(JSON.stringify(result));
}
