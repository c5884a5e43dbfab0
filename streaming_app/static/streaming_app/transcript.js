/*
 * The reducer over chunks, ported from streaming_app/transcripts.py (the server's, which saves
 * transcripts and builds the `snapshot` frame), so a page assembles a reply the way the server
 * does: a `snapshot` frame's state, then StreamingTranscript.reduce(state, seq, chunk) for each
 * chunk after it. tests/test_snapshots.py checks both agree over every chunk type.
 *
 *   var state = StreamingTranscript.empty();
 *   state = StreamingTranscript.reduce(state, seq, chunk);  // state.text, state.tool_calls...
 */
(function (global) {
  "use strict";

  function value(x) { return x === undefined ? null : x; }

  function empty() {
    return {
      text: "", tool_calls: [], ui_commands: [], progress: [], errors: [], metadata: {},
      usage: null, first_seq: 0, last_seq: 0, complete: true, history_lost: false,
      finished: false,
    };
  }

  function reduce(state, seq, chunk) {
    if (state.first_seq === 0) {
      state.first_seq = seq;
      state.complete = state.complete && seq === 1;
    } else if (seq !== state.last_seq + 1) {
      state.complete = false;
    }
    state.last_seq = seq;
    switch (chunk.type) {
      case "text_delta":
        state.text += chunk.text_delta || "";
        break;
      case "final_response":
        state.finished = true;
        if (chunk.final_response_text != null) state.text = chunk.final_response_text;
        state.ui_commands = state.ui_commands.concat(chunk.final_ui_commands || []);
        if (chunk.usage != null) state.usage = chunk.usage;
        break;
      case "tool_call_request":
        (chunk.tool_calls || []).forEach(function (call) {
          state.tool_calls.push({
            id: value(call.id), name: value(call.name), arguments: value(call.arguments),
            result: null, is_success: null, error_message: null,
          });
        });
        break;
      case "tool_result_emission": {
        var id = value(chunk.tool_call_id);
        var call = state.tool_calls.filter(function (c) { return c.id === id; })[0];
        if (!call) {  // a result without its request (trimmed): keep it anyway
          call = { id: id, name: value(chunk.tool_name), arguments: null };
          state.tool_calls.push(call);
        }
        call.result = value(chunk.tool_result);
        call.is_success = "is_success" in chunk ? chunk.is_success : true;
        call.error_message = value(chunk.error_message);
        break;
      }
      case "ui_command":
        state.ui_commands = state.ui_commands.concat(chunk.ui_commands || []);
        break;
      case "system_progress":
        state.progress.push({
          message: value(chunk.message), progress_percentage: value(chunk.progress_percentage),
          status_code: value(chunk.status_code),
        });
        break;
      case "metadata_update":
        Object.assign(state.metadata, chunk.updates || {});
        break;
      case "error":
        state.errors.push({
          code: value(chunk.code), message: value(chunk.message), details: value(chunk.details),
        });
        break;
    }
    return state;
  }

  var StreamingTranscript = { empty: empty, reduce: reduce };
  global.StreamingTranscript = StreamingTranscript;
  if (typeof module !== "undefined" && module.exports) module.exports = { StreamingTranscript: StreamingTranscript };
})(typeof window !== "undefined" ? window : globalThis);
