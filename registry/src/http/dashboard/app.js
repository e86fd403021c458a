// registry dashboard: reads the JSON API like any client. No framework, no
// build step: this file is served as is from the binary.
'use strict';

const TOKEN_KEY = 'registry.token';
const MAX_LOG = 300;
// Lease times are re-read this often (heartbeats renew leases without any
// catalog event); the countdown in between is local.
const LEASE_REFRESH_MS = 5000;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  services: [],
  selected: null,
  instances: [],
  fetchedAt: 0,
  filter: '',
  showEmpty: false,
  status: null,
  lastEventId: null,
  epoch: null,
  authWaiters: [],
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

class AuthNeeded extends Error {}

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h['Authorization'] = 'Bearer ' + state.token;
  return h;
}

async function api(path) {
  const resp = await fetch(path, { headers: authHeaders(), cache: 'no-store' });
  if (resp.status === 401) {
    await askToken(resp);
    throw new AuthNeeded();
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.message || resp.statusText);
  return body;
}

// --- auth ---------------------------------------------------------------

function askToken(resp) {
  const dialog = $('login');
  if (resp && state.token) {
    $('login-error').textContent = 'That token was not accepted.';
  }
  if (!dialog.open) {
    dialog.showModal();
    $('login-token').focus();
  }
  return new Promise((resolve) => state.authWaiters.push(resolve));
}

function setupAuth() {
  $('login-form').addEventListener('submit', () => {
    state.token = $('login-token').value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $('login-token').value = '';
    $('login-error').textContent = '';
    $('signout').hidden = false;
    const waiters = state.authWaiters.splice(0);
    waiters.forEach((w) => w());
  });
  $('signout').hidden = !state.token;
  $('signout').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = '';
    location.reload();
  });
}

// --- services -----------------------------------------------------------

let servicesTimer = null;
function refreshServicesSoon() {
  if (servicesTimer) return;
  servicesTimer = setTimeout(() => {
    servicesTimer = null;
    refreshServices();
  }, 100);
}

async function refreshServices() {
  try {
    const [list, status] = await Promise.all([api('/v1/services'), api('/v1/status')]);
    state.services = list.services;
    state.status = status;
    renderSummary();
    renderServices();
    const first = state.services.find((s) => s.instanceCount > 0);
    if (!state.selected && first && !matchMedia('(max-width: 760px)').matches) {
      select(first.name, false);
    }
  } catch (e) {
    if (!(e instanceof AuthNeeded)) console.warn('services:', e);
  }
}

function renderSummary() {
  const s = state.status;
  if (!s) return;
  const parts = [
    `v${s.version}`,
    `revision ${s.revision}`,
    `${s.services} services`,
    `${s.instances} instances`,
    `${s.leases} leases`,
  ];
  if (s.server && s.server.warmingUp) parts.push('warming up');
  if (s.server && s.server.stale) parts.push('STALE (etcd unreachable)');
  $('summary').textContent = parts.join(' · ');
}

function matches(text) {
  return !state.filter || text.toLowerCase().includes(state.filter);
}

function renderServices() {
  const list = $('services');
  // Known services with no instance left are hidden unless asked for:
  // a deregistered service leaves the list.
  const live = state.services.filter((s) => state.showEmpty || s.instanceCount > 0);
  const shown = live.filter((s) => matches(s.name));
  $('services-count').textContent = `(${live.length})`;
  $('services-empty').hidden = live.length > 0;
  const focused = document.activeElement && document.activeElement.dataset.service;
  list.replaceChildren(...shown.map((s) => {
    const n = s.instanceCount;
    const health = n > 0
      ? el('span', { class: 'svc-count health passing', text: `${n} passing` })
      : el('span', { class: 'svc-count health empty', text: 'no instances' });
    const button = el('button', { type: 'button', 'data-service': s.name },
      el('span', { class: 'svc-name', text: s.name }), health);
    if (s.name === state.selected) button.setAttribute('aria-current', 'true');
    button.addEventListener('click', () => select(s.name, true));
    return el('li', {}, button);
  }));
  if (focused) {
    const again = list.querySelector(`button[data-service="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

function moveFocus(delta) {
  const buttons = [...$('services').querySelectorAll('button')];
  if (buttons.length === 0) return;
  const i = buttons.indexOf(document.activeElement);
  const next = i < 0 ? 0 : Math.max(0, Math.min(buttons.length - 1, i + delta));
  buttons[next].focus();
}

// --- instances ----------------------------------------------------------

function select(name, userAction) {
  state.selected = name;
  state.instances = [];
  $('detail-title').textContent = name;
  renderServices();
  refreshInstances();
  if (userAction && matchMedia('(max-width: 760px)').matches) {
    $('detail-title').scrollIntoView({ behavior: 'smooth' });
  }
}

let instancesTimer = null;
function refreshInstancesSoon() {
  if (instancesTimer) return;
  instancesTimer = setTimeout(() => {
    instancesTimer = null;
    refreshInstances();
  }, 100);
}

async function refreshInstances() {
  const name = state.selected;
  if (!name) return;
  try {
    const r = await api(`/v1/services/${encodeURIComponent(name)}?include_lease_ttl=true`);
    if (name !== state.selected) return;
    state.instances = r.instances;
    state.fetchedAt = performance.now();
    $('detail-meta').textContent = r.serviceKnown
      ? `${r.instances.length} instance(s) at revision ${r.revision}`
      : 'unknown service';
    renderInstances();
  } catch (e) {
    if (!(e instanceof AuthNeeded)) $('detail-meta').textContent = String(e.message || e);
  }
}

function leaseLeft(i) {
  const ms = Number(i.leaseRemainingMs) - (performance.now() - state.fetchedAt);
  return Math.max(0, ms);
}

function fmtLeft(ms) {
  if (ms >= 3600000) return `${(ms / 3600000).toFixed(1)} h`;
  if (ms >= 60000) return `${Math.floor(ms / 60000)} m ${Math.floor((ms % 60000) / 1000)} s`;
  return `${(ms / 1000).toFixed(0)} s`;
}

function renderInstances() {
  const tbody = $('instances').querySelector('tbody');
  const rows = state.instances.filter((i) =>
    matches(i.id) || matches(i.address) || matches(state.selected) ||
    Object.entries(i.metadata || {}).some(([k, v]) => matches(`${k}=${v}`)));
  tbody.replaceChildren(...rows.map((i) => {
    const left = leaseLeft(i);
    // Every listed instance holds a live lease; one whose countdown ran out
    // is about to expire unless a heartbeat renewed it (next refresh says).
    const health = left > 0 ? 'passing' : 'expiring';
    const meta = el('div', { class: 'meta' }, ...Object.entries(i.metadata || {})
      .sort(([a], [b]) => (a < b ? -1 : 1))
      .map(([k, v]) => el('span', { text: `${k}=${v}` })));
    return el('tr', { 'data-id': i.id },
      el('td', {}, el('code', { text: i.id })),
      el('td', {}, el('code', { text: i.address })),
      el('td', {}, el('span', { class: `health ${health}`, text: health })),
      el('td', { class: 'num', text: String(i.weight) }),
      el('td', { class: 'num lease', text: fmtLeft(left) }),
      el('td', { class: 'num', text: String(i.revision) }),
      el('td', {}, meta));
  }));
  const empty = $('instances-empty');
  empty.hidden = rows.length > 0;
  empty.textContent = state.instances.length === 0 ? 'No live instances.' : 'No instance matches the filter.';
}

// --- live events (SSE over fetch, so the token can go in a header) -------

function setLive(on, text) {
  const b = $('live');
  b.className = 'badge ' + (on ? 'on' : 'off');
  b.textContent = text;
}

function logLine(cls, text) {
  const list = $('events');
  const time = new Date().toLocaleTimeString();
  list.prepend(el('li', { class: cls }, el('span', { class: 'muted', text: time + ' ' }), text));
  while (list.children.length > MAX_LOG) list.lastChild.remove();
}

function reasonName(r) {
  return String(r || '').replace('DELETE_REASON_', '').toLowerCase();
}

function onMessage(event, data, id) {
  if (id) state.lastEventId = id;
  let msg;
  try { msg = JSON.parse(data); } catch { return; }
  if (event === 'events') {
    const touched = new Set();
    for (const e of msg.events) {
      const i = e.instance || {};
      touched.add(i.service);
      if (e.type === 'EVENT_TYPE_PUT') {
        logLine('put', `PUT    rev ${e.revision} ${i.service}/${i.id} ${i.address}`);
      } else {
        logLine('delete', `DELETE rev ${e.revision} ${i.service}/${i.id} ${i.address} (${reasonName(e.reason)})`);
      }
    }
    refreshServicesSoon();
    if (touched.has(state.selected)) refreshInstancesSoon();
  } else if (event === 'snapshot') {
    if (msg.reset) {
      logLine('reset', `RESET  rev ${msg.revision} (${String(msg.reason).replace('RESET_REASON_', '').toLowerCase()}): reloaded`);
      if (msg.server) state.epoch = msg.server.epoch;
    }
    if (!msg.more) {
      refreshServicesSoon();
      refreshInstancesSoon();
    }
  } else if (event === 'progress') {
    if (state.status) {
      state.status.revision = msg.revision;
      renderSummary();
    }
  } else if (event === 'error') {
    logLine('reset', `stream closed: ${msg.message}`);
  }
}

async function readStream(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, '\n');
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = 'message', data = [], id = null;
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') event = value;
        else if (field === 'data') data.push(value);
        else if (field === 'id') id = value;
      }
      if (data.length > 0) onMessage(event, data.join('\n'), id);
    }
  }
}

async function watchLoop() {
  for (;;) {
    try {
      let url = '/v1/watch';
      const headers = authHeaders();
      if (state.lastEventId !== null) {
        headers['Last-Event-ID'] = state.lastEventId;
        url += `?epoch=${state.epoch}`;
      } else {
        // Live from now on: the panels show the current state, the log
        // shows what happens next (no snapshot of every instance).
        const status = await api('/v1/status');
        state.status = status;
        state.epoch = status.server.epoch;
        url += `?epoch=${state.epoch}&start_revision=${BigInt(status.revision) + 1n}`;
      }
      const resp = await fetch(url, { headers, cache: 'no-store' });
      if (resp.status === 401) {
        await askToken(resp);
        continue;
      }
      if (!resp.ok) throw new Error(`watch: HTTP ${resp.status}`);
      setLive(true, 'live');
      refreshServices();
      refreshInstances();
      await readStream(resp);
    } catch (e) {
      if (!(e instanceof AuthNeeded)) console.warn('watch:', e);
    }
    setLive(false, 'reconnecting…');
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// --- wiring -------------------------------------------------------------

function setupKeys() {
  const search = $('services-search');
  search.addEventListener('input', () => {
    state.filter = search.value.trim().toLowerCase();
    renderServices();
    renderInstances();
  });
  search.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') {
      search.value = '';
      search.dispatchEvent(new Event('input'));
    } else if (e.key === 'ArrowDown') {
      e.preventDefault();
      moveFocus(0);
    }
  });
  $('services').addEventListener('keydown', (e) => {
    if (e.key === 'ArrowDown') { e.preventDefault(); moveFocus(1); }
    if (e.key === 'ArrowUp') { e.preventDefault(); moveFocus(-1); }
    if (e.key === 'Home') { e.preventDefault(); moveFocus(-1e9); }
    if (e.key === 'End') { e.preventDefault(); moveFocus(1e9); }
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === '/' && document.activeElement !== search && !$('login').open) {
      e.preventDefault();
      search.focus();
    }
  });
  $('log-clear').addEventListener('click', () => $('events').replaceChildren());
  $('show-empty').addEventListener('change', (e) => {
    state.showEmpty = e.target.checked;
    renderServices();
  });
}

function start() {
  setupAuth();
  setupKeys();
  setInterval(() => {
    // Countdown between refreshes.
    for (const row of $('instances').querySelectorAll('tbody tr')) {
      const i = state.instances.find((x) => x.id === row.dataset.id);
      if (i) row.querySelector('.lease').textContent = fmtLeft(leaseLeft(i));
    }
  }, 1000);
  setInterval(refreshInstances, LEASE_REFRESH_MS);
  refreshServices();
  watchLoop();
}

document.addEventListener('DOMContentLoaded', start);
