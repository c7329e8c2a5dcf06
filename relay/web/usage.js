// The key holder's page. The key stays here: it is sent only as a bearer header to this
// site's own JSON endpoint, never in a URL, never stored.
"use strict";

const TEXT = {
  zh: {
    title: "用量查询", keyLabel: "API 密钥", check: "查询", keyHint: "密钥只保存在本页面中，仅作为请求头发送给本站。",
    shop: "购买或充值密钥", granted: "总额度", used: "已用", balance: "可用",
    unitNote: "单位：额度。1 额度 = 初代 gpt-3.5-turbo（4k）1 个输入 token 的价格（每 1K token $0.0015）；各模型价格见下表。",
    priceIn: "输入（额度 / 1K token）", priceOut: "输出（额度 / 1K token）", daily: "近 30 天每日用量",
    chartAxes: "纵轴：每日额度；横轴：日期（UTC）。", bar: (day, cost, n) => `${day}：${cost} 额度，${n} 次请求`,
    dailyTable: "每日明细", day: "日期", cost: "额度", requests: "请求数", recent: "最近请求", time: "时间",
    model: "模型", tokens: "Token（输入/输出）", latency: "耗时", speed: "响应速度（最近一小时）",
    ttft: "首字延迟（中位数）", rtt: "浏览器到本站往返延迟", howto: "接入方式",
    messages: (a, b) => `余额约可发送 ${a} 条 gpt-3.5 消息，或 ${b} 条 gpt-4 消息（按每条 500 输入 + 500 输出 token 估算）。`,
    badKey: "密钥无效或已停用，请检查后重试。", noQuota: "该密钥额度已用完。", failed: "查询失败，请稍后重试。",
    empty: "请输入密钥。", noRequests: "暂无请求", copy: "复制", copied: "已复制",
    sdkOpenai: "OpenAI SDK base_url", sdkV1: "OpenAI SDK base_url（/v1）", chatUrl: "翻译插件（完整地址）",
    primary: "主域名", backup: "备用域名", current: "本站", lang: "English",
    cached: "缓存", reasoning: "推理", images: "图片", characters: "字符",
  },
  en: {
    title: "Usage", keyLabel: "API key", check: "Check", keyHint: "Your key stays on this page and is sent only as a header to this site.",
    shop: "Buy or top up a key", granted: "Total quota", used: "Used", balance: "Available",
    unitNote: "Unit: quota units. 1 unit = the price of 1 input token of the original gpt-3.5-turbo (4k), "
      + "$0.0015 per 1K tokens; each model's price is below.",
    priceIn: "Input (units / 1K tokens)", priceOut: "Output (units / 1K tokens)", daily: "Daily usage, last 30 days",
    chartAxes: "Vertical: units per day; horizontal: the day (UTC).",
    bar: (day, cost, n) => `${day}: ${cost} units, ${n} request${n === "1" ? "" : "s"}`,
    dailyTable: "Per day", day: "Day", cost: "Units", requests: "Requests", recent: "Recent requests", time: "Time",
    model: "Model", tokens: "Tokens (in/out)", latency: "Latency", speed: "Response speed (last hour)",
    ttft: "Time to first token (median)", rtt: "Round trip from your browser", howto: "How to connect",
    messages: (a, b) => `The balance buys about ${a} gpt-3.5 messages or ${b} gpt-4 messages (500 tokens in + 500 out each).`,
    badKey: "This key is invalid or disabled. Check it and try again.", noQuota: "This key has no quota left.",
    failed: "The lookup failed; try again shortly.", empty: "Enter your key.", noRequests: "No requests yet",
    copy: "Copy", copied: "Copied", sdkOpenai: "OpenAI SDK base_url", sdkV1: "OpenAI SDK base_url (/v1)",
    chatUrl: "Translators (full URL)", primary: "Primary", backup: "Backup", current: "This site", lang: "中文",
    cached: "cached", reasoning: "reasoning", images: "images", characters: "characters",
  },
};

// Chinese needs a CJK font; without one every character would be a box. Canvas tells: Chinese
// drawn in the page's font stack looks exactly like two unassigned code points (the missing-glyph
// box) only when no font has the glyphs. (document.fonts.check cannot tell: it answers true for
// any font that needs no download, installed or not.)
function canShowChinese() {
  try {
    const canvas = document.createElement("canvas");
    canvas.width = 64; canvas.height = 32;
    const ctx = canvas.getContext("2d");
    const draw = (text) => {
      ctx.clearRect(0, 0, 64, 32);
      ctx.font = `24px ${getComputedStyle(document.body).fontFamily}`;
      ctx.textBaseline = "top";
      ctx.fillText(text, 2, 2);
      return ctx.getImageData(0, 0, 64, 32).data.join(",");
    };
    return draw("用量") !== draw("\u0378\u0379");
  } catch (e) {
    return true;
  }
}

const CHINESE_SHOWS = canShowChinese();
let lang = pickLanguage();
let lastSummary = null;

// ?lang=en|zh first (the link relay demo prints), then the switch's choice (remembered), then the
// browser's languages: Chinese unless English comes first, or Chinese cannot be drawn here.
function pickLanguage() {
  const asked = new URLSearchParams(window.location.search).get("lang");
  if (asked === "zh" || asked === "en") return asked;
  const saved = localStorage.getItem("relay-lang");
  if (saved === "zh" || saved === "en") return saved;
  const langs = navigator.languages || [navigator.language || "zh"];
  const first = (langs[0] || "zh").toLowerCase();
  if (!CHINESE_SHOWS) return "en";
  return first.startsWith("zh") || !first.startsWith("en") ? "zh" : "en";
}

function t(name) { return TEXT[lang][name]; }
const $ = (id) => document.getElementById(id);
const fmt = (n) => (n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"));

function applyLanguage() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  $("lang").textContent = lang === "en" && !CHINESE_SHOWS ? "中文 (Chinese)" : t("lang");
  if (lastSummary) render(lastSummary);
  renderSnippets(lastSummary && lastSummary.site);
}

function showMessage(text) {
  const el = $("message");
  el.textContent = text;
  el.hidden = !text;
}

async function lookup(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) { showMessage(t("empty")); return; }
  showMessage("");
  let resp;
  try {
    resp = await fetch("/usage/api/summary", { headers: { Authorization: "Bearer " + key }, cache: "no-store" });
  } catch (err) {
    showMessage(t("failed"));
    return;
  }
  if (resp.status === 401) { $("result").hidden = true; showMessage(t("badKey")); return; }
  if (!resp.ok) { $("result").hidden = true; showMessage(t("failed")); return; }
  lastSummary = await resp.json();
  render(lastSummary);
  renderSnippets(lastSummary.site);
  measureRoundTrip();
}

function render(s) {
  $("result").hidden = false;
  $("granted").textContent = fmt(s.granted);
  $("used").textContent = fmt(s.used);
  $("balance").textContent = fmt(s.available);
  const m = s.messages || {};
  $("messages").textContent = m["gpt-3.5-turbo"] !== null && m["gpt-4"] !== null
    ? t("messages")(fmt(m["gpt-3.5-turbo"]), fmt(m["gpt-4"])) : "";
  if (s.available <= 0) showMessage(t("noQuota"));
  const shop = s.site && s.site.shop_url;
  $("shop").hidden = !shop;
  if (shop) $("shop-link").href = shop;
  const prices = s.prices || [];
  $("prices").parentElement.hidden = !prices.length;
  fillTable("prices", prices, (p) => [modelName(p), fmt(p.input), fmt(p.output)]);
  renderChart(s.days);
  fillTable("days", s.days.slice().reverse(), (d) => [d.day, fmt(d.cost), fmt(d.requests)], (d) => ({ day: d.day }));
  fillTable("recent", s.recent, (r) => [new Date(r.at).toLocaleString(), modelName(r), tokens(r), fmt(r.cost),
    `${Math.round(r.latency_ms)} ms`]);
  fillTable("speed", s.speed, (r) => [r.model, `${Math.round(r.ttft_p50_ms)} ms`, fmt(r.requests)]);
}

// The name the client asked for, and the one served where they differ.
function modelName(r) {
  return r.served_model && r.served_model !== r.model ? `${r.model} → ${r.served_model}` : r.model;
}

// Prompt / completion tokens, and the parts priced apart when there are any.
function tokens(r) {
  const parts = [];
  if (r.cached_tokens) parts.push(`${t("cached")} ${fmt(r.cached_tokens)}`);
  if (r.reasoning_tokens) parts.push(`${t("reasoning")} ${fmt(r.reasoning_tokens)}`);
  if (r.images) parts.push(`${t("images")} ${fmt(r.images)}`);
  if (r.seconds) parts.push(`${fmt(r.seconds)} s`);
  if (r.characters) parts.push(`${fmt(r.characters)} ${t("characters")}`);
  const main = `${fmt(r.prompt_tokens)} / ${fmt(r.completion_tokens)}`;
  return parts.length ? `${main} (${parts.join(", ")})` : main;
}

function fillTable(id, rows, cells, attrs) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  if (!rows.length) {
    const tr = body.insertRow();
    const td = tr.insertCell();
    td.colSpan = $(id).querySelectorAll("th").length;
    td.textContent = t("noRequests");
    return;
  }
  for (const row of rows) {
    const tr = body.insertRow();
    if (attrs) Object.assign(tr.dataset, attrs(row));
    for (const value of cells(row)) tr.insertCell().textContent = value;
  }
}

// One bar per day; each day (bar and the column above it) names its value: a tooltip on hover
// (<title>), a label for screen readers, and the line under the chart on hover or focus.
function renderChart(days) {
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  const width = 600, height = 160, gap = 2;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "group");
  svg.setAttribute("aria-label", t("daily"));
  const max = Math.max(0, ...days.map((d) => d.cost));
  const bar = width / days.length;
  days.forEach((d, i) => {
    const h = Math.round((d.cost / Math.max(max, 1)) * (height - 4));
    const label = t("bar")(d.day, fmt(d.cost), fmt(d.requests));
    const g = document.createElementNS(svgNS, "g");
    g.setAttribute("class", "day");
    g.setAttribute("tabindex", "0");
    g.setAttribute("role", "img");
    g.setAttribute("aria-label", label);
    g.dataset.day = d.day;
    g.dataset.cost = String(d.cost);
    const title = document.createElementNS(svgNS, "title");
    title.textContent = label;
    g.appendChild(title);
    for (const [cls, y, hh] of [["hit", 0, height], ["bar", height - h, h]]) {
      const rect = document.createElementNS(svgNS, "rect");
      rect.setAttribute("class", cls);
      rect.setAttribute("x", String(i * bar + gap / 2));
      rect.setAttribute("y", String(y));
      rect.setAttribute("width", String(bar - gap));
      rect.setAttribute("height", String(hh));
      g.appendChild(rect);
    }
    const show = () => { $("chart-value").textContent = label; };
    g.addEventListener("mouseenter", show);
    g.addEventListener("focus", show);
    svg.appendChild(g);
  });
  $("chart").replaceChildren(svg);
  $("chart-max").textContent = max ? fmt(max) : "";
  $("chart-mid").textContent = max >= 2 ? fmt(Math.round(max / 2)) : "";
  const short = (d) => (d ? d.day.slice(5) : "");
  $("chart-first").textContent = short(days[0]);
  $("chart-middle").textContent = short(days[Math.floor(days.length / 2)]);
  $("chart-last").textContent = short(days[days.length - 1]);
  $("chart-value").textContent = "";
}

function renderSnippets(site) {
  const hosts = [];
  const scheme = (site && site.scheme) || "https";
  if (site && site.primary_host) hosts.push([t("primary"), `${scheme}://${site.primary_host}`]);
  if (site && site.backup_host) hosts.push([t("backup"), `${scheme}://${site.backup_host}`]);
  if (!hosts.length) hosts.push([t("current"), window.location.origin]);
  const list = $("snippet-list");
  list.replaceChildren();
  for (const [label, base] of hosts) {
    for (const [kind, value] of [["sdkOpenai", `${base}/openai/v1`], ["sdkV1", `${base}/v1`],
                                 ["chatUrl", `${base}/v1/chat/completions`]]) {
      const row = document.createElement("div");
      row.className = "snippet";
      const name = document.createElement("span");
      name.textContent = `${label} · ${t(kind)}`;
      const code = document.createElement("code");
      code.textContent = value;
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = t("copy");
      button.addEventListener("click", async () => {
        try { await navigator.clipboard.writeText(value); button.textContent = t("copied"); } catch (e) { /* no clipboard */ }
      });
      row.append(name, code, button);
      list.appendChild(row);
    }
  }
}

async function measureRoundTrip() {
  const times = [];
  for (let i = 0; i < 3; i++) {
    const start = performance.now();
    try { await fetch("/healthz", { cache: "no-store" }); } catch (e) { return; }
    times.push(performance.now() - start);
  }
  times.sort((a, b) => a - b);
  $("rtt").textContent = `${Math.round(times[1])} ms`;
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", lookup);
  $("lang").addEventListener("click", () => {
    lang = lang === "zh" ? "en" : "zh";
    localStorage.setItem("relay-lang", lang);
    applyLanguage();
  });
  applyLanguage();
});
