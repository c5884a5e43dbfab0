// Reads one stream with the published AG-UI client (@ag-ui/client's HttpAgent): prints the
// events it saw, the messages and state it assembled, and the run's result, as JSON.
import { HttpAgent } from "@ag-ui/client";

const [url] = process.argv.slice(2);
const agent = new HttpAgent({ url });
const events = [];
const runErrors = [];
let failure = null;
try {
  const { result } = await agent.runAgent({}, { onEvent: ({ event }) => {
    events.push(event.type);
    if (event.type === "RUN_ERROR") runErrors.push(event.message);
  } });
  console.log(JSON.stringify({ events, runErrors, messages: agent.messages, state: agent.state, result }));
} catch (error) {
  failure = String(error && error.message ? error.message : error);
  console.log(JSON.stringify({ events, runErrors, messages: agent.messages, state: agent.state, failure }));
}
