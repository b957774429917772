// luca chat: a dependency-free client of the server's OpenAI-compatible streaming API.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "luca.chat.v1";
const SETTINGS = ["system", "temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed", "api_key"];

const state = { model: null, context: null, messages: [], busy: false, abort: null };

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    state.messages = Array.isArray(saved.messages) ? saved.messages : [];
    for (const k of SETTINGS) if (saved.settings && k in saved.settings) $(k).value = saved.settings[k];
  } catch (e) { /* a broken store starts fresh */ }
}

function save() {
  const settings = {};
  for (const k of SETTINGS) settings[k] = $(k).value;
  localStorage.setItem(STORE, JSON.stringify({ messages: state.messages, settings }));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function fetchModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) { $("model").textContent = "API key needed"; $("model").classList.add("bad"); return; }
    const j = await r.json();
    const m = j.data[0];
    state.model = m.id; state.context = m.context_length;
    $("model").textContent = `${m.id} · ${m.backend} · ctx ${m.context_length}`;
    $("model").classList.remove("bad");
  } catch (e) {
    $("model").textContent = "server unreachable"; $("model").classList.add("bad");
  }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "you" : role === "assistant" ? "model" : role;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  div.append(who, body);
  $("messages").append(div);
  $("empty").hidden = true;
  return div;
}

function render() {
  for (const el of [...document.querySelectorAll(".msg")]) el.remove();
  $("empty").hidden = state.messages.length > 0;
  for (const m of state.messages) bubble(m.role, m.content).dataset.done = "1";
  scroll();
}

function scroll() { const m = $("messages"); m.scrollTop = m.scrollHeight; }

function setBusy(b) {
  state.busy = b;
  $("send").textContent = b ? "Stop" : "Send";
  $("send").classList.toggle("stop", b);
}

function num(id, parse) {
  const v = $(id).value.trim();
  return v === "" ? undefined : parse(v);
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  bubble("user", text).dataset.done = "1";
  const div = bubble("assistant", "");
  div.classList.add("streaming");
  const body = div.querySelector(".body");
  save(); scroll(); setBusy(true);

  const history = [];
  const sys = $("system").value.trim();
  if (sys) history.push({ role: "system", content: sys });
  history.push(...state.messages);
  const req = {
    model: state.model || "", messages: history, stream: true, stream_options: { include_usage: true },
    temperature: num("temperature", parseFloat), top_p: num("top_p", parseFloat), top_k: num("top_k", (x) => parseInt(x, 10)),
    max_tokens: num("max_tokens", (x) => parseInt(x, 10)), repetition_penalty: num("repetition_penalty", parseFloat),
    seed: num("seed", (x) => parseInt(x, 10)),
    clamp_max_tokens: true,  // "max tokens" is a cap: a long conversation gets what the context leaves
    truncate_history: true,  // and the oldest turns are left out once it no longer fits
  };
  state.abort = new AbortController();
  const t0 = performance.now();
  let tFirst = null, pieces = 0, usage = null, finish = null, text_ = "";
  const show = (final) => {
    const now = performance.now();
    const n = usage ? usage.completion_tokens : pieces;
    const gen = tFirst ? (now - tFirst) / 1000 : 0;
    const rate = gen > 0 && n > 1 ? ((n - 1) / gen).toFixed(1) : "–";
    const ttft = tFirst ? ((tFirst - t0) / 1000).toFixed(2) + " s" : "–";
    $("stats").textContent = `${n} tokens · ${rate} tok/s · first token ${ttft}` +
      (final && finish ? ` · ${finish === "length" ? "stopped at max tokens" : "done"}` : "");
  };
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(req), signal: state.abort.signal,
    });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const dropped = parseInt(r.headers.get("X-Luca-Dropped-Messages") || "0", 10);
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message);
          if (j.usage) usage = j.usage;
          const c = j.choices && j.choices[0];
          if (!c) continue;
          if (c.finish_reason) finish = c.finish_reason;
          const piece = c.delta && c.delta.content;
          if (piece) {
            if (tFirst === null) tFirst = performance.now();
            pieces += 1; text_ += piece; body.textContent = text_;
            show(false); scroll();
          }
        }
      }
    }
    state.messages.push({ role: "assistant", content: text_ });
    show(true);
    if (dropped > 0) $("stats").textContent += ` · ${dropped} oldest message${dropped > 1 ? "s" : ""} left out to fit the context`;
  } catch (e) {
    if (e.name === "AbortError") {
      state.messages.push({ role: "assistant", content: text_ });
      show(false); $("stats").textContent += " · stopped";
    } else {
      div.classList.add("error");
      body.textContent = (text_ ? text_ + "\n\n" : "") + "error: " + e.message;
      state.messages.pop();  // the turn failed: let the user edit and resend
    }
  } finally {
    div.classList.remove("streaming");
    div.dataset.pieces = String(pieces);
    div.dataset.done = "1";
    state.abort = null; setBusy(false); save(); scroll();
  }
}

function init() {
  load(); render();
  for (const k of ["temperature", "top_p"]) {
    const upd = () => { $(k + "-v").textContent = $(k).value; };
    $(k).addEventListener("input", upd); upd();
  }
  for (const k of SETTINGS) $(k).addEventListener("change", save);
  $("api_key").addEventListener("change", fetchModel);
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (state.busy) { if (state.abort) state.abort.abort(); return; }
    const text = $("input").value.trim();
    if (!text) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("new-chat").addEventListener("click", () => {
    if (state.abort) state.abort.abort();
    state.messages = []; save(); render(); $("stats").innerHTML = "&nbsp;";
  });
  $("toggle-settings").addEventListener("click", () => document.body.classList.toggle("hide-settings"));
  fetchModel();
  $("input").focus();
}

init();
