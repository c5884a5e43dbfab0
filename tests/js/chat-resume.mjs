// Follows one stream with StreamChat (aisdk-chat.mjs: the AI SDK's Chat, as useChat resumes):
// prints the drops it came back from, its status and the messages it assembled, as JSON.
import { StreamChat } from "./aisdk-chat.mjs";

const [base, streamId] = process.argv.slice(2);
const chat = new StreamChat({ streamId, base });
const drops = await chat.follow({ backoffMs: 0 });
console.log(JSON.stringify({
  drops, status: chat.status, error: chat.error ? String(chat.error) : null, messages: chat.messages,
}));
