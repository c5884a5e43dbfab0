// A chat that follows one streaming_app stream with the AI SDK's own Chat machinery (the
// AbstractChat that useChat wraps, DefaultChatTransport, its UI message stream reader). The
// demo page at /aisdk/ runs this file bundled (`npm run build`); the protocol tests run it in
// Node.js (tests/test_aisdk.py), so both read a reply the same way.
import { AbstractChat, DefaultChatTransport } from "ai";

// The state useChat keeps in React, kept here in plain fields; onChange after each change.
class ChatState {
  constructor(onChange) {
    this.onChange = onChange;
    this._status = "ready";
    this._error = undefined;
    this.messages = [];
  }
  get status() { return this._status; }
  set status(value) { this._status = value; this.onChange(); }
  get error() { return this._error; }
  set error(value) { this._error = value; this.onChange(); }
  pushMessage(message) { this.messages = this.messages.concat(message); this.onChange(); }
  popMessage() { this.messages = this.messages.slice(0, -1); this.onChange(); }
  replaceMessage(index, message) {
    this.messages = this.messages.map((m, i) => (i === index ? message : m));
    this.onChange();
  }
  snapshot(thing) { return structuredClone(thing); }
}

export class StreamChat extends AbstractChat {
  // `base`: where the site is ("" in the page); the chat's id is the stream's id.
  constructor({ streamId, base = "", onChange = () => {} }) {
    super({
      id: streamId,
      state: new ChatState(() => onChange(this)),
      transport: new DefaultChatTransport({
        api: `${base}/api/turns/`,
        // useChat's resume: GET the reply in flight; it replays from its start (the SDK's
        // default resumeStreamIsReplay), so the reader starts the message over, once.
        prepareReconnectToStreamRequest: ({ id }) => ({
          api: `${base}/streams/${encodeURIComponent(id)}/ui-message-stream`,
          credentials: "same-origin",
        }),
      }),
    });
  }

  // Follow the reply to its end: resume it, and again after each dropped connection (fetch
  // fails with a TypeError), with a short back-off, at most `maxDrops` times. The messages of
  // the drops, in order; a refusal (an HTTP error) is not retried: it stays in chat.error.
  async follow({ maxDrops = 5, backoffMs = 250 } = {}) {
    const drops = [];
    await this.resumeStream();
    while (this.status === "error" && this.error instanceof TypeError && drops.length < maxDrops) {
      drops.push(this.error.message);
      await new Promise((resolve) => setTimeout(resolve, backoffMs * drops.length));
      await this.resumeStream();
    }
    return drops;
  }
}
