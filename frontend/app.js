// sse-relay chat page: one EventSource per room, fetch POST to publish, nothing else.
//
// Every URL is relative (no leading slash), so the page works at `/` and behind a proxy under a path prefix.
// Message content only ever reaches the DOM through textContent: nothing a message says can run.
"use strict";

(() => {
  const ROOM_RE = /^[A-Za-z0-9_.:-]{1,128}$/;
  const DEFAULT_ROOM = "chat";
  const NAME_KEY = "sse-relay.name";
  const MAX_SHOWN = 1000; // messages kept in the DOM; the server retains about as many per room
  const MAX_SEEN = 5000; // event ids remembered for de-duplication (insertion-ordered, oldest dropped)
  const FOLLOW_SLACK_PX = 48; // "at the bottom" tolerance when deciding to follow new messages
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 30000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    roomName: $("room-name"),
    roomForm: $("room-form"),
    roomInput: $("room-input"),
    status: $("status"),
    replica: $("replica"),
    messages: $("messages"),
    newHint: $("new-hint"),
    sendForm: $("send-form"),
    nameInput: $("name-input"),
    textInput: $("text-input"),
    sendButton: $("send-button"),
    sendError: $("send-error"),
  };

  let room = DEFAULT_ROOM;
  let source = null; // the current EventSource; handlers of a replaced one are ignored
  let lastId = null; // last event id shown in this room: where a recreated stream resumes
  let seen = new Set();
  let backoff = BACKOFF_MIN_MS;
  let retryTimer = 0;
  let pending = []; // messages waiting for the next render batch
  let flushTimer = 0;
  let unread = 0;

  // -- room and name -------------------------------------------------------------------------------------

  function roomFromUrl() {
    const fromQuery = new URLSearchParams(location.search).get("room");
    let fromHash = "";
    try {
      fromHash = decodeURIComponent(location.hash.slice(1));
    } catch (_) {
      fromHash = "";
    }
    const wanted = fromQuery || fromHash || DEFAULT_ROOM;
    if (ROOM_RE.test(wanted)) return wanted;
    showError(`"${wanted.slice(0, 80)}" is not a room name (use letters, digits and _ . : -); showing #${DEFAULT_ROOM}.`);
    return DEFAULT_ROOM;
  }

  function loadName() {
    let name = "";
    try {
      name = localStorage.getItem(NAME_KEY) || "";
    } catch (_) {
      name = ""; // storage disabled: the name just is not remembered
    }
    return name || `guest-${Math.floor(1000 + Math.random() * 9000)}`;
  }

  function saveName() {
    try {
      localStorage.setItem(NAME_KEY, ui.nameInput.value.trim());
    } catch (_) {
      /* not remembered; harmless */
    }
  }

  function updateTitle() {
    document.title = `${unread ? `(${unread}) ` : ""}#${room} · sse-relay chat`;
  }

  // -- connection ----------------------------------------------------------------------------------------

  const STATE_TEXT = {
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: "Reconnecting…",
    offline: "Offline",
  };

  function setState(state, detail) {
    const text = STATE_TEXT[state] + (detail ? ` — ${detail}` : "");
    if (ui.status.dataset.state === state && ui.status.textContent === text) return; // no repeat announcements
    ui.status.dataset.state = state;
    ui.status.textContent = text;
  }

  function eventsUrl() {
    // 0 replays the retained history on a first connect; afterwards the browser sends Last-Event-ID itself,
    // and a stream we recreate ourselves resumes from the last id it saw (a message's, or the greeting's).
    const from = lastId === null ? "0" : lastId;
    return `channels/${encodeURIComponent(room)}/events?last_event_id=${encodeURIComponent(from)}`;
  }

  function connect() {
    clearTimeout(retryTimer);
    if (source) source.close();
    const es = new EventSource(eventsUrl());
    source = es;
    setState(lastId === null ? "connecting" : "reconnecting");
    const mine = (fn) => (event) => {
      if (source === es) fn(event);
    };
    es.onopen = mine(() => {
      backoff = BACKOFF_MIN_MS;
      setPrivate(false);
      setState("connected");
    });
    es.addEventListener("relay.hello", mine((event) => {
      // The greeting's id is the stream's position: a stream we recreate ourselves resumes from it even if no
      // message came (the browser's own reconnects do the same with Last-Event-ID).
      if (event.lastEventId) lastId = event.lastEventId;
      const hello = parseJson(event.data);
      ui.replica.textContent = hello && typeof hello.instance === "string" ? hello.instance : "?";
    }));
    es.addEventListener("relay.reset", mine(() => {
      // The id we resumed from is gone; what follows is the retained history again: rebuild the view from it.
      clearView();
    }));
    es.addEventListener("chat", mine((event) => receive(event, "chat")));
    es.onmessage = mine((event) => receive(event, "message"));
    es.onerror = mine(() => {
      if (es.readyState === EventSource.CLOSED) {
        // A non-200 answer (or a broken stream type): the browser gave up; we retry with a growing delay.
        es.close();
        scheduleReconnect();
        explainRefusal();
      } else {
        setState(navigator.onLine === false ? "offline" : "reconnecting");
      }
    });
  }

  async function explainRefusal() {
    // EventSource hides the status of a refused stream; the channel's info endpoint tells us why.
    try {
      const response = await fetch(`channels/${encodeURIComponent(room)}`);
      if (response.status === 401 || response.status === 403) {
        // The backend's own refusal (the authorization hook: not logged in, banned) says why; a token's does not.
        const body = await response.json().catch(() => undefined);
        const error = body && body.error;
        setPrivate(true);
        setState(
          "offline",
          error && error.code === "denied" && typeof error.message === "string"
            ? `this room is private: ${error.message}`
            : "this room is private: it needs a token (see README, Security)",
        );
      }
    } catch (_) {
      /* offline: the state already says so */
    }
  }

  function setPrivate(isPrivate) {
    // A private room shows only its explanation (the status line), not the empty room's invitation to talk.
    if (isPrivate) ui.messages.dataset.private = "";
    else delete ui.messages.dataset.private;
  }

  function scheduleReconnect() {
    const delay = Math.round(backoff * (0.75 + Math.random() * 0.5));
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    setState("offline", `retrying in ${Math.max(1, Math.round(delay / 1000))} s`);
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, delay);
  }

  window.addEventListener("offline", () => setState("offline"));
  window.addEventListener("online", () => {
    if (!source || source.readyState === EventSource.CLOSED) {
      backoff = BACKOFF_MIN_MS;
      connect();
    }
  });

  // -- receiving -----------------------------------------------------------------------------------------

  function parseJson(text) {
    try {
      return JSON.parse(text);
    } catch (_) {
      return undefined;
    }
  }

  function asText(value) {
    if (typeof value === "string") return value;
    if (value === undefined) return "";
    try {
      return JSON.stringify(value);
    } catch (_) {
      return String(value);
    }
  }

  function idTime(id) {
    // A message id is `<ms>-<seq>[-<epoch>]`: the milliseconds at which the relay accepted it.
    const ms = Number(String(id || "").split("-")[0]);
    return ms > 0 ? ms : undefined;
  }

  function receive(event, kind) {
    const id = event.lastEventId;
    if (id) {
      if (seen.has(id)) return; // already shown (defensive: the server resumes exactly)
      seen.add(id);
      if (seen.size > MAX_SEEN) seen.delete(seen.values().next().value);
      lastId = id;
    }
    // Every message shows a time: the sender's (`ts`) when it gave one, else when the relay accepted it.
    const accepted = idTime(id);
    const data = parseJson(event.data);
    if (kind === "chat" && data && typeof data === "object" && !Array.isArray(data)) {
      const ts = typeof data.ts === "number" && Number.isFinite(data.ts) ? data.ts : accepted;
      queue({ name: asText(data.name), text: asText(data.text), ts });
    } else if (kind === "message" && Array.isArray(data) && data.every((m) => m && typeof m === "object")) {
      // What old chat pages post (POST /server/send): unnamed events whose data is a list of {role, content}.
      for (const m of data) queue({ name: asText(m.role), text: asText(m.content), ts: accepted });
    } else {
      queue({ name: kind, text: data === undefined ? event.data : asText(data), ts: accepted });
    }
  }

  function queue(message) {
    pending.push(message);
    if (!flushTimer) flushTimer = setTimeout(flush, 16); // a replayed history renders in a few batches
  }

  function isAtBottom() {
    const box = ui.messages;
    return box.scrollHeight - box.scrollTop - box.clientHeight <= FOLLOW_SLACK_PX;
  }

  function flush() {
    flushTimer = 0;
    if (!pending.length) return;
    const follow = isAtBottom();
    const batch = pending;
    pending = [];
    const me = ui.nameInput.value.trim();
    const fragment = document.createDocumentFragment();
    for (const m of batch) fragment.append(renderMessage(m, me));
    ui.messages.append(fragment);
    while (ui.messages.childElementCount > MAX_SHOWN) ui.messages.firstElementChild.remove();
    if (follow) {
      scrollToBottom();
    } else {
      ui.newHint.hidden = false;
    }
    if (document.hidden) {
      unread += batch.length;
      updateTitle();
    }
  }

  function renderMessage(m, me) {
    const item = document.createElement("li");
    item.className = "msg";
    if (m.name && m.name === me) item.classList.add("mine");
    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = m.name.slice(0, 64) || "anonymous";
    meta.append(who);
    const ts = typeof m.ts === "number" ? m.ts : Number.NaN;
    if (Number.isFinite(ts)) {
      const date = new Date(ts);
      if (!Number.isNaN(date.getTime())) {
        const when = document.createElement("time");
        when.dateTime = date.toISOString();
        when.title = date.toLocaleString();
        when.textContent = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
        meta.append(when);
      }
    }
    const body = document.createElement("p");
    body.className = "text";
    body.textContent = m.text;
    item.append(meta, body);
    return item;
  }

  function scrollToBottom() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
    ui.newHint.hidden = true;
  }

  function clearView() {
    clearTimeout(flushTimer);
    flushTimer = 0;
    pending = [];
    seen = new Set();
    ui.messages.replaceChildren();
    ui.newHint.hidden = true;
  }

  ui.messages.addEventListener("scroll", () => {
    if (isAtBottom()) ui.newHint.hidden = true;
  });
  ui.newHint.addEventListener("click", () => {
    scrollToBottom();
    ui.textInput.focus();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && unread) {
      unread = 0;
      updateTitle();
    }
  });

  // -- sending -------------------------------------------------------------------------------------------

  function showError(text) {
    ui.sendError.textContent = text;
    ui.sendError.hidden = false;
  }

  function clearError() {
    ui.sendError.hidden = true;
    ui.sendError.textContent = "";
  }

  async function errorText(response) {
    let text = `the server answered ${response.status}`;
    const body = parseJson(await response.text().catch(() => ""));
    if (body && body.error && typeof body.error.message === "string") text = body.error.message;
    const retry = response.headers.get("Retry-After");
    if (retry) text += ` (retry after ${retry} s)`;
    return text;
  }

  let sending = false;
  // The attempt in progress or last failed: a retry of the same text in the same room by the same name sends the
  // same request with the same Idempotency-Key, so a message whose answer was lost (the relay may have published
  // it) can be sent again without appearing twice.
  let attempt = null;

  function newKey() {
    // crypto.getRandomValues works on plain http too (randomUUID needs a secure context).
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function publishRequest(name, text) {
    if (attempt && attempt.room === room && attempt.name === name && attempt.text === text) return attempt;
    // One dialect in every room, README's: old chat pages still see these in room `chat`, because the relay
    // shows `chat` events to GET /server/events in the old form.
    attempt = {
      room, name, text, key: newKey(),
      url: `channels/${encodeURIComponent(room)}/messages`,
      body: JSON.stringify({ event: "chat", data: { name, text, ts: Date.now() } }),
    };
    return attempt;
  }

  async function send() {
    const text = ui.textInput.value;
    const name = ui.nameInput.value.trim();
    if (sending || !text.trim()) return;
    if (!name) {
      showError("Pick a display name first.");
      ui.nameInput.focus();
      return;
    }
    sending = true;
    ui.sendButton.disabled = true;
    try {
      const request = publishRequest(name, text);
      const response = await fetch(request.url, {
        method: "POST",
        headers: { "Content-Type": "application/json", "Idempotency-Key": request.key },
        body: request.body,
      });
      if (!response.ok) {
        const why = await errorText(response);
        showError(response.status === 504
          ? `Maybe sent: ${why}. Press Enter to make sure; it will not appear twice.`
          : `Not sent: ${why}. Your message is kept; press Enter to try again.`);
        return;
      }
      attempt = null;
      clearError();
      if (ui.textInput.value === text) ui.textInput.value = ""; // keep anything typed meanwhile
      autoGrow();
      scrollToBottom();
    } catch (_) {
      // No answer: the request may not have left, or its answer may have been lost after the relay published it.
      showError("No answer from the server. Your message is kept; press Enter to try again (it will not appear twice).");
    } finally {
      sending = false;
      ui.sendButton.disabled = false;
    }
  }

  function autoGrow() {
    const box = ui.textInput;
    box.style.height = "auto";
    box.style.height = `${Math.min(box.scrollHeight, 160)}px`;
  }

  ui.sendForm.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.textInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.textInput.addEventListener("input", autoGrow);
  ui.nameInput.addEventListener("change", saveName);
  ui.nameInput.addEventListener("input", saveName);

  // -- rooms ---------------------------------------------------------------------------------------------

  function enterRoom(name) {
    room = name;
    lastId = null;
    backoff = BACKOFF_MIN_MS;
    clearView();
    ui.roomName.textContent = room;
    ui.roomInput.value = room;
    ui.replica.textContent = "–";
    setPrivate(false);
    unread = 0;
    updateTitle();
    connect();
  }

  ui.roomForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const wanted = ui.roomInput.value.trim();
    if (!ROOM_RE.test(wanted)) {
      showError("A room name uses 1-128 letters, digits and _ . : -");
      return;
    }
    clearError();
    if (wanted !== room) {
      history.pushState(null, "", `?room=${encodeURIComponent(wanted)}`); // relative: keeps the path prefix
      enterRoom(wanted);
    }
    ui.textInput.focus();
  });
  window.addEventListener("popstate", () => {
    const wanted = roomFromUrl();
    if (wanted !== room) enterRoom(wanted);
  });
  window.addEventListener("hashchange", () => {
    const wanted = roomFromUrl();
    if (wanted !== room) enterRoom(wanted);
  });

  ui.nameInput.value = loadName();
  saveName();
  enterRoom(roomFromUrl());
})();
