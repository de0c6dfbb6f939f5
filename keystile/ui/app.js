// Keystile admin page.  It talks to the same /key/* and /route/explain
// routes as any client, plus GET /admin/settings.
//
// Safety rule for this file: every value that comes from the API reaches
// the page as text (text nodes, textContent, input values, attributes set
// with setAttribute) and never as markup: no string is ever handed to the
// HTML parser.
"use strict";

(() => {
  const STORAGE = "keystile.master_key";
  const POLICY_NAMES = {
    auth: "authentication",
    required_params: "required params",
    model_access: "model access",
    limits: "limits",
    routing: "routing",
  };

  const state = {
    masterKey: null,
    settings: null,
    page: 1,
    size: 25,
    filter: { account_type: "", key_alias: "" },
    totalPages: 1,
    testing: null,
    highlight: null,
  };

  const $ = (id) => document.getElementById(id);

  // Build an element; strings among the children become text nodes.
  function h(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function show(node, text) {
    node.textContent = text || "";
    node.hidden = !text;
  }

  // -- the API -----------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, param) {
      super(message);
      this.status = status;
      this.param = param || null;
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + state.masterKey };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      throw new ApiError(0, "Cannot reach the proxy: " + error.message);
    }
    let data = null;
    try {
      data = await response.json();
    } catch (error) {
      data = null;
    }
    if (!response.ok) {
      const envelope = data && typeof data === "object" ? data.error : null;
      const message = envelope && envelope.message
        ? String(envelope.message)
        : "The proxy answered HTTP " + response.status;
      throw new ApiError(response.status, message, envelope && envelope.param);
    }
    return data;
  }

  // An admin call that fails because the master key stopped working
  // (changed config, restarted proxy) sends the user back to sign in.
  async function adminCall(method, path, body) {
    try {
      return await api(method, path, body);
    } catch (error) {
      if (error.status === 401) {
        signOut("The proxy no longer accepts this master key: " + error.message);
      }
      throw error;
    }
  }

  // -- signing in --------------------------------------------------------

  async function signIn(key) {
    state.masterKey = key;
    try {
      state.settings = await api("GET", "/admin/settings");
    } catch (error) {
      state.masterKey = null;
      sessionStorage.removeItem(STORAGE);
      let message = error.message;
      if (error.status === 401) {
        message = "Wrong master key: the proxy did not accept it (" + error.message + ").";
      } else if (error.status === 403) {
        message = "Not the master key: " + error.message;
      }
      showSignIn(message);
      return;
    }
    sessionStorage.setItem(STORAGE, key);
    $("master-key").value = "";
    show($("sign-in-error"), "");
    $("sign-in").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    renderSettings();
    await loadKeys();
  }

  function showSignIn(message) {
    $("app").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in").hidden = false;
    show($("sign-in-error"), message);
    $("master-key").focus();
  }

  function signOut(message) {
    state.masterKey = null;
    state.settings = null;
    sessionStorage.removeItem(STORAGE);
    hideNewKey();
    $("keys-body").replaceChildren();
    showSignIn(message);
  }

  // -- settings: models, rules, durations ---------------------------------

  function listOrNone(items, none) {
    return items && items.length ? items.join(", ") : none;
  }

  function durationText() {
    const examples = state.settings.durations.examples;
    return "A whole number then s, m, h or d (seconds, minutes, hours, days), e.g. " +
      examples.join(", ") + ".";
  }

  function renderSettings() {
    const settings = state.settings;
    const service = settings.service_account_settings;
    const headers = Object.entries(service.param_headers || {});

    const rules = [
      ["Every key must send", listOrNone(settings.enforced_params, "nothing")],
      ["Service-account keys must send", listOrNone(service.enforced_params, "nothing more")],
      ["Params a header may supply", headers.length
        ? headers.map(([param, header]) => param + " from header " + header).join(", ")
        : "none"],
      ["Models", listOrNone(settings.models, "none configured")],
      ["Durations", durationText()],
    ];
    $("rules-list").replaceChildren(
      ...rules.flatMap(([term, text]) => [h("dt", {}, term), h("dd", {}, text)])
    );

    $("create-models").replaceChildren(...settings.models.map((model) =>
      h("label", {}, h("input", { type: "checkbox", name: "models", value: model }), model)
    ));
    $("durations-help").textContent = durationText();
    // A wildcard group's name is a pattern, not a model a client sends.
    const sendable = settings.models.filter((model) => !model.endsWith("*"));
    $("test-models").replaceChildren(...sendable.map((model) => h("option", { value: model })));
    $("test-model").value = sendable[0] || "";

    const sizes = $("filter-size");
    for (const option of [...sizes.options]) {
      option.disabled = Number(option.value) > settings.max_page_size;
    }
    updateOwnerHint();
  }

  function updateOwnerHint() {
    const owner = $("create-form").elements.owner.value;
    const params = state.settings ? state.settings.service_account_settings.enforced_params : [];
    show($("owner-hint"), owner === "service_account" && params.length
      ? "Every request with this key must send: " + params.join(", ") + "."
      : "");
  }

  // -- formatting --------------------------------------------------------

  function when(iso) {
    if (!iso) return null;
    const moment = new Date(iso);
    if (Number.isNaN(moment.getTime())) return h("span", {}, iso);
    const text = moment.toISOString();
    return h("time", { datetime: iso, title: iso },
      h("span", {}, text.slice(0, 10)), " ", h("span", {}, text.slice(11, 16) + " UTC"));
  }

  function usd(amount) {
    const value = Number(amount) || 0;
    return "$" + (value > 0 && value < 0.01 ? value.toFixed(4) : value.toFixed(2));
  }

  function isExpired(key) {
    return Boolean(key.expires) && new Date(key.expires).getTime() <= Date.now();
  }

  function requiredParams(key) {
    const settings = state.settings;
    const items = [];
    for (const param of key.enforced_params || []) items.push([param, "this key"]);
    if (key.account_type === "service_account") {
      for (const param of settings.service_account_settings.enforced_params) {
        items.push([param, "service accounts"]);
      }
    }
    for (const param of settings.enforced_params) items.push([param, "every key"]);
    if (!items.length) return h("span", { class: "muted" }, "none");
    return h("ul", {}, items.map(([param, source]) =>
      h("li", {}, h("code", {}, param), " ", h("span", { class: "muted" }, "(" + source + ")"))
    ));
  }

  function limits(key) {
    const parts = [];
    if (key.rpm_limit !== null && key.rpm_limit !== undefined) parts.push(key.rpm_limit + " req/min");
    if (key.tpm_limit !== null && key.tpm_limit !== undefined) parts.push(key.tpm_limit + " tokens/min");
    if (key.max_parallel_requests !== null && key.max_parallel_requests !== undefined) {
      parts.push(key.max_parallel_requests + " parallel");
    }
    return parts.length ? parts.join(" · ") : h("span", { class: "muted" }, "none");
  }

  function spend(key) {
    if (key.max_budget === null || key.max_budget === undefined) {
      return usd(key.spend) + " · no budget";
    }
    let text = usd(key.spend) + " of " + usd(key.max_budget);
    if (key.budget_duration) text += " · resets every " + key.budget_duration;
    if (key.spend >= key.max_budget) text += " · over budget";
    return text;
  }

  function stateBadge(key) {
    if (key.blocked) return h("span", { class: "badge blocked" }, "⊘ Blocked");
    if (isExpired(key)) return h("span", { class: "badge expired" }, "✖ Expired");
    return h("span", { class: "badge active" }, "✔ Active");
  }

  function accountBadge(key) {
    return key.account_type === "service_account"
      ? h("span", { class: "badge sa" }, "⚙ Service account")
      : h("span", { class: "badge user" }, "User");
  }

  function keyLabel(key) {
    return key.key_alias || key.key_name;
  }

  // -- the keys table ----------------------------------------------------

  async function loadKeys({ last = false } = {}) {
    const query = new URLSearchParams({
      page: String(state.page),
      size: String(state.size),
      return_full_object: "true",
    });
    if (state.filter.account_type) query.set("account_type", state.filter.account_type);
    if (state.filter.key_alias) query.set("key_alias", state.filter.key_alias);
    let data;
    try {
      data = await adminCall("GET", "/key/list?" + query);
      if ((last || state.page > data.total_pages) && data.total_pages !== state.page) {
        state.page = data.total_pages;
        query.set("page", String(state.page));
        data = await adminCall("GET", "/key/list?" + query);
      }
    } catch (error) {
      show($("keys-error"), "Could not list the keys: " + error.message);
      return;
    }
    show($("keys-error"), "");
    state.totalPages = data.total_pages;
    renderKeys(data);
  }

  function renderKeys(data) {
    const rows = data.keys.map(keyRow);
    if (!rows.length) {
      rows.push(h("tr", {}, h("td", { colspan: 10, class: "muted" },
        state.filter.account_type || state.filter.key_alias
          ? "No key matches this filter."
          : "No keys yet: create one above.")));
    }
    $("keys-body").replaceChildren(...rows);

    const count = data.total_count === 1 ? "1 key" : data.total_count + " keys";
    const filters = [];
    if (state.filter.account_type) {
      filters.push(state.filter.account_type === "service_account" ? "service accounts" : "users");
    }
    if (state.filter.key_alias) filters.push("alias " + state.filter.key_alias);
    $("keys-summary").textContent = count + (filters.length ? " (" + filters.join(", ") + ")" : "");
    $("page-info").textContent = "Page " + data.current_page + " of " + data.total_pages;
    $("page-prev").disabled = data.current_page <= 1;
    $("page-next").disabled = data.current_page >= data.total_pages;
  }

  // One wrapper per cell: on narrow screens the cell is a two-column grid
  // (label, value) and the value must be a single grid item.
  function cell(label, ...children) {
    return h("td", { "data-label": label }, h("div", {}, ...children));
  }

  function keyRow(key) {
    const label = keyLabel(key);
    const blockButton = key.blocked
      ? h("button", { type: "button", class: "secondary", "aria-label": "Unblock " + label,
        onclick: () => setBlocked(key, false) }, "Unblock")
      : h("button", { type: "button", class: "secondary", "aria-label": "Block " + label,
        onclick: () => setBlocked(key, true) }, "Block");
    const isNew = state.highlight === key.token;
    return h("tr", { class: key.blocked ? "is-blocked" : null, "data-token": key.token },
      cell("Alias / key",
        key.key_alias
          ? h("span", { class: "alias" }, key.key_alias)
          : h("span", { class: "muted" }, "no alias"),
        isNew ? [" ", h("span", { class: "badge active" }, "★ New")] : null,
        h("code", { class: "key-name" }, key.key_name)),
      cell("Account", accountBadge(key)),
      cell("Models", key.models.length ? key.models.join(", ")
        : h("span", { class: "muted" }, "all models")),
      cell("Required params", requiredParams(key)),
      cell("Limits", limits(key)),
      cell("Spend / budget", spend(key)),
      cell("Expires", when(key.expires) || h("span", { class: "muted" }, "never")),
      cell("State", stateBadge(key)),
      cell("Created", when(key.created_at)),
      h("td", { class: "actions", "data-label": "Actions" }, h("span", {},
        h("button", { type: "button", "aria-label": "Test " + label,
          onclick: () => openTest(key) }, "Test"),
        blockButton,
        h("button", { type: "button", class: "secondary", "aria-label": "Regenerate " + label,
          onclick: () => regenerate(key) }, "Regenerate"),
        h("button", { type: "button", class: "danger", "aria-label": "Delete " + label,
          onclick: () => remove(key) }, "Delete"),
      )),
    );
  }

  function status(text) {
    show($("status"), text);
  }

  async function rowAction(action, done) {
    try {
      const result = await action();
      show($("keys-error"), "");
      await done(result);
    } catch (error) {
      show($("keys-error"), error.message);
    }
  }

  function setBlocked(key, blocked) {
    const label = keyLabel(key);
    return rowAction(
      () => adminCall("POST", blocked ? "/key/block" : "/key/unblock", { key: key.token }),
      async () => {
        status(blocked
          ? "Blocked " + label + ": its requests are now refused."
          : "Unblocked " + label + ": its requests are accepted again.");
        await loadKeys();
      },
    );
  }

  async function regenerate(key) {
    const label = keyLabel(key);
    const ok = await confirmAction(
      "Regenerate " + label + "?",
      "The current secret of " + label + " (" + key.key_name + ") stops working at once. " +
        "The new key is shown once.",
      "Regenerate",
    );
    if (!ok) return;
    await rowAction(
      () => adminCall("POST", "/key/regenerate", { key: key.token }),
      async (created) => {
        showNewKey(created, "Regenerated");
        await loadKeys();
      },
    );
  }

  async function remove(key) {
    const label = keyLabel(key);
    const ok = await confirmAction(
      "Delete " + label + "?",
      "Requests with " + label + " (" + key.key_name + ") will be refused. " +
        "This cannot be undone.",
      "Delete",
    );
    if (!ok) return;
    await rowAction(
      () => adminCall("POST", "/key/delete", { keys: [key.token] }),
      async () => {
        status("Deleted " + label + ".");
        await loadKeys();
      },
    );
  }

  function confirmAction(title, text, okLabel) {
    const dialog = $("confirm-dialog");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel;
    dialog.returnValue = "";
    dialog.showModal();
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"),
        { once: true });
    });
  }

  // -- creating a key ----------------------------------------------------

  class FormError extends Error {
    constructor(message, field) {
      super(message);
      this.field = field;
    }
  }

  function numberField(form, name, label, whole) {
    const text = form.elements[name].value.trim();
    if (!text) return undefined;
    const value = Number(text);
    if (!Number.isFinite(value) || value < 0 || (whole && !Number.isInteger(value))) {
      throw new FormError(label + " must be " + (whole ? "a whole number" : "a number") +
        ", 0 or more.", name);
    }
    return value;
  }

  function createBody(form) {
    const body = {};
    const text = (name) => form.elements[name].value.trim();
    if (text("key_alias")) body.key_alias = text("key_alias");
    const models = [...form.querySelectorAll("input[name=models]:checked")].map((box) => box.value);
    if (models.length) body.models = models;
    const params = text("enforced_params").split(",").map((p) => p.trim()).filter(Boolean);
    if (params.length) body.enforced_params = params;
    const numbers = [
      ["rpm_limit", "Requests / min", true],
      ["tpm_limit", "Tokens / min", true],
      ["max_parallel_requests", "Parallel requests", true],
      ["max_budget", "Max budget", false],
    ];
    for (const [name, label, whole] of numbers) {
      const value = numberField(form, name, label, whole);
      if (value !== undefined) body[name] = value;
    }
    if (text("budget_duration")) body.budget_duration = text("budget_duration");
    if (text("duration")) body.duration = text("duration");
    return body;
  }

  async function createKey(event) {
    event.preventDefault();
    const form = event.target;
    const error = $("create-error");
    const serviceAccount = form.elements.owner.value === "service_account";
    let body;
    try {
      body = createBody(form);
    } catch (problem) {
      show(error, problem.message);
      form.elements[problem.field].focus();
      return;
    }
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const created = await adminCall(
        "POST", serviceAccount ? "/key/service-account/generate" : "/key/generate", body
      );
      show(error, "");
      form.reset();
      updateOwnerHint();
      state.highlight = created.token;
      showNewKey(created, "Created");
      state.filter = { account_type: "", key_alias: "" };
      $("filter-form").reset();
      $("filter-size").value = String(state.size);
      await loadKeys({ last: true });
    } catch (problem) {
      show(error, "The key was not created: " + problem.message);
      const field = problem.param && form.elements[problem.param];
      if (field && field.focus) field.focus();
    } finally {
      submit.disabled = false;
    }
  }

  // The raw key exists only in this panel's input until "I have stored it".
  function showNewKey(created, verb) {
    const kind = created.account_type === "service_account" ? "service account" : "user key";
    $("new-key-title").textContent = verb === "Created" ? "New key" : "New secret";
    $("new-key-for").textContent = verb + " " + kind + " " + keyLabel(created) +
      " (" + created.key_name + ").";
    $("new-key-value").textContent = created.key;
    $("copy-result").textContent = "";
    $("new-key").hidden = false;
    status(verb + " " + keyLabel(created) + ".");
    $("new-key").scrollIntoView({ block: "nearest" });
    $("copy-key").focus();
  }

  function hideNewKey() {
    $("new-key-value").textContent = "";
    $("copy-result").textContent = "";
    $("new-key").hidden = true;
  }

  async function copyKey() {
    const secret = $("new-key-value");
    try {
      await navigator.clipboard.writeText(secret.textContent);
      $("copy-result").textContent = "Copied to the clipboard.";
    } catch (error) {
      // Without clipboard access (a plain-HTTP page on another host),
      // select the key so a copy shortcut takes it.
      window.getSelection().selectAllChildren(secret);
      $("copy-result").textContent = document.execCommand("copy")
        ? "Copied to the clipboard."
        : "Could not copy: select the key and copy it by hand.";
    }
  }

  // -- testing a key with /route/explain ----------------------------------

  function openTest(key) {
    state.testing = key;
    $("test-key-name").textContent = keyLabel(key) + " (" + key.key_name + ")";
    const own = key.models.find((model) => !model.endsWith("*"));
    if (own) $("test-model").value = own;
    $("test-result").replaceChildren();
    $("test-dialog").showModal();
  }

  function explainBody(form) {
    const key = state.testing;
    let body = {};
    const extra = form.elements.extra.value.trim();
    if (extra) {
      try {
        body = JSON.parse(extra);
      } catch (error) {
        throw new Error("Other body fields must be a JSON object: " + error.message);
      }
      if (!body || typeof body !== "object" || Array.isArray(body)) {
        throw new Error("Other body fields must be a JSON object.");
      }
    }
    body.model = form.elements.model.value;
    body.messages = [{ role: "user", content: form.elements.message.value }];
    const user = form.elements.user.value.trim();
    if (user) body.user = user;
    // The alias is what an operator recognises; a key without one is
    // named by its hash.
    body.key = key.key_alias || key.token;
    return body;
  }

  async function runTest(event) {
    event.preventDefault();
    const result = $("test-result");
    let answer;
    try {
      answer = await adminCall("POST", "/route/explain", explainBody(event.target));
    } catch (error) {
      result.replaceChildren(h("p", { class: "message error" },
        "The test could not run: " + error.message));
      return;
    }
    result.replaceChildren(...explanation(answer));
    result.scrollIntoView({ block: "nearest" });
  }

  function explanation(answer) {
    const parts = [];
    if (answer.allowed) {
      parts.push(h("p", { class: "verdict allowed" }, "✔ Allowed"));
    } else {
      const policy = POLICY_NAMES[answer.rejected_by] || answer.rejected_by || "the proxy";
      parts.push(h("p", { class: "verdict refused" }, "✖ Refused by " + policy));
      const error = answer.error;
      if (error) {
        const message = error.body && error.body.error ? error.body.error.message : "";
        parts.push(h("p", {}, "A client would get HTTP " + error.status +
          (message ? ": " : ""), message ? h("q", {}, message) : null));
      }
    }

    const route = [];
    if (answer.key) {
      const kind = answer.key.account_type === "service_account" ? "service account" : "user";
      route.push(["Key", (answer.key.key_alias || "no alias") + " (" + answer.key.key_name +
        ", " + kind + ")"]);
    }
    if (answer.model_group) route.push(["Model group", answer.model_group]);
    if (answer.deployment) {
      route.push(["Deployment", answer.deployment.id +
        (answer.deployment.api_base ? " at " + answer.deployment.api_base : " (built in)")]);
    } else {
      route.push(["Deployment", "none: the request would not be sent upstream"]);
    }
    if (answer.fallbacks && answer.fallbacks.length) {
      route.push(["Fallbacks", answer.fallbacks.map(describe).join(", ")]);
    }
    if (answer.cooling_down && answer.cooling_down.length) {
      route.push(["Cooling down", answer.cooling_down.map(describe).join(", ")]);
    }
    parts.push(h("dl", {}, route.flatMap(([term, text]) => [h("dt", {}, term), h("dd", {}, text)])));

    if (answer.checks && answer.checks.length) {
      parts.push(h("h3", {}, "Checks"), h("ol", { class: "checks-list" },
        answer.checks.map(checkItem)));
    }
    return parts;
  }

  // Each outcome has a word and a symbol, so it reads without colour.
  function checkItem(check) {
    const policy = h("strong", {}, POLICY_NAMES[check.policy] || check.policy);
    const reason = check.reason ? String(check.reason) : "";
    if (check.outcome === "not_run") {
      return h("li", { class: "muted" }, policy, ": ○ " + (reason || "not run"));
    }
    const outcome = { passed: "✔ passed", rejected: "✖ refused" }[check.outcome] ||
      String(check.outcome);
    return h("li", {}, policy, ": " + outcome + (reason ? " — " + reason : ""));
  }

  function describe(item) {
    if (item === null || typeof item !== "object") return String(item);
    return item.id || item.model_group || item.model || JSON.stringify(item);
  }

  // -- wiring ------------------------------------------------------------

  function start() {
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("master-key").value.trim();
      if (!key) {
        show($("sign-in-error"), "Enter the master key.");
        return;
      }
      signIn(key);
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    $("create-form").addEventListener("submit", createKey);
    $("create-form").addEventListener("change", updateOwnerHint);
    $("copy-key").addEventListener("click", copyKey);
    $("new-key-done").addEventListener("click", () => {
      hideNewKey();
      status("");
    });
    $("filter-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.filter = {
        account_type: $("filter-type").value,
        key_alias: $("filter-alias").value.trim(),
      };
      state.size = Number($("filter-size").value);
      state.page = 1;
      loadKeys();
    });
    $("filter-clear").addEventListener("click", () => {
      $("filter-form").reset();
      $("filter-size").value = String(state.size);
      state.filter = { account_type: "", key_alias: "" };
      state.page = 1;
      loadKeys();
    });
    $("page-prev").addEventListener("click", () => {
      state.page = Math.max(1, state.page - 1);
      loadKeys();
    });
    $("page-next").addEventListener("click", () => {
      state.page = Math.min(state.totalPages, state.page + 1);
      loadKeys();
    });
    $("test-form").addEventListener("submit", (event) => {
      runTest(event).catch((error) => {
        $("test-result").replaceChildren(h("p", { class: "message error" }, error.message));
      });
    });
    $("test-close").addEventListener("click", () => $("test-dialog").close());

    const stored = sessionStorage.getItem(STORAGE);
    if (stored) signIn(stored);
    else showSignIn("");
  }

  document.addEventListener("DOMContentLoaded", start);
})();
