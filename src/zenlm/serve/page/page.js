// The zenlm chat page: streams replies from /v1/chat/completions over SSE.
// Model text only ever goes into the page through textContent, never as HTML.
// The key stays in an HttpOnly cookie set by /login; requests carry X-Zenlm-Page so that the
// server accepts the cookie on a POST (a cross-site form cannot add that header).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let model = null;
let controller = null;

function api(path, body, signal) {
  return fetch(path, {
    method: body === undefined ? "GET" : "POST",
    credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-Zenlm-Page": "1"},
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
}

async function errorText(resp) {
  try {
    const j = await resp.json();
    return (j.error && j.error.message) || resp.statusText;
  } catch (e) {
    return resp.statusText;
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

function showSpeed(tokens, seconds, done) {
  if (tokens > 0 && seconds > 0) {
    $("speed").textContent = (tokens / seconds).toFixed(1) + " tokens/s" + (done ? " (" + tokens + " tokens)" : "");
  }
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  $("error").textContent = "";
  $("speed").textContent = "";
  addMessage("user", text);
  history.push({role: "user", content: text});
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...history);
  const out = addMessage("assistant", "");
  out.classList.add("streaming");
  controller = new AbortController();
  busy(true);
  let reply = "", tokens = 0, first = null, usage = null;
  try {
    const resp = await api("/v1/chat/completions", {
      model: model, messages: messages, stream: true, stream_options: {include_usage: true},
      max_tokens: parseInt($("max-tokens").value, 10) || 256,
      temperature: parseFloat($("temperature").value) || 0,
    }, controller.signal);
    if (resp.status === 401) { location.reload(); return; }
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.usage) usage = chunk.usage;
          for (const c of chunk.choices || []) {
            const piece = (c.delta && c.delta.content) || "";
            if (!piece) continue;
            if (first === null) first = performance.now();
            tokens += 1;
            reply += piece;
            out.textContent = reply;
            showSpeed(tokens, (performance.now() - first) / 1000, false);
          }
        }
      }
    }
    if (usage && first !== null) showSpeed(usage.completion_tokens, (performance.now() - first) / 1000, true);
  } catch (e) {
    if (e.name === "AbortError") {
      out.classList.add("stopped");
    } else {
      $("error").textContent = String(e.message || e);
    }
  } finally {
    out.classList.remove("streaming");
    out.dataset.done = "1";
    if (reply) history.push({role: "assistant", content: reply});
    else if (!out.classList.contains("stopped")) history.pop();
    controller = null;
    busy(false);
  }
}

function stop() {
  if (controller) controller.abort();  // the server sees the disconnect and frees the row
}

async function init() {
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", stop);
  $("signout").addEventListener("click", async () => {
    await api("/logout", {});  // clears the key cookie
    location.reload();
  });
  $("clear").addEventListener("click", () => { history.length = 0; $("log").textContent = ""; });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  try {
    const resp = await api("/v1/models");
    if (resp.ok) {
      model = (await resp.json()).data[0].id;
      $("model").textContent = model;
    } else {
      $("error").textContent = await errorText(resp);
    }
  } catch (e) {
    $("error").textContent = String(e);
  }
  document.body.dataset.ready = "1";
}

init();
