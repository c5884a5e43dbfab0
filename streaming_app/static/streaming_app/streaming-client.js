/*
 * streaming_app's browser client: one WebSocket per stream, no dependencies.
 *
 *   const client = new StreamingClient("<stream id>", {
 *     onChunk(chunk, seq) {}, onGap(fromSeq, toSeq) {}, onClosed(reason, code) {},
 *     onError(code, message) {}, onStatus(status) {},
 *     onSnapshot(state, seq) {},  // the reply up to seq, assembled: render it instead
 *   });
 *
 * A client that joins far behind gets one snapshot (the reply so far, as transcript.js's
 * StreamingTranscript assembles it) instead of every chunk; without onSnapshot it asks the
 * server for the chunks (?replay=chunks).
 *   client.connect();  client.cancel();  client.close();
 *
 * It reconnects with exponential back-off and full jitter after a dropped connection, a
 * server restart (4012) or a send-off (4013) and resumes with ?last_seq=, so every chunk
 * reaches onChunk exactly once, in order. It acks what onChunk has rendered (every ackEvery
 * chunks, or ackIntervalMs after the last one): the server sends at most a window ahead of
 * the acks, so a tab that cannot keep up is paused instead of costing the server memory.
 * Options: lastSeq, minBackoffMs (250), maxBackoffMs (10000), fullRetryMs (60000),
 * ackEvery (64), ackIntervalMs (100), random (a function returning [0, 1), default
 * Math.random: the jitter's source).
 */
(function (global) {
  "use strict";

  // Close codes after which reconnecting cannot help (see the README's close codes). The
  // server never closes with 1000, so a 1000 the client did not ask for is a dropped line.
  var FINAL_CODES = {
    4000: "stream closed", 4400: "bad request", 4413: "frame too big",
    4403: "forbidden", 4404: "not found", 4410: "stream already closed",
    4411: "deregistered", 4429: "stream full", 4500: "internal error",
  };
  // A client coming back (after a worker died) may find the stream "full" of the dead worker's
  // clients until they stop counting (the server's CLIENT_TIMEOUT_SECONDS, 30 s by default):
  // 4429 is retried with back-off for this long before it is final.
  var FULL_RETRY_MS = 60000;

  function StreamingClient(streamId, options) {
    options = options || {};
    this.streamId = streamId;
    this.lastSeq = options.lastSeq || 0;
    this.basePath = options.basePath || "/ws/streams/";
    this.minBackoffMs = options.minBackoffMs || 250;
    this.maxBackoffMs = options.maxBackoffMs || 10000;
    this.random = options.random || Math.random;
    this.handlers = options;
    this.socket = null;
    this.finished = false;
    this.attempts = 0;
    this.timer = null;
    this.fullRetryMs = options.fullRetryMs || FULL_RETRY_MS;
    this.fullSince = null;  // when a resuming client first found the stream full
    this.ackEvery = options.ackEvery || 64;
    this.ackIntervalMs = options.ackIntervalMs || 100;
    this.acked = this.lastSeq;  // what the server was told this client read
    this.ackTimer = null;
    this.unackedBytes = 0;
    this.ackBytes = 256 * 1024;  // a quarter of the server's window (from "subscribed")
  }

  StreamingClient.prototype.url = function () {
    var scheme = global.location.protocol === "https:" ? "wss://" : "ws://";
    return scheme + global.location.host + this.basePath +
      encodeURIComponent(this.streamId) + "/?ack=1&last_seq=" + this.lastSeq +
      (typeof this.handlers.onSnapshot === "function" ? "" : "&replay=chunks");
  };

  StreamingClient.prototype.emit = function (name) {
    var handler = this.handlers[name];
    if (typeof handler === "function") {
      handler.apply(null, Array.prototype.slice.call(arguments, 1));
    }
  };

  StreamingClient.prototype.connect = function () {
    var self = this;
    if (self.finished) return;
    self.emit("onStatus", self.attempts ? "reconnecting" : "connecting");
    var socket = new WebSocket(self.url());
    self.socket = socket;
    socket.onopen = function () { self.attempts = 0; };
    socket.onmessage = function (event) {
      self.unackedBytes += event.data.length;
      self.handle(JSON.parse(event.data));
    };
    socket.onclose = function (event) {
      if (self.socket !== socket) return;
      self.socket = null;
      self.stopAcking();
      if (self.finished) return;
      var resuming = self.clientId !== undefined || self.lastSeq > 0;
      if (event.code === 4429 && resuming) {
        self.fullSince = self.fullSince || Date.now();
        if (Date.now() - self.fullSince < self.fullRetryMs) {
          self.retry();
          return;
        }
      }
      if (FINAL_CODES[event.code]) {
        self.finished = true;
        self.emit("onStatus", "closed");
        if (event.code !== 4000) self.emit("onClosed", FINAL_CODES[event.code], event.code);
        return;
      }
      self.retry();
    };
  };

  /* Full jitter: a delay drawn uniformly from [0, min(max, min * 2^attempts)), so the clients
   * a restarting worker (4012) sends off all at once do not come back all at once. */
  StreamingClient.prototype.backoff = function () {
    var ceiling = Math.min(this.maxBackoffMs, this.minBackoffMs * Math.pow(2, this.attempts));
    return Math.floor(this.random() * ceiling);
  };

  StreamingClient.prototype.retry = function () {
    var self = this;
    var delay = self.backoff();
    self.attempts += 1;
    self.emit("onStatus", "waiting");
    self.timer = global.setTimeout(function () { self.connect(); }, delay);
  };

  StreamingClient.prototype.handle = function (frame) {
    switch (frame.type) {
      case "subscribed":
        this.acked = this.lastSeq;  // the server counts from the last_seq we came back with
        this.unackedBytes = 0;
        if (frame.window) this.ackBytes = Math.floor(frame.window.bytes / 4);
        this.clientId = frame.client_id;
        this.fullSince = null;
        this.emit("onStatus", "live");
        break;
      case "chunk":
        if (frame.seq !== null && frame.seq <= this.lastSeq) return; // already shown
        if (frame.seq !== null) this.lastSeq = frame.seq;
        this.emit("onChunk", frame.chunk, frame.seq);
        if (frame.seq !== null) this.read();
        break;
      case "snapshot":
        if (frame.seq <= this.lastSeq) return;
        this.lastSeq = frame.seq;
        this.emit("onSnapshot", frame.state, frame.seq);
        this.read();
        break;
      case "gap":
        this.lastSeq = Math.max(this.lastSeq, frame.to_seq);
        this.emit("onGap", frame.from_seq, frame.to_seq);
        this.read();
        break;
      case "closed":
        this.finished = true;
        this.emit("onClosed", frame.reason, 4000);
        break;
      case "reconnect":
        this.lastSeq = Math.max(this.lastSeq, frame.last_seq);
        this.emit("onStatus", "resuming");  // a restart (4012) or a send-off (4013) follows
        break;
      case "error":
        this.emit("onError", frame.code, frame.message);
        break;
    }
  };

  /* Everything up to lastSeq was rendered: ack it now after ackEvery chunks, else soon. */
  StreamingClient.prototype.read = function () {
    var self = this;
    if (self.lastSeq - self.acked >= self.ackEvery || self.unackedBytes >= self.ackBytes) {
      self.ack();
    } else if (self.ackTimer === null) {
      self.ackTimer = global.setTimeout(function () { self.ack(); }, self.ackIntervalMs);
    }
  };

  StreamingClient.prototype.ack = function () {
    this.stopAcking();
    if (this.lastSeq > this.acked && this.send({ type: "ack", seq: this.lastSeq })) {
      this.acked = this.lastSeq;
      this.unackedBytes = 0;
    }
  };

  StreamingClient.prototype.stopAcking = function () {
    if (this.ackTimer !== null) global.clearTimeout(this.ackTimer);
    this.ackTimer = null;
  };

  StreamingClient.prototype.send = function (frame) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  };

  /* Ask the server to stop the stream (its producer learns at its next push). */
  StreamingClient.prototype.cancel = function () { return this.send({ type: "cancel" }); };

  /* Stop following the stream; it goes on for others. */
  StreamingClient.prototype.close = function () {
    this.finished = true;
    this.stopAcking();
    if (this.timer) global.clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000);
  };

  global.StreamingClient = StreamingClient;
})(window);
