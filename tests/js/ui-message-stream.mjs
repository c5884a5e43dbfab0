// Resumes one stream the way useChat does (the AI SDK's DefaultChatTransport.reconnectToStream
// with prepareReconnectToStreamRequest) and assembles it with readUIMessageStream: prints the
// chunk types seen and the UI message it built, as JSON.
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [url, chatId] = process.argv.slice(2);
const transport = new DefaultChatTransport({
  api: "/unused",
  prepareReconnectToStreamRequest: () => ({ api: url }),
});
const stream = await transport.reconnectToStream({ chatId });
const chunks = [];
let message = null;
const errors = [];
const seen = stream.pipeThrough(new TransformStream({
  transform(chunk, controller) { chunks.push(chunk.type); controller.enqueue(chunk); },
}));
for await (const update of readUIMessageStream({ stream: seen, onError: (e) => errors.push(String(e)) })) {
  message = update;
}
console.log(JSON.stringify({ chunks, message, errors }));
