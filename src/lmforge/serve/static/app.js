// lmforge chat: a client of this server's OpenAI API (/v1/models, /v1/chat/completions).
//
// Conversations live in localStorage as OpenAI-shaped messages ({role, content, tool_calls,
// tool_call_id}) plus what the page shows beside them (citations, usage, stopped, error).
// A reply streams over server-sent events read with fetch + ReadableStream; Stop aborts the
// fetch, the server sees the connection close and frees the request's batch row.
// The page runs one tool itself, a calculator, when the box is ticked: the model's tool_calls
// are shown, evaluated here, sent back as `tool` messages, and the reply continues.
"use strict";

const STORE = "lmforge.chat.v1";
const MAX_TOOL_ROUNDS = 4;
const $ = (id) => document.getElementById(id);

let store = loadStore();       // {conversations: [...], current: id, settings: {...}}
let controller = null;         // the AbortController of the reply streaming now, if any

// ---- storage ----
function loadStore() {
  try {
    const s = JSON.parse(localStorage.getItem(STORE));
    if (s && Array.isArray(s.conversations)) return s;
  } catch (e) { /* a corrupt entry starts afresh */ }
  return { conversations: [], current: null, settings: {} };
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(store));
}

function current() {
  let conv = store.conversations.find((c) => c.id === store.current);
  if (!conv) {
    conv = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
    store.conversations.unshift(conv);
    store.current = conv.id;
  }
  return conv;
}

// ---- settings (the sidebar's inputs, kept in the store) ----
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "seed", "api-key", "model", "rag", "calculator"];

function restoreSettings() {
  for (const id of SETTINGS) {
    const el = $(id), value = store.settings[id];
    if (!el || value === undefined) continue;
    if (el.type === "checkbox") el.checked = value; else el.value = value;
  }
}

function rememberSettings() {
  for (const id of SETTINGS) {
    const el = $(id);
    if (el) store.settings[id] = el.type === "checkbox" ? el.checked : el.value;
  }
  save();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// ---- the server ----
async function apiError(response) {
  // OpenAI's error shape: {"error": {"message", "param", ...}}
  try {
    const body = await response.json();
    const e = body.error || body;
    return `${response.status}: ${e.message || JSON.stringify(e)}${e.param ? ` (${e.param})` : ""}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function connect() {
  const status = $("server-status");
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      status.textContent = "This server needs an API key: enter it above.";
      $("api-key").focus();
      return;
    }
    if (!response.ok) throw new Error(await apiError(response));
    const models = (await response.json()).data || [];
    const select = $("model"), chosen = store.settings.model;
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (models.some((m) => m.id === chosen)) select.value = chosen;
    $("model-name").textContent = select.value;
    status.textContent = `Connected: ${models.length} model(s).`;
  } catch (e) {
    status.textContent = `Cannot reach the server: ${e.message}`;
  }
}

function requestBody(conv) {
  const body = {
    model: $("model").value,
    messages: [],
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  const system = $("system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  for (const m of conv.messages) {
    const out = { role: m.role, content: m.content };
    if (m.tool_calls) out.tool_calls = m.tool_calls;
    if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
    body.messages.push(out);
  }
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  body.rag = $("rag").checked;  // lmforge's field: retrieve from the server's index, when it has one
  if ($("calculator").checked) body.tools = [CALCULATOR_SPEC];
  return body;
}

// Server-sent events of a fetch response: yields each `data:` payload parsed, until [DONE].
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// One chunk of a streamed chat completion into the assistant message `msg`.
function applyChunk(msg, chunk) {
  if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
  if (chunk.usage) msg.usage = chunk.usage;
  if (chunk.citations) {  // only a server with a RAG index sends the field (an empty list: nothing relevant)
    msg.citations = chunk.citations;
    showRagSwitch();
  }
  for (const choice of chunk.choices || []) {
    if (choice.index !== 0) continue;
    const delta = choice.delta || {};
    if (delta.content) msg.content += delta.content;
    for (const call of delta.tool_calls || []) {
      // a call arrives as deltas per index: id and name first, then pieces of its arguments
      msg.tool_calls = msg.tool_calls || [];
      const c = msg.tool_calls[call.index] ||= { id: "", type: "function", function: { name: "", arguments: "" } };
      if (call.id) c.id = call.id;
      if (call.function && call.function.name) c.function.name += call.function.name;
      if (call.function && call.function.arguments) c.function.arguments += call.function.arguments;
    }
    if (choice.finish_reason) msg.finish_reason = choice.finish_reason;
  }
}

// Stream one assistant reply to the end of `conv`; run the calculator when the reply calls it.
async function generate(conv) {
  for (let round = 0; round <= MAX_TOOL_ROUNDS; round++) {
    const body = JSON.stringify(requestBody(conv));  // the conversation so far, before the reply's own entry
    const msg = { role: "assistant", content: "" };
    conv.messages.push(msg);
    const view = renderMessages(conv).get(msg);
    view.classList.add("streaming");
    setBusy(true);
    controller = new AbortController();
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body, signal: controller.signal,
      });
      if (!response.ok) throw new Error(await apiError(response));
      for await (const chunk of sseEvents(response)) {
        applyChunk(msg, chunk);
        fillMessage(view, msg, conv);
      }
    } catch (e) {
      if (e.name === "AbortError") msg.stopped = true; else msg.error = e.message;
    } finally {
      controller = null;
      setBusy(false);
      save();
      renderMessages(conv);
    }
    if (msg.stopped || msg.error || !msg.tool_calls) return;
    for (const call of msg.tool_calls) conv.messages.push(runTool(call));
    save();
  }
}

function showRagSwitch() {
  store.settings.serverHasIndex = true;
  $("rag-row").hidden = false;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  for (const b of document.querySelectorAll(".actions button")) b.disabled = busy;
}

// ---- the calculator tool (arithmetic only: numbers, + - * / % ( ), evaluated by a parser, never eval) ----
const CALCULATOR_SPEC = {
  type: "function",
  function: {
    name: "calculator",
    description: "Evaluate an arithmetic expression with + - * / and parentheses; returns the exact result.",
    parameters: { type: "object", properties: { expression: { type: "string" } }, required: ["expression"] },
  },
};

function calculate(text) {
  const tokens = text.match(/\d+(?:\.\d+)?|[-+*/%()]|\S/g) || [];
  let i = 0;
  const peek = () => tokens[i];
  const next = () => tokens[i++];
  function primary() {
    const t = next();
    if (t === "(") { const v = sum(); if (next() !== ")") throw new Error("missing )"); return v; }
    if (t === "-") return -primary();
    if (t === "+") return primary();
    if (t !== undefined && /^\d/.test(t)) return Number(t);
    throw new Error(`unexpected ${t === undefined ? "end" : JSON.stringify(t)}`);
  }
  function product() {
    let v = primary();
    while (["*", "/", "%"].includes(peek())) {
      const op = next(), w = primary();
      if (op !== "*" && w === 0) throw new Error("division by zero");
      v = op === "*" ? v * w : op === "/" ? v / w : v % w;
    }
    return v;
  }
  function sum() {
    let v = product();
    while (["+", "-"].includes(peek())) v = next() === "+" ? v + product() : v - product();
    return v;
  }
  const value = sum();
  if (i !== tokens.length) throw new Error(`unexpected ${JSON.stringify(tokens[i])}`);
  return String(value);
}

function runTool(call) {
  let content;
  try {
    if (call.function.name !== "calculator") throw new Error(`no tool named ${JSON.stringify(call.function.name)} in this page`);
    content = calculate(JSON.parse(call.function.arguments || "{}").expression || "");
  } catch (e) {
    content = `error: ${e.message}`;
  }
  return { role: "tool", tool_call_id: call.id, name: call.function.name, content };
}

// ---- rendering ----
function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(...store.conversations.map((c) => {
    const li = document.createElement("li");
    li.classList.toggle("current", c.id === store.current);
    const title = document.createElement("span");
    title.textContent = c.title;
    const remove = document.createElement("button");
    remove.textContent = "×";
    remove.title = "delete this conversation";
    remove.onclick = (event) => {
      event.stopPropagation();
      store.conversations = store.conversations.filter((x) => x !== c);
      if (store.current === c.id) store.current = null;
      save();
      show();
    };
    li.onclick = () => { if (!controller) { store.current = c.id; save(); show(); } };
    li.append(title, remove);
    return li;
  }));
}

// Draw every message of `conv`; returns a Map message -> its element.
function renderMessages(conv) {
  const views = new Map();
  const nodes = conv.messages.map((m, index) => {
    const view = $("message-template").content.firstElementChild.cloneNode(true);
    view.dataset.role = m.role;
    fillMessage(view, m, conv);
    addActions(view, m, index, conv);
    views.set(m, view);
    return view;
  });
  $("messages").replaceChildren(...nodes);
  $("messages").scrollTop = $("messages").scrollHeight;
  return views;
}

function fillMessage(view, m, conv) {
  view.querySelector(".role").textContent = m.role === "tool" ? `tool result (${m.name || "tool"})` : m.role;
  const content = view.querySelector(".content");
  content.textContent = m.error ? `${m.content}${m.content ? "\n" : ""}Error: ${m.error}` : m.content;
  content.classList.toggle("error", Boolean(m.error));
  view.querySelector(".tool-calls").replaceChildren(...(m.tool_calls || []).map((c) => {
    const div = document.createElement("div");
    div.className = "tool-call";
    const code = document.createElement("code");
    code.textContent = `${c.function.name}(${c.function.arguments})`;
    div.append("calls ", code);
    return div;
  }));
  view.querySelector(".citations").replaceChildren(...(m.citations || []).map(citationItem));
  const meta = [];
  if (m.stopped) meta.push("stopped");
  if (m.usage) meta.push(`${m.usage.prompt_tokens} prompt + ${m.usage.completion_tokens} completion tokens`);
  view.querySelector(".meta").textContent = meta.join(" · ");
  if (!controller || conv.messages[conv.messages.length - 1] !== m) view.classList.remove("streaming");
  $("messages").scrollTop = $("messages").scrollHeight;
}

// A citation of the server's RAG index, {index, id, title, source, text, url}: a link to the
// cited chunk (/v1/rag/chunks/N); a click shows the chunk's text here (a plain link would not
// carry the API key).
function citationItem(c) {
  const li = document.createElement("li");
  li.value = c.index;
  const a = document.createElement("a");
  a.href = c.url || "#";
  a.className = "citation";
  a.textContent = `${c.title}${c.id && c.id !== c.title ? ` (${c.id})` : ""}`;
  a.title = c.source || "";
  const quote = document.createElement("blockquote");
  quote.textContent = `${c.text || ""}${c.source ? `\n— ${c.source}` : ""}`;
  quote.hidden = true;
  a.onclick = (event) => { event.preventDefault(); quote.hidden = !quote.hidden; };
  li.append(a, quote);
  return li;
}

function addActions(view, m, index, conv) {
  const actions = view.querySelector(".actions");
  const button = (label, onclick) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.className = label.toLowerCase();
    b.disabled = Boolean(controller);
    b.onclick = onclick;
    actions.append(b);
  };
  if (m.role === "user") button("Edit", () => editMessage(view, index, conv));
  if (m.role === "assistant" && index === conv.messages.length - 1) button("Regenerate", () => regenerateFrom(conv, lastUser(conv)));
}

function lastUser(conv) {
  for (let i = conv.messages.length - 1; i >= 0; i--) if (conv.messages[i].role === "user") return i;
  return -1;
}

// Replace a user message's text by an editor; saving drops every later message and regenerates.
function editMessage(view, index, conv) {
  const content = view.querySelector(".content");
  const editor = document.createElement("textarea");
  editor.className = "editor";
  editor.value = conv.messages[index].content;
  editor.rows = Math.max(2, editor.value.split("\n").length);
  const actions = view.querySelector(".actions");
  const saveButton = document.createElement("button");
  saveButton.type = "button";
  saveButton.className = "save";
  saveButton.textContent = "Save & regenerate";
  saveButton.onclick = () => {
    if (!editor.value.trim()) return;
    conv.messages[index].content = editor.value;
    if (conv.messages.findIndex((m) => m.role === "user") === index) conv.title = titleOf(editor.value);
    renderConversations();
    regenerateFrom(conv, index);
  };
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  cancel.onclick = () => renderMessages(conv);
  content.replaceWith(editor);
  actions.replaceChildren(saveButton, cancel);
  editor.focus();
}

function regenerateFrom(conv, userIndex) {
  if (controller || userIndex < 0) return;
  conv.messages = conv.messages.slice(0, userIndex + 1);
  save();
  generate(conv);
}

function titleOf(text) {
  return text.trim().split("\n")[0].slice(0, 48);
}

function show() {
  renderConversations();
  renderMessages(current());
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  const conv = current();
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New chat") conv.title = titleOf(text);
  $("prompt").value = "";
  save();
  renderConversations();
  await generate(conv);
  renderConversations();
}

function init() {
  restoreSettings();
  $("rag-row").hidden = !store.settings.serverHasIndex;
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) return;
    store.current = null;
    current();
    save();
    show();
  });
  for (const id of SETTINGS) { const el = $(id); if (el) el.addEventListener("change", rememberSettings); }
  $("api-key").addEventListener("change", connect);
  $("model").addEventListener("change", () => { $("model-name").textContent = $("model").value; });
  show();
  connect();
}

document.addEventListener("DOMContentLoaded", init);
