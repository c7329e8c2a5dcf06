// The top-up box of the key holder's page: a code bought from the shop is redeemed onto the key
// in the key field (sent as a bearer header to this site's /redeem, never in a URL), and the
// new balance is shown at once. Loaded after usage.js, whose TEXT, t, $, fmt, render, lookup
// and lastSummary it uses.
"use strict";

Object.assign(TEXT.zh, {
  topupLabel: "充值", topup: "充值", codeEmpty: "请输入充值码。",
  topupDone: (n) => `充值成功：已增加 ${n} 额度。`, codeUsed: "该充值码已被使用。",
  codeInvalid: "充值码无效或已停用，请检查后重试。", codeSlow: "错误次数过多，请稍后再试。",
  topupFailed: "充值失败，请稍后重试。",
});
Object.assign(TEXT.en, {
  topupLabel: "Top up", topup: "Top up", codeEmpty: "Enter a top-up code.",
  topupDone: (n) => `Done: ${n} units added.`, codeUsed: "This code has already been used.",
  codeInvalid: "This code is not valid or was disabled. Check it and try again.",
  codeSlow: "Too many wrong codes; try again later.", topupFailed: "The top-up failed; try again shortly.",
});

function showTopup(text, ok) {
  const el = $("topup-message");
  el.textContent = text;
  el.className = ok ? "ok" : "";
  el.hidden = !text;
}

async function redeem(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  const code = $("code").value.trim();
  if (!code) { showTopup(t("codeEmpty"), false); return; }
  showTopup("", false);
  let resp, data = null;
  try {
    resp = await fetch("/redeem", { method: "POST", cache: "no-store", body: JSON.stringify({ code }),
      headers: { Authorization: "Bearer " + key, "Content-Type": "application/json" } });
    data = await resp.json();
  } catch (err) {
    if (!resp) { showTopup(t("topupFailed"), false); return; }
  }
  if (resp.ok && data) {
    $("code").value = "";
    if (lastSummary) {  // the new numbers at once; then everything else that follows from them
      lastSummary.granted = data.granted;
      lastSummary.balance = data.balance;
      render(lastSummary);
    }
    await lookup(new Event("submit"));
    showTopup(t("topupDone")(fmt(data.quota)), true);
    return;
  }
  const code_ = data && data.error && data.error.code;
  showTopup(code_ === "code_used" ? t("codeUsed") : code_ === "code_invalid" ? t("codeInvalid")
    : resp.status === 429 ? t("codeSlow") : t("topupFailed"), false);
}

document.addEventListener("DOMContentLoaded", () => {
  $("topup-form").addEventListener("submit", redeem);
});
