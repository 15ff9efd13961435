// chatkit.js: a chatkit client for the browser, over WebSocket.
//
// A dependency-free ES module, served by every chatkit server that has a
// web port (`--web-port`) at /chatkit.js. It speaks chatkit's protocol v1
// (docs/protocol.md): one JSON object per WebSocket text frame, both ways.
//
//     import { connect } from "https://chat.example.com/chatkit.js";
//     const chat = connect({ name: "alice" });
//     chat.on("message", (m) => console.log(`${m.room} ${m.from}: ${m.text}`));
//     await chat.ready;               // rejects with err.code "name_taken"...
//     await chat.join("dev");
//     await chat.say("hello", "dev");
//
// Requests return Promises settled by the server's reply to them (matched
// by `ref`); a refusal rejects with a ChatError whose `code` is the
// protocol's error code (`rate_limited`, `rejected`, `not_in_room`...).
//
// A lost connection comes back by itself (unless `reconnect: false`): the
// client waits (backoff with jitter), logs in again under the same name
// with the `resume` secret of its last welcome (which takes over its old
// session if the server still holds it), re-joins its rooms and fetches,
// room by room, what was said meanwhile from history. Every room message
// is delivered once, in id order: live messages of a room wait until its
// missed ones have been delivered. The reference is docs/browsers.md.

/** The protocol version this module speaks. */
export const PROTOCOL = 1;

/** The room every user is in on arrival. */
export const LOBBY = "lobby";

// Errors at hello after which trying again cannot help.
const FATAL_AT_HELLO = new Set(["bad_name", "unauthorized", "bad_request", "too_large"]);
// Errors that end a session for good: someone (or we, elsewhere) meant it.
const FATAL_ANYTIME = new Set(["kicked", "replaced"]);
// A reconnect refused with name_taken is tried again this many times: the
// server may not have noticed yet that our old connection died.
const MAX_NAME_TAKEN = 5;
// Live messages held back per room while it catches up; past that, the
// newer ones are dropped and read from history afterwards.
const MAX_HELD = 1000;

/** An error the server answered a request with (or a local failure). */
export class ChatError extends Error {
  /**
   * @param {string} code the protocol's error code (`name_taken`,
   *   `rate_limited`...) or a local one: `connection_closed`,
   *   `not_connected`, `timeout`.
   * @param {string} message what went wrong, for people.
   */
  constructor(code, message) {
    super(message || code);
    this.name = "ChatError";
    this.code = code;
  }
}

/**
 * Connect to a chatkit server and log in.
 *
 * @param {object} options
 * @param {string} options.name the user name (1-32 of A-Z a-z 0-9 _ - .).
 * @param {string} [options.url] the WebSocket URL; default: `/ws` on the
 *   server this module was loaded from (ws: or wss: to match).
 * @param {string} [options.token] a token or password, sent in `hello`.
 * @param {boolean} [options.reconnect=true] get a lost connection back.
 * @param {number} [options.pingInterval=25000] ms of silence after which a
 *   `ping` is sent (0: never); a connection that does not answer within
 *   `pingTimeout` ms (default 10000) counts as lost.
 * @param {number} [options.requestTimeout=10000] ms a request waits for a
 *   connection that is coming back before it fails with `not_connected`.
 * @param {number} [options.initialDelay=500] ms before the first reconnect
 *   attempt; doubled each attempt up to `maxDelay` (default 30000), less a
 *   random part of up to half.
 * @returns {Chat}
 */
export function connect(options) {
  return new Chat(options);
}

function defaultUrl() {
  const url = new URL("/ws", import.meta.url);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

/**
 * A connection to a chatkit server, made by `connect()`.
 *
 * Events (`chat.on(type, handler)`; handlers get one object):
 * - `welcome`: the server's welcome, on every (re)connection.
 * - `message`: `{id, ts, room, from, text}` in a room we are in; once
 *   per id, in id order per room, also across reconnects.
 * - `dm`: `{id, ts, from, to, text}`: a direct message, to or from us.
 * - `joined` / `left`: `{room, name, reason?}`; ours too (`name === chat.name`).
 * - `renamed`: `{old, new}`.
 * - `error`: `{code, message}`: an error that answers no request of ours
 *   (requests reject their Promise instead), or one that ends the session.
 * - `shutdown`: `{reason}`: the server is stopping (we will reconnect).
 * - `state`: `{state}` when `chat.state` changes: "connecting", "open",
 *   "reconnecting", "closed".
 * - `reconnecting`: `{attempt, delay, reason}` before each attempt.
 * - `reconnected`: `{missed, restarted}`: back, rooms re-joined, missed
 *   messages delivered (as `message` events, before this one). `restarted`
 *   lists the rooms of the `restarted` events of this reconnect.
 * - `restarted`: `{room}`: the message ids of `room` started over (the
 *   server restarted without its history), so its new messages may reuse
 *   ids seen before; sent before they are delivered.
 * - `close`: `{reason, code}`: the end; no more events. `code` is the
 *   error code that ended it (`kicked`, `name_taken`...) or "closed"
 *   after `chat.close()`, "gave_up" never (it keeps trying).
 */
export class Chat {
  constructor(options) {
    if (!options || typeof options.name !== "string") {
      throw new TypeError("connect({name}) needs a name");
    }
    this.url = options.url || defaultUrl();
    /** Our user name (it follows our renames). */
    this.name = options.name;
    this.token = options.token;
    this.options = {
      reconnect: options.reconnect !== false,
      pingInterval: options.pingInterval ?? 25000,
      pingTimeout: options.pingTimeout ?? 10000,
      requestTimeout: options.requestTimeout ?? 10000,
      initialDelay: options.initialDelay ?? 500,
      maxDelay: options.maxDelay ?? 30000,
    };
    /** "connecting", "open", "reconnecting" or "closed". */
    this.state = "connecting";
    /** The last welcome from the server. */
    this.welcome = null;
    this._handlers = new Map();
    this._ws = null;
    this._nextRef = 1;
    this._pending = new Map(); // ref -> {resolve, reject}
    this._rooms = new Set(); // rooms we are in
    this._seen = new Map(); // room -> the last message delivered there
    this._marks = new Map(); // room -> newest message there when we joined
    this._maxSeen = 0;
    this._resume = null; // a resume under way (see _catchUp)
    this._waiters = []; // requests waiting for the connection
    this._closing = false;
    this._attempt = 0;
    this._nameTaken = 0;
    this._timer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    this._readyCallbacks = null;
    /** Resolves with the first welcome; rejects (a ChatError) if the
     * first login fails (`name_taken`, `bad_name`, `unauthorized`...). */
    this.ready = new Promise((resolve, reject) => {
      this._readyCallbacks = { resolve, reject };
    });
    this.ready.catch(() => {}); // a rejection nobody awaits is not an error
    this._open();
  }

  // --- events --------------------------------------------------------------

  /** Call `handler(event)` for each event of `type`; returns a function
   * that removes it. */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    return () => this.off(type, handler);
  }

  /** Remove a handler added with `on`. */
  off(type, handler) {
    this._handlers.get(type)?.delete(handler);
  }

  _emit(type, event) {
    for (const handler of [...(this._handlers.get(type) || [])]) {
      try {
        handler(event);
      } catch (error) {
        // One handler's bug must not stop the others, or the client.
        setTimeout(() => {
          throw error;
        });
      }
    }
  }

  /** The rooms we are in (a copy). */
  get joinedRooms() {
    return new Set(this._rooms);
  }

  // --- requests ------------------------------------------------------------

  /** Say `text` in `room` (default lobby); resolves with our own
   * `message` as the server stored it (its `id` and `ts`). */
  say(text, room = LOBBY) {
    return this._request({ type: "say", room, text });
  }

  /** Send `text` to user `to`; resolves with our copy of the `dm`. */
  dm(to, text) {
    return this._request({ type: "dm", to, text });
  }

  /** Join `room` (created if need be); resolves with our `joined`. */
  join(room) {
    return this._request({ type: "join", room });
  }

  /** Leave `room`; resolves with our `left`. */
  leave(room) {
    return this._request({ type: "leave", room });
  }

  /** Change our name; resolves with the `renamed` event. */
  nick(name) {
    return this._request({ type: "nick", name });
  }

  /** Resolves with the names of the members of `room` (an array). */
  async who(room = LOBBY) {
    return (await this._request({ type: "who", room })).names;
  }

  /** Resolves with the server's rooms: an array of `{name, members}`. */
  async rooms() {
    return (await this._request({ type: "rooms" })).rooms;
  }

  /**
   * Resolves with a page of `room`'s history, oldest first: the newest
   * messages, or with `before` (an id) those just older than it, or with
   * `after` those just newer. At most `limit` (and the server's page size).
   * Only an empty page means there is no more.
   */
  async history(room, { before, after, limit } = {}) {
    const request = { type: "history", room };
    if (before !== undefined) request.before = before;
    if (after !== undefined) request.after = after;
    if (limit !== undefined) request.limit = limit;
    return (await this._request(request)).messages;
  }

  /** Resolves with the round trip of a `ping`, in ms. */
  async ping() {
    const start = performance.now();
    await this._request({ type: "ping" });
    return performance.now() - start;
  }

  /** Log out (`bye`) and close; no reconnect, then a `close` event. */
  close() {
    if (this._closing) return;
    this._closing = true;
    if (this._ws && this._ws.readyState === WebSocket.OPEN && this.state === "open") {
      this._send({ type: "bye" });
    }
    this._finish("closed", "closed by the page");
  }

  async _request(request) {
    if (this.state !== "open" || this._resume) await this._whenOpen(request.type);
    return this._exchange(request);
  }

  // Sends `request` with a new ref; the reply with that ref settles it.
  _exchange(request) {
    if (!this._ws || this._ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new ChatError("connection_closed", "not connected"));
    }
    const ref = `r${this._nextRef++}`;
    return new Promise((resolve, reject) => {
      this._pending.set(ref, { resolve, reject });
      this._send({ ...request, ref });
    });
  }

  // Requests wait while the client is (re)connecting or resuming, for up
  // to requestTimeout: resume's own requests go straight out instead.
  _whenOpen(what) {
    if (this.state === "closed") {
      return Promise.reject(new ChatError("not_connected", `cannot ${what}: closed`));
    }
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      waiter.timer = setTimeout(() => {
        this._waiters = this._waiters.filter((w) => w !== waiter);
        reject(new ChatError("not_connected", `cannot ${what}: not connected`));
      }, this.options.requestTimeout);
      this._waiters.push(waiter);
    });
  }

  _releaseWaiters(error) {
    const waiters = this._waiters;
    this._waiters = [];
    for (const waiter of waiters) {
      clearTimeout(waiter.timer);
      if (error) waiter.reject(error);
      else waiter.resolve();
    }
  }

  // A request of the resume itself: sent at once, a rate limit waited out.
  async _resumeRequest(request) {
    let pause = 250;
    for (;;) {
      try {
        return await this._exchange(request);
      } catch (error) {
        if (error.code !== "rate_limited") throw error;
        await new Promise((resolve) => setTimeout(resolve, pause));
        pause = Math.min(pause * 2, 5000);
      }
    }
  }

  _send(object) {
    this._ws.send(JSON.stringify(object));
  }

  // --- the connection --------------------------------------------------------

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", { state });
  }

  _open() {
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (error) {
      this._finish("bad_url", String(error.message || error));
      return;
    }
    this._ws = ws;
    this._helloDone = false;
    ws.onopen = () => {
      const hello = { type: "hello", name: this.name, protocol: PROTOCOL };
      if (this.token) hello.token = this.token;
      if (this.welcome && this.welcome.resume) hello.resume = this.welcome.resume;
      this._send(hello);
    };
    ws.onmessage = (frame) => {
      if (ws !== this._ws) return;
      let event;
      try {
        event = JSON.parse(frame.data);
      } catch {
        return; // not ours to understand
      }
      this._onEvent(event);
    };
    ws.onclose = (close) => {
      if (ws !== this._ws) return;
      this._lost(close.reason || `connection closed (${close.code})`);
    };
    // onerror is always followed by onclose, which handles it.
  }

  _onEvent(event) {
    this._armPing();
    if (!this._helloDone) {
      this._onHelloReply(event);
      return;
    }
    if (event.ref !== undefined && this._pending.has(event.ref)) {
      this._settle(event);
    }
    switch (event.type) {
      case "message":
        this._onMessage(event);
        break;
      case "dm":
        this._emit("dm", strip(event));
        break;
      case "joined":
        this._onJoined(event);
        break;
      case "left":
        this._onLeft(event);
        break;
      case "renamed":
        if (event.old === this.name) this.name = event.new;
        this._emit("renamed", strip(event));
        break;
      case "error":
        if (FATAL_ANYTIME.has(event.code)) {
          this._emit("error", strip(event));
          this._finish(event.code, event.message);
        } else if (event.ref === undefined) {
          this._emit("error", strip(event));
        }
        break;
      case "shutdown":
        this._emit("shutdown", strip(event));
        break;
      default:
        break; // welcome again, who, rooms, history, pong: replies only
    }
  }

  _settle(event) {
    const pending = this._pending.get(event.ref);
    this._pending.delete(event.ref);
    if (event.type === "error") pending.reject(new ChatError(event.code, event.message));
    else pending.resolve(strip(event));
  }

  _onHelloReply(event) {
    if (event.type === "welcome") {
      this._helloDone = true;
      const first = this.welcome === null;
      this.welcome = event;
      this.name = event.name;
      this._attempt = 0;
      this._nameTaken = 0;
      this._emit("welcome", event);
      if (first) {
        this._setState("open");
        this._readyCallbacks.resolve(event);
        this._releaseWaiters();
      } else {
        this._catchUp();
      }
      return;
    }
    if (event.type !== "error") return;
    const error = new ChatError(event.code, event.message);
    const first = this.welcome === null;
    const retry =
      !first &&
      !FATAL_AT_HELLO.has(event.code) &&
      (event.code !== "name_taken" || ++this._nameTaken < MAX_NAME_TAKEN);
    if (first || !retry) {
      this._emit("error", strip(event));
      this._readyCallbacks.reject(error);
      this._finish(event.code, event.message);
    }
    // Otherwise (server_full, unavailable, a name not yet let go) the
    // close that follows brings the next attempt.
  }

  _lost(reason) {
    clearTimeout(this._pingTimer);
    clearTimeout(this._pongTimer);
    this._failPending(new ChatError("connection_closed", reason));
    this._resume = null;
    if (this._closing || this.state === "closed") return;
    if (!this.options.reconnect || this.welcome === null) {
      // Never logged in (or asked not to): there is no session to get back.
      const error = new ChatError("connection_closed", reason);
      this._readyCallbacks.reject(error);
      this._finish("connection_closed", reason);
      return;
    }
    this._attempt += 1;
    const base = Math.min(
      this.options.maxDelay,
      this.options.initialDelay * 2 ** Math.min(this._attempt - 1, 20),
    );
    const delay = Math.round(base * (1 - 0.5 * Math.random()));
    this._setState("reconnecting");
    this._emit("reconnecting", { attempt: this._attempt, delay, reason });
    this._timer = setTimeout(() => this._open(), delay);
  }

  _failPending(error) {
    const pending = this._pending;
    this._pending = new Map();
    for (const { reject } of pending.values()) reject(error);
  }

  _finish(code, reason) {
    if (this.state === "closed") return;
    this._closing = true;
    clearTimeout(this._timer);
    clearTimeout(this._pingTimer);
    clearTimeout(this._pongTimer);
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      ws.close(1000);
    }
    const error = new ChatError(code, reason);
    this._failPending(error);
    this._releaseWaiters(error);
    this._setState("closed");
    this._emit("close", { code, reason });
  }

  // Keep-alive: a protocol ping after pingInterval of silence (browsers do
  // not let a page see WebSocket pings); no answer within pingTimeout and
  // the connection counts as lost.
  _armPing() {
    clearTimeout(this._pongTimer);
    clearTimeout(this._pingTimer);
    if (!this.options.pingInterval) return;
    const ws = this._ws;
    this._pingTimer = setTimeout(() => {
      if (ws !== this._ws || ws.readyState !== WebSocket.OPEN) return;
      this._send({ type: "ping" });
      this._pongTimer = setTimeout(() => {
        if (ws !== this._ws) return;
        ws.onclose = ws.onmessage = ws.onopen = null;
        ws.close(4000, "no answer to ping");
        this._lost("no answer to ping");
      }, this.options.pingTimeout);
    }, this.options.pingInterval);
  }

  // --- rooms and messages ----------------------------------------------------

  _onJoined(event) {
    const ours = event.name === this.name;
    const resume = this._resume;
    if (ours && resume && resume.rejoining.has(event.room)) {
      resume.rejoining.delete(event.room);
      return; // our re-join: as far as the page knows, we never left
    }
    if (resume && resume.dropping.has(event.room)) return;
    if (ours) {
      this._rooms.add(event.room);
      this._noteMark(event.room);
    }
    this._emit("joined", strip(event));
  }

  _onLeft(event) {
    if (this._resume && this._resume.dropping.has(event.room)) return;
    if (event.name === this.name) {
      this._rooms.delete(event.room);
      this._seen.delete(event.room);
      this._marks.delete(event.room);
    }
    this._emit("left", strip(event));
  }

  // Where a room's news starts for us: its newest message when we joined.
  async _noteMark(room) {
    try {
      const [newest] = (await this._resumeRequest({ type: "history", room, limit: 1 }))
        .messages;
      if (newest && !this._marks.has(room) && this._rooms.has(room)) {
        this._marks.set(room, newest);
      }
    } catch {
      // No mark: a resume reads from the newest id seen anywhere.
    }
  }

  _onMessage(event) {
    const resume = this._resume;
    if (resume) {
      if (resume.dropping.has(event.room)) return;
      const held = resume.holding.get(event.room);
      if (held) {
        if (!resume.overflowed.has(event.room) && held.length < MAX_HELD) held.push(event);
        else resume.overflowed.add(event.room);
        return;
      }
    }
    this._deliver(event);
  }

  // Hands a room message to the page, unless it had it (or, in a resume,
  // any message up to `floor`) already.
  _deliver(event, floor = 0) {
    const last = this._seen.get(event.room);
    if (event.id <= floor || (last && event.id <= last.id)) return false;
    this._seen.set(event.room, event);
    this._maxSeen = Math.max(this._maxSeen, event.id);
    this._emit("message", strip(event));
    return true;
  }

  // After a reconnect: re-join the rooms, leave the lobby again if we had
  // left it, then per room deliver what was said after the last message we
  // saw, and the live messages held meanwhile.
  async _catchUp() {
    const ws = this._ws;
    const wanted = new Set(this._rooms);
    const resume = {
      holding: new Map([...wanted].map((room) => [room, []])),
      overflowed: new Set(),
      restarted: [], // rooms whose ids started over: read anew
      rejoining: new Set([...wanted, LOBBY]),
      dropping: new Set(wanted.has(LOBBY) ? [] : [LOBBY]),
    };
    this._resume = resume;
    let missed = 0;
    try {
      for (const room of [...wanted].sort()) {
        if (room === LOBBY) continue;
        try {
          await this._resumeRequest({ type: "join", room });
        } catch (error) {
          if (error.code === "connection_closed") throw error;
          resume.holding.delete(room);
          resume.rejoining.delete(room);
          this._rooms.delete(room);
          this._seen.delete(room);
          this._emit("left", { room, name: this.name, reason: error.code });
        }
      }
      if (resume.dropping.size) {
        await this._resumeRequest({ type: "leave", room: LOBBY });
        resume.dropping.clear();
      }
      const order = [...resume.holding.keys()].sort((a, b) =>
        a === LOBBY ? -1 : b === LOBBY ? 1 : a < b ? -1 : 1,
      );
      for (const room of order) missed += await this._catchUpRoom(resume, room);
    } catch (error) {
      if (ws === this._ws) this._resume = null;
      return; // the connection ended: the next one tries again
    }
    if (ws !== this._ws) return;
    this._resume = null;
    this._setState("open");
    this._releaseWaiters();
    this._emit("reconnected", { missed, restarted: resume.restarted });
  }

  async _catchUpRoom(resume, room) {
    const held = resume.holding.get(room);
    let missed = 0;
    try {
      // The newest message of the room we know of: the last delivered, or
      // the newest there when we joined.
      const seen = this._seen.get(room);
      const mark = this._marks.get(room);
      const known = !seen ? mark : !mark || seen.id >= mark.id ? seen : mark;
      let floor = known ? known.id : this._maxSeen;
      let after;
      let page;
      if (known) {
        // Ask from our last message on: if the server no longer has it as
        // we saw it, its ids started over (a restart without a database)
        // and the room is read anew.
        page = await this._historyAfter(room, known.id - 1);
        if (!page.length || (page[0].id === known.id && !sameMessage(page[0], known))) {
          this._seen.delete(room);
          this._marks.delete(room);
          resume.restarted.push(room);
          this._emit("restarted", { room });
          after = floor = 0;
          page = await this._historyAfter(room, 0);
        } else {
          after = known.id - 1;
        }
      } else {
        after = this._maxSeen;
        page = await this._historyAfter(room, after);
      }
      for (;;) {
        while (page.length) {
          for (const message of page) if (this._deliver(message, floor)) missed += 1;
          if (page[page.length - 1].id <= after) break;
          after = page[page.length - 1].id;
          page = await this._historyAfter(room, after);
        }
        while (held.length) this._deliver(held.shift(), floor);
        if (!resume.overflowed.has(room)) break;
        resume.overflowed.delete(room); // the dropped ones are in history
        after = this._seen.get(room)?.id ?? after;
        page = await this._historyAfter(room, after);
      }
    } catch (error) {
      if (error.code === "connection_closed") throw error;
      while (held.length) this._deliver(held.shift());
    }
    resume.holding.delete(room);
    return missed;
  }

  async _historyAfter(room, after) {
    return (await this._resumeRequest({ type: "history", room, after })).messages;
  }
}

function strip(event) {
  const { ref, ...rest } = event;
  return rest;
}

function sameMessage(a, b) {
  return a.id === b.id && a.ts === b.ts && a.from === b.from && a.text === b.text;
}
