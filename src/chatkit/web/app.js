// The chat page: the user interface around chatkit.js.
//
// Every text that comes from the server (names, rooms, messages, errors)
// goes into the page through textContent, never as HTML.

import { connect, LOBBY } from "./chatkit.js";

const PAGE = 50; // messages per history request
const NAME = /^[A-Za-z0-9_.-]{1,32}$/;
const ROOM = /^[A-Za-z0-9_.-]{1,64}$/;
const COLORS = 8; // avatar colour classes c0..c7 in style.css

const $ = (id) => document.getElementById(id);

let chat = null;
let me = "";
let current = null; // the conversation shown
const conversations = new Map(); // "room:dev" / "dm:bob" -> conversation

// --- small DOM helpers --------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function hhmm(ts) {
  const date = new Date(ts * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

function colorOf(name) {
  let hash = 0;
  for (const ch of name.toLowerCase()) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return `c${hash % COLORS}`;
}

function isPhone() {
  return window.matchMedia("(max-width: 760px)").matches;
}

// --- messages to the person -----------------------------------------------------

const EXPLAIN = {
  name_taken: "That name is taken. Pick another one.",
  bad_name: "Names are 1 to 32 letters, digits, _ - or . (no spaces).",
  unauthorized: "The server refused the login: wrong or missing token or password.",
  connection_closed: "Cannot reach the chat server.",
  server_full: "The server is full. Try again later.",
  rate_limited: "You are sending too fast. Wait a moment and try again.",
  not_connected: "Not connected: nothing was sent.",
  too_many_rooms: "You are in too many rooms. Leave one first.",
  no_such_user: "Nobody of that name is online.",
  unavailable: "The server cannot do that right now. Try again.",
};

function explain(error) {
  if (error.code === "rejected") return `Not sent: ${error.message}`;
  if (error.code === "bad_name" && error.message) return error.message;
  return EXPLAIN[error.code] || error.message || String(error);
}

let toastTimer = null;
function toast(text, kind = "error") {
  const box = $("toast");
  box.textContent = text;
  box.className = `toast ${kind}`;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    box.hidden = true;
  }, 6000);
}

function banner(text, kind = "warn") {
  const node = $("banner");
  if (!text) {
    node.hidden = true;
    return;
  }
  node.textContent = text;
  node.className = `banner ${kind}`;
  node.hidden = false;
}

// --- conversations --------------------------------------------------------------

function conversation(kind, name) {
  const key = `${kind}:${name}`;
  let conv = conversations.get(key);
  if (!conv) {
    conv = {
      key,
      kind,
      name,
      items: [], // messages ({id...}) and notices ({notice, ts}), in order
      ids: new Set(),
      lastId: 0,
      unread: 0,
      members: new Set(),
      historyLoaded: kind === "dm", // direct messages have no history
      historyDone: kind === "dm",
      loadingOlder: false,
    };
    conversations.set(key, conv);
  }
  return conv;
}

// A live message goes last; one from history goes where its id says.
function addMessage(conv, message, live) {
  if (conv.ids.has(message.id)) return false;
  conv.ids.add(message.id);
  if (live && message.id > conv.lastId) {
    conv.items.push(message);
  } else {
    let at = 0;
    for (let i = conv.items.length - 1; i >= 0; i--) {
      const item = conv.items[i];
      if (item.id !== undefined && item.id < message.id) {
        at = i + 1;
        break;
      }
    }
    conv.items.splice(at, 0, message);
  }
  conv.lastId = Math.max(conv.lastId, message.id);
  return true;
}

function addNotice(conv, text) {
  conv.items.push({ notice: text, ts: Date.now() / 1000 });
  if (conv === current) renderMessages("stick");
}

function oldestId(conv) {
  for (const item of conv.items) if (item.id !== undefined) return item.id;
  return undefined;
}

// --- rendering --------------------------------------------------------------------

function renderSidebar() {
  const rooms = $("rooms");
  const dms = $("dms");
  rooms.replaceChildren();
  dms.replaceChildren();
  const sorted = [...conversations.values()].sort((a, b) =>
    a.name === LOBBY ? -1 : b.name === LOBBY ? 1 : a.name.localeCompare(b.name),
  );
  let unreadElsewhere = false;
  for (const conv of sorted) {
    const li = el("li");
    const button = el("button", "conv");
    button.type = "button";
    button.dataset.testid = `${conv.kind === "room" ? "room" : "dm"}-${conv.name}`;
    if (conv === current) {
      button.classList.add("active");
      button.setAttribute("aria-current", "true");
    }
    button.append(el("span", "conv-prefix", conv.kind === "room" ? "#" : "@"));
    button.append(el("span", "conv-name", conv.name));
    if (conv.unread > 0) {
      const badge = el("span", "badge", conv.unread > 99 ? "99+" : String(conv.unread));
      badge.dataset.testid = `unread-${conv.name}`;
      badge.setAttribute("aria-label", `${conv.unread} unread`);
      button.append(badge);
      button.classList.add("has-unread");
      unreadElsewhere = true;
    }
    button.addEventListener("click", () => show(conv));
    li.append(button);
    (conv.kind === "room" ? rooms : dms).append(li);
  }
  $("dms-empty").hidden = dms.children.length > 0;
  $("menu-unread").hidden = !unreadElsewhere;
}

function renderHeader() {
  const title = $("title");
  title.replaceChildren();
  if (!current) return;
  title.append(el("span", "title-prefix", current.kind === "room" ? "#" : "@"));
  title.append(document.createTextNode(current.name));
  $("leave-button").textContent = current.kind === "room" ? "Leave" : "Close";
  $("members-button").hidden = current.kind !== "room";
  $("member-count").textContent = current.kind === "room" ? String(current.members.size) : "";
  $("message-input").placeholder =
    current.kind === "room" ? `Message #${current.name}` : `Message @${current.name}`;
}

function renderMembers() {
  const list = $("members");
  list.replaceChildren();
  if (!current) return;
  const names = current.kind === "room" ? [...current.members] : [me, current.name];
  names.sort((a, b) => a.localeCompare(b, undefined, { sensitivity: "base" }));
  for (const name of names) {
    const li = el("li");
    const button = el("button", "member");
    button.type = "button";
    button.dataset.testid = `member-${name}`;
    button.append(el("span", `avatar small ${colorOf(name)}`, name.slice(0, 1).toUpperCase()));
    button.append(el("span", "member-name", name));
    if (name === me) {
      button.append(el("span", "you", "you"));
      button.disabled = true;
    } else {
      button.title = `Message ${name}`;
      button.addEventListener("click", () => openDm(name));
    }
    li.append(button);
    list.append(li);
  }
  $("member-count").textContent = current.kind === "room" ? String(current.members.size) : "";
}

function messageNode(item, previous) {
  if (item.notice !== undefined) {
    const li = el("li", "notice");
    li.dataset.testid = "notice";
    li.append(el("span", "notice-text", item.notice));
    return li;
  }
  const li = el("li", "message");
  li.dataset.testid = "message";
  li.dataset.id = String(item.id);
  li.dataset.from = item.from;
  if (item.from === me) li.classList.add("mine");
  const continued =
    previous &&
    previous.notice === undefined &&
    previous.from === item.from &&
    item.ts - previous.ts < 300;
  if (continued) li.classList.add("continued");
  const avatar = el("span", `avatar ${colorOf(item.from)}`, item.from.slice(0, 1).toUpperCase());
  avatar.setAttribute("aria-hidden", "true");
  const body = el("div", "body");
  const meta = el("div", "meta");
  meta.append(el("span", "from", item.from));
  const time = el("time", "time", hhmm(item.ts));
  time.dateTime = new Date(item.ts * 1000).toISOString();
  time.title = new Date(item.ts * 1000).toLocaleString();
  meta.append(time);
  const text = el("div", "text", item.text);
  text.dataset.testid = "message-text";
  body.append(meta, text);
  li.append(avatar, body);
  return li;
}

// keep: "bottom" (scroll to the newest), "stick" (stay at the bottom if
// there), "anchor" (keep what is on screen where it is: older ones above).
function renderMessages(keep) {
  const scroller = $("scroller");
  const list = $("messages");
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  const height = scroller.scrollHeight;
  const top = scroller.scrollTop;
  const nodes = [];
  let previous = null;
  for (const item of current ? current.items : []) {
    nodes.push(messageNode(item, previous));
    previous = item;
  }
  list.replaceChildren(...nodes);
  renderHistoryStatus();
  if (keep === "bottom" || (keep === "stick" && atBottom)) {
    scroller.scrollTop = scroller.scrollHeight;
  } else if (keep === "anchor") {
    scroller.scrollTop = top + (scroller.scrollHeight - height);
  }
}

function renderHistoryStatus() {
  const status = $("history-status");
  if (!current) {
    status.textContent = "";
  } else if (current.kind === "dm") {
    status.textContent = `Your conversation with ${current.name}. Direct messages are not kept by the server.`;
  } else if (current.loadingOlder) {
    status.textContent = "Loading older messages...";
  } else if (current.historyDone) {
    status.textContent = `This is the beginning of #${current.name}.`;
  } else {
    status.textContent = "";
  }
}

function render() {
  renderSidebar();
  renderHeader();
  renderMembers();
  renderMessages("bottom");
}

// --- navigation ---------------------------------------------------------------------

function show(conv) {
  current = conv;
  conv.unread = 0;
  render();
  setDrawer(null);
  if (conv.kind === "room") {
    refreshMembers(conv);
    if (!conv.historyLoaded) loadHistory(conv);
  }
  if (!isPhone()) $("message-input").focus();
}

function openDm(name) {
  show(conversation("dm", name));
}

function setDrawer(which) {
  const app = $("app");
  app.classList.toggle("show-sidebar", which === "sidebar");
  app.classList.toggle("show-members", which === "members");
  $("scrim").hidden = which === null;
  $("menu-button").setAttribute("aria-expanded", String(which === "sidebar"));
  $("members-button").setAttribute("aria-expanded", String(which === "members"));
}

async function refreshMembers(conv) {
  try {
    const names = await chat.who(conv.name);
    conv.members = new Set(names);
    if (conv === current) {
      renderMembers();
      renderHeader();
    }
  } catch (error) {
    // The next switch asks again; nothing the person can do about it.
  }
}

async function loadHistory(conv) {
  conv.historyLoaded = true;
  try {
    const messages = await chat.history(conv.name, { limit: PAGE });
    for (const message of messages) addMessage(conv, message, false);
    if (messages.length === 0) conv.historyDone = true;
  } catch (error) {
    conv.historyLoaded = false;
    if (error.code !== "connection_closed") toast(explain(error));
    return;
  }
  if (conv === current) {
    renderMessages("bottom");
    fillScreen(conv);
  }
}

async function loadOlder(conv) {
  if (conv.kind !== "room" || conv.historyDone || conv.loadingOlder || !conv.historyLoaded) {
    return;
  }
  const before = oldestId(conv);
  if (before === undefined) {
    conv.historyDone = true;
    renderHistoryStatus();
    return;
  }
  conv.loadingOlder = true;
  renderHistoryStatus();
  let short = false;
  try {
    const messages = await chat.history(conv.name, { before, limit: PAGE });
    for (const message of messages) addMessage(conv, message, false);
    if (messages.length === 0) conv.historyDone = true;
    // Only an empty page says there is no more; a short one says there is
    // probably none, which one more request settles at once.
    short = messages.length < PAGE;
  } catch (error) {
    if (error.code !== "connection_closed") toast(explain(error));
  } finally {
    conv.loadingOlder = false;
  }
  if (conv === current) {
    renderMessages("anchor");
    if (short) loadOlder(conv);
    else fillScreen(conv);
  }
}

// A page that does not fill the screen cannot be scrolled to load more.
function fillScreen(conv) {
  const scroller = $("scroller");
  if (scroller.scrollHeight <= scroller.clientHeight && !conv.historyDone) loadOlder(conv);
}

// --- chat events ------------------------------------------------------------------------

function onJoined({ room, name }) {
  const conv = conversation("room", room);
  if (name === me) {
    renderSidebar();
    if (!current || pendingSwitch === room) {
      pendingSwitch = null;
      show(conv);
    }
    return;
  }
  conv.members.add(name);
  addNotice(conv, `${name} joined #${room}`);
  if (conv === current) {
    renderMembers();
    renderHeader();
  }
}

const LEFT_WHY = {
  leave: "left",
  bye: "left the chat",
  exit: "left the chat",
  disconnect: "lost the connection",
  kicked: "was removed",
  shutdown: "left (server shutting down)",
  too_slow: "was disconnected (too slow)",
  flood: "was disconnected (flooding)",
  timeout: "timed out",
  replaced: "reconnected",
};

function onLeft({ room, name, reason }) {
  const conv = conversations.get(`room:${room}`);
  if (!conv) return;
  if (name === me) {
    conversations.delete(conv.key);
    if (conv === current) {
      const next = conversations.get(`room:${LOBBY}`) || [...conversations.values()][0];
      current = null;
      if (next) show(next);
      else render();
    } else {
      renderSidebar();
    }
    if (reason && reason !== "leave") toast(`You are no longer in #${room} (${reason}).`);
    return;
  }
  conv.members.delete(name);
  addNotice(conv, `${name} ${LEFT_WHY[reason] || "left"}`);
  if (conv === current) {
    renderMembers();
    renderHeader();
  }
}

function onRenamed({ old, new: name }) {
  if (old === me) me = name;
  $("me").textContent = me;
  for (const conv of conversations.values()) {
    if (conv.kind === "room" && conv.members.delete(old)) {
      conv.members.add(name);
      addNotice(conv, `${old} is now ${name}`);
    }
  }
  const dm = conversations.get(`dm:${old}`);
  if (dm && old !== me) {
    conversations.delete(dm.key);
    dm.name = name;
    dm.key = `dm:${name}`;
    conversations.set(dm.key, dm);
  }
  render();
}

function onMessage(message) {
  const conv = conversations.get(`room:${message.room}`);
  if (!conv || !addMessage(conv, message, true)) return;
  received(conv, message);
}

function onDm(message) {
  const other = message.from === me ? message.to : message.from;
  const conv = conversation("dm", other);
  if (!addMessage(conv, message, true)) return;
  received(conv, message);
}

function received(conv, message) {
  if (conv === current) {
    const node = messageNode(message, conv.items[conv.items.length - 2]);
    const last = conv.items[conv.items.length - 1] === message;
    if (last) {
      const scroller = $("scroller");
      const atBottom =
        scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
      $("messages").append(node);
      if (atBottom || message.from === me) scroller.scrollTop = scroller.scrollHeight;
    } else {
      renderMessages("stick");
    }
    if (document.hidden && message.from !== me) {
      conv.unread += 1;
      renderSidebar();
    }
  } else {
    if (message.from !== me) conv.unread += 1;
    renderSidebar();
  }
}

function onState({ state }) {
  document.body.dataset.state = state;
  if (state === "reconnecting") banner("Reconnecting...");
}

function onReconnecting({ attempt }) {
  banner(attempt > 1 ? `Reconnecting... (attempt ${attempt})` : "Reconnecting...");
}

// The server lost its history: its new ids may repeat those shown. What is
// shown stays; from here on the room's (and the DMs') ids count afresh.
function onRestarted({ room }) {
  for (const conv of conversations.values()) {
    if (conv.kind === "dm" || conv.name === room) {
      conv.ids.clear();
      conv.lastId = 0;
      conv.historyDone = true;
      if (conv.kind === "room") addNotice(conv, "The server restarted without its history.");
    }
  }
}

function onReconnected({ missed }) {
  banner(null);
  if (missed > 0) toast(`Reconnected: ${missed} new message${missed === 1 ? "" : "s"}.`, "info");
  if (current && current.kind === "room") refreshMembers(current);
}

function onClose({ code, reason }) {
  if (!$("app").hidden) {
    const why = {
      kicked: "You were removed from the chat",
      replaced: "You logged in somewhere else",
      closed: "You left the chat",
    }[code] || `Disconnected (${reason || code})`;
    banner(`${why}. Reload the page to join again.`, "error");
    $("message-input").disabled = true;
    $("send-button").disabled = true;
  }
}

// --- sending and commands ------------------------------------------------------------------

let pendingSwitch = null; // a room we asked to join, to show once joined

async function joinRoom(room) {
  room = room.replace(/^#/, "");
  if (!ROOM.test(room)) {
    toast("Room names are 1 to 64 letters, digits, _ - or . (no spaces).");
    return;
  }
  const existing = conversations.get(`room:${room}`);
  if (existing) {
    show(existing);
    return;
  }
  pendingSwitch = room;
  try {
    await chat.join(room);
  } catch (error) {
    pendingSwitch = null;
    toast(explain(error));
  }
}

async function leaveCurrent() {
  if (!current) return;
  if (current.kind === "dm") {
    conversations.delete(current.key);
    const next = conversations.get(`room:${LOBBY}`) || [...conversations.values()][0];
    current = null;
    if (next) show(next);
    else render();
    return;
  }
  try {
    await chat.leave(current.name);
  } catch (error) {
    toast(explain(error));
  }
}

async function sendDm(to, text) {
  if (!NAME.test(to)) {
    toast("Usage: /msg NAME TEXT");
    return false;
  }
  try {
    await chat.dm(to, text);
    if (!current || current.key !== `dm:${to}`) openDm(to);
    return true;
  } catch (error) {
    toast(explain(error));
    return false;
  }
}

const HELP =
  "Commands: /join ROOM, /leave, /msg NAME TEXT, /nick NAME, /who. Click a member to write to them.";

async function submit(text) {
  if (text.startsWith("/")) {
    const [command, ...rest] = text.slice(1).split(" ");
    const arg = rest.join(" ").trim();
    switch (command.toLowerCase()) {
      case "join":
      case "j":
        await joinRoom(arg);
        return true;
      case "leave":
      case "part":
        if (arg) {
          try {
            await chat.leave(arg.replace(/^#/, ""));
          } catch (error) {
            toast(explain(error));
          }
        } else {
          await leaveCurrent();
        }
        return true;
      case "msg":
      case "dm": {
        const [to, ...words] = arg.split(" ");
        const body = words.join(" ").trim();
        if (!to || !body) {
          toast("Usage: /msg NAME TEXT");
          return false;
        }
        return sendDm(to, body);
      }
      case "nick":
        try {
          await chat.nick(arg);
        } catch (error) {
          toast(explain(error));
          return false;
        }
        return true;
      case "who":
        if (current && current.kind === "room") {
          await refreshMembers(current);
          setDrawer("members");
        }
        return true;
      case "help":
        toast(HELP, "info");
        return true;
      default:
        toast(`Unknown command /${command}. ${HELP}`);
        return false;
    }
  }
  if (!current) return false;
  try {
    if (current.kind === "room") await chat.say(text, current.name);
    else await chat.dm(current.name, text);
    return true;
  } catch (error) {
    toast(explain(error));
    return false;
  }
}

// --- logging in -------------------------------------------------------------------------

function start(name, token) {
  const error = $("login-error");
  error.hidden = true;
  $("login-submit").disabled = true;
  const attempt = connect({ name, token: token || undefined });
  attempt.on("welcome", (welcome) => {
    me = welcome.name;
  });
  attempt.on("joined", onJoined);
  attempt.on("left", onLeft);
  attempt.on("renamed", onRenamed);
  attempt.on("message", onMessage);
  attempt.on("dm", onDm);
  attempt.on("state", onState);
  attempt.on("reconnecting", onReconnecting);
  attempt.on("reconnected", onReconnected);
  attempt.on("restarted", onRestarted);
  attempt.on("close", onClose);
  attempt.on("error", (event) => {
    if (!$("app").hidden) toast(explain(event));
  });
  chat = attempt;
  attempt.ready.then(
    (welcome) => {
      me = welcome.name;
      $("me").textContent = me;
      try {
        localStorage.setItem("chatkit.name", me);
      } catch {
        // Private mode: the name is not remembered, that is all.
      }
      $("login").hidden = true;
      $("app").hidden = false;
      document.title = `chatkit: ${me}`;
      if (!current) {
        // The lobby's joined may have come before we listened for it.
        if (attempt.joinedRooms.has(LOBBY)) show(conversation("room", LOBBY));
      } else {
        render();
      }
    },
    (failure) => {
      error.textContent = explain(failure);
      error.hidden = false;
      $("login-submit").disabled = false;
      $("login-name").focus();
      $("login-name").select();
    },
  );
}

function init() {
  try {
    const remembered = localStorage.getItem("chatkit.name");
    if (remembered) $("login-name").value = remembered;
  } catch {
    // No storage: nothing remembered.
  }
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("login-name").value.trim();
    if (!NAME.test(name)) {
      const error = $("login-error");
      error.textContent = EXPLAIN.bad_name;
      error.hidden = false;
      return;
    }
    start(name, $("login-token").value);
  });
  $("composer").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("message-input");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    if (!(await submit(text)) && !input.value) input.value = text;
  });
  $("join-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("join-input");
    const room = input.value.trim();
    if (!room) return;
    input.value = "";
    joinRoom(room);
  });
  $("leave-button").addEventListener("click", leaveCurrent);
  $("menu-button").addEventListener("click", () =>
    setDrawer($("app").classList.contains("show-sidebar") ? null : "sidebar"),
  );
  $("members-button").addEventListener("click", () => {
    if (!isPhone()) {
      $("app").classList.toggle("hide-members");
      return;
    }
    setDrawer($("app").classList.contains("show-members") ? null : "members");
  });
  $("scrim").addEventListener("click", () => setDrawer(null));
  $("scroller").addEventListener("scroll", () => {
    if (current && $("scroller").scrollTop < 60) loadOlder(current);
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && current && current.unread) {
      current.unread = 0;
      renderSidebar();
    }
  });
  window.addEventListener("pagehide", () => chat && chat.close());
  $("login-name").focus();
}

init();
