// The dashboard page: every ReplicationPair on one screen, an event log beside
// it, a detail page per pair (#/pair/<ns>/<name>) with its actions. Preact +
// htm (no build-time JSX; bundled by esbuild into static/app.js). Data comes
// from /api/live, read with fetch so the bearer token stays in a header.
import { render } from "preact";
import { useEffect, useMemo, useState } from "preact/hooks";
import { html } from "htm/preact";
import type { Action, ActionReply, EventView, HistoryPoint, PairView, Permissions, Snapshot } from "../model.ts";

type Status = PairView["status"];
type Target = NonNullable<Status["targets"]>[number];

// ---------------------------------------------------------------- state

interface State {
  connected: boolean;
  error?: string;
  needToken?: string;
  snap?: Omit<Snapshot, "pairs" | "history" | "events">;
  pairs: Map<string, PairView>;
  history: Map<string, HistoryPoint[]>;
  events: EventView[];
  /** bumps on every change so components re-render */
  rev: number;
  route: string;
}

const TOKEN_KEY = "understudy.dashboard.token";
const st: State = { connected: false, pairs: new Map(), history: new Map(), events: [], rev: 0, route: location.hash };
const subscribers = new Set<() => void>();
let scheduled = false;
function changed(): void {
  st.rev++;
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    for (const s of subscribers) s();
  });
}
function useStore(): State {
  const [, set] = useState(0);
  useEffect(() => {
    const f = () => set((x) => x + 1);
    subscribers.add(f);
    return () => void subscribers.delete(f);
  }, []);
  return st;
}

const keyOf = (p: { namespace: string; name: string }) => `${p.namespace}/${p.name}`;
const token = () => sessionStorage.getItem(TOKEN_KEY) ?? "";
const authHeaders = (): Record<string, string> => (token() ? { Authorization: `Bearer ${token()}` } : {});

// ---------------------------------------------------------------- live stream

let abort: AbortController | undefined;

function apply(kind: string, data: string): void {
  const d = JSON.parse(data) as unknown;
  if (kind === "snapshot") {
    const s = d as Snapshot;
    st.snap = { user: s.user, source: s.source, bucketMs: s.bucketMs, ...(s.hidden ? { hidden: s.hidden } : {}) };
    st.pairs = new Map(s.pairs.map((p) => [keyOf(p), p]));
    st.history = new Map(Object.entries(s.history));
    st.events = s.events;
  } else if (kind === "pair") {
    const p = d as PairView;
    st.pairs.set(keyOf(p), p);
  } else if (kind === "gone") {
    st.pairs.delete(keyOf(d as PairView));
  } else if (kind === "event") {
    const e = d as EventView;
    st.events = [e, ...st.events.filter((x) => x.uid !== e.uid)].slice(0, 500);
  } else if (kind === "sample") {
    const s = d as { t: number; points: Record<string, [number, number]> };
    for (const [k, [lag, q]] of Object.entries(s.points)) {
      const h = st.history.get(k) ?? [];
      const last = h[h.length - 1];
      if (last && last.t === s.t) {
        last.lagSeconds = Math.max(last.lagSeconds, lag);
        last.queuedBytes = Math.max(last.queuedBytes, q);
      } else h.push({ t: s.t, lagSeconds: lag, queuedBytes: q });
      while (h.length && h[0]!.t <= s.t - 3600_000) h.shift();
      st.history.set(k, h);
    }
  }
  changed();
}

async function connect(): Promise<void> {
  abort?.abort();
  const ac = (abort = new AbortController());
  let delay = 1000;
  while (!ac.signal.aborted) {
    try {
      const res = await fetch("/api/live", { headers: authHeaders(), signal: ac.signal });
      if (res.status === 401) {
        st.needToken = ((await res.json()) as { message: string }).message;
        st.connected = false;
        changed();
        return;
      }
      if (!res.ok || !res.body) throw new Error(`${res.status} ${res.statusText}`);
      st.connected = true;
      st.error = undefined;
      st.needToken = undefined;
      delay = 1000;
      changed();
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i: number;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let kind = "message";
          const data: string[] = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) kind = line.slice(7);
            else if (line.startsWith("data: ")) data.push(line.slice(6));
          }
          if (data.length) apply(kind, data.join("\n"));
        }
      }
      throw new Error("the operator closed the stream");
    } catch (e) {
      if (ac.signal.aborted) return;
      st.connected = false;
      st.error = `live updates interrupted (${(e as Error).message}); reconnecting`;
      changed();
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 15_000);
    }
  }
}

// ---------------------------------------------------------------- formatting

function bytes(n: number | undefined): string {
  if (n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < u.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 1 : 0)} ${u[i]}`;
}
function secs(s: number | undefined): string {
  if (s === undefined) return "–";
  if (s <= 0) return "0s";
  if (s < 1) return `${Math.round(s * 1000)}ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${Math.round(s % 60)}s`;
  return `${Math.floor(s / 3600)}h${Math.round((s % 3600) / 60)}m`;
}
function ago(iso: string | undefined): string {
  if (!iso) return "never";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  return s < 5 ? "just now" : `${secs(Math.round(s))} ago`;
}
const nowPoint = (p: PairView): HistoryPoint => ({ t: Date.now(), lagSeconds: p.status.lagSeconds ?? 0, queuedBytes: p.status.queuedBytes ?? 0 });
const cond = (p: PairView, type: string) => p.status.conditions?.find((c) => c.type === type);

/** Mirror progress over all targets: done/total, bytes per second, and time to go. */
function mirrorOf(p: PairView): { active: boolean; pct: number; rate?: number; eta?: number; text: string } | undefined {
  const ms = (p.status.targets ?? []).map((t) => t.mirror).filter((m): m is NonNullable<Target["mirror"]> => !!m);
  const active = ms.filter((m) => m.active);
  if (!active.length) {
    const last = ms.find((m) => m.result);
    return last ? { active: false, pct: 100, text: last.result === "ok" ? `done ${ago(last.finishedAt)}` : `${last.result}` } : undefined;
  }
  const done = active.reduce((a, m) => a + (m.bytesDone ?? 0), 0);
  const total = active.reduce((a, m) => a + (m.bytesTotal ?? 0), 0);
  const started = Math.min(...active.map((m) => (m.startedAt ? Date.parse(m.startedAt) : Date.now())));
  const el = (Date.now() - started) / 1000;
  const rate = el > 0 ? done / el : undefined;
  const eta = rate && total > done ? (total - done) / rate : undefined;
  const pct = total > 0 ? Math.min(100, (100 * done) / total) : 0;
  return { active: true, pct, rate, eta, text: `${pct.toFixed(0)}% · ${bytes(done)} of ${bytes(total)}${rate ? ` · ${bytes(Math.round(rate))}/s` : ""}${eta !== undefined ? ` · ETA ${secs(Math.round(eta))}` : ""}` };
}

// ---------------------------------------------------------------- small components

function Phase({ p }: { p: PairView }) {
  const ph = p.status.phase ?? "Pending";
  return html`<span class=${`phase phase-${ph}`} data-phase=${ph}>${ph}</span>`;
}

/** A sparkline of one series over the last hour (SVG polyline: no chart library needed for this). */
function Spark({ points: hist, pick, now: cur, w = 90, h = 24, label }: { points: HistoryPoint[]; pick: (x: HistoryPoint) => number; now?: HistoryPoint; w?: number; h?: number; label: string }) {
  const now = Date.now();
  const t0 = now - 3600_000;
  // The line runs on to now with the value the status shows now (buckets close every bucketMs).
  const points = cur ? [...hist, { ...cur, t: now }] : hist;
  const vals = points.map(pick);
  const max = Math.max(1e-9, ...vals);
  const xy = points.map((x, i) => `${(((x.t - t0) / 3600_000) * w).toFixed(1)},${(h - 2 - (vals[i]! / max) * (h - 4)).toFixed(1)}`).join(" ");
  return html`<svg class="spark" width=${w} height=${h} viewBox=${`0 0 ${w} ${h}`} role="img" aria-label=${label}>
    <title>${label}</title>
    <line x1="0" y1=${h - 2} x2=${w} y2=${h - 2} class="axis" />
    ${points.length > 0 && html`<polyline points=${xy} />`}
  </svg>`;
}

function KnownGood({ p }: { p: PairView }) {
  const kg = p.status.knownGood;
  if (!kg?.length) return html`<span class="muted" title="known-good status is kept by a FailoverPolicy selecting the pair">${p.policy ? "–" : "no policy"}</span>`;
  return html`<ul class="kg">${kg.map((k) => html`<li class=${k.ok ? "ok" : "bad"} data-target=${k.target}>${k.ok ? "✓" : "✗"} ${k.target}${!k.ok && html`<span class="why">: ${(k.failed ?? []).join("; ")}</span>`}</li>`)}</ul>`;
}

function Endpoints({ p }: { p: PairView }) {
  const eps = p.status.endpoints ?? [];
  const kinds = [["source", p.spec.source] as const, ...p.spec.targets.map((t) => [t.name, t] as const)];
  return html`<ul class="eps">${kinds.map(([name, e]) => {
    const s = eps.find((x) => x.name === name);
    const kind = "ec2" in e && e.ec2 ? "ec2" : e.ssh ? "ssh" : e.enroll ? "enroll" : "agent";
    return html`<li><b>${name}</b> ${kind}${s?.phase ? html` <span class=${`ep ep-${s.phase}`}>${s.phase}</span>` : ""}${kind === "agent" ? html` <span class="muted">${e.agent?.address}</span>` : ""}</li>`;
  })}</ul>`;
}

function LastVerify({ p }: { p: PairView }) {
  const v = p.status.lastVerify;
  if (!v?.result) return html`<span class="muted">never</span>`;
  return html`<span class=${`verify verify-${v.result}`}>${v.result}</span> <span class="muted">${v.result === "Running" ? "" : ago(v.finishedAt)}${v.differences ? ` · ${v.differences} diff` : ""}</span>`;
}

function Failovers({ p, all }: { p: PairView; all?: boolean }) {
  const f = p.failovers.length ? p.failovers : p.status.failover?.finishedAt ? [p.status.failover] : [];
  if (!f.length) return html`<span class="muted">none</span>`;
  return html`<ul class="fo">${(all ? f : f.slice(0, 1)).map((x) => html`<li>${x.reason ?? "failover"} → ${x.target} · <b>${x.recoverySeconds ?? "?"} s</b> <span class="muted">${ago(x.finishedAt)}</span></li>`)}</ul>`;
}

// ---------------------------------------------------------------- overview

function Overview() {
  const s = useStore();
  const [filter, setFilter] = useState("");
  const pairs = [...s.pairs.values()].filter((p) => !filter || keyOf(p).includes(filter) || (p.status.phase ?? "").toLowerCase().includes(filter.toLowerCase())).sort((a, b) => keyOf(a).localeCompare(keyOf(b)));
  const counts = new Map<string, number>();
  for (const p of s.pairs.values()) counts.set(p.status.phase ?? "Pending", (counts.get(p.status.phase ?? "Pending") ?? 0) + 1);
  return html`<section class="pairs">
    <div class="bar">
      <h2>Replication pairs <span class="muted">${s.pairs.size}</span></h2>
      <span class="counts">${[...counts].map(([ph, n]) => html`<span class=${`phase phase-${ph}`}>${ph} ${n}</span> `)}</span>
      <input type="search" placeholder="filter pairs" value=${filter} onInput=${(e: Event) => setFilter((e.target as HTMLInputElement).value)} />
    </div>
    ${s.snap?.hidden && html`<p class="note">${s.snap.hidden}</p>`}
    <div class="scroll"><table id="pairs">
      <thead><tr><th>Pair</th><th>Phase</th><th>Active</th><th>Lag (1 h)</th><th>Queued (1 h)</th><th>Mirror</th><th>Last verify</th><th>Known good</th><th>Endpoints</th><th>Last failover</th></tr></thead>
      <tbody>${pairs.map((p) => {
        const k = keyOf(p);
        const h = s.history.get(k) ?? [];
        const m = mirrorOf(p);
        return html`<tr key=${k} data-pair=${k}>
          <td><a href=${`#/pair/${k}`}>${p.namespace}/<b>${p.name}</b></a></td>
          <td><${Phase} p=${p} /></td>
          <td class="active">${p.status.activeSide ?? "source"}</td>
          <td class="lag nowrap"><span class="num" data-lag=${p.status.lag ?? ""}>${p.status.lag ?? secs(p.status.lagSeconds)}</span> <${Spark} points=${h} now=${nowPoint(p)} pick=${(x: HistoryPoint) => x.lagSeconds} label=${`lag of ${k}, last hour`} /></td>
          <td class="queued nowrap"><span class="num">${p.status.queued ?? bytes(p.status.queuedBytes)}</span> <${Spark} points=${h} now=${nowPoint(p)} pick=${(x: HistoryPoint) => x.queuedBytes} label=${`queued bytes of ${k}, last hour`} /></td>
          <td class="mirror">${m ? html`<div class="prog"><div style=${`width:${m.pct}%`} class=${m.active ? "run" : ""}></div></div><small>${m.text}</small>` : html`<span class="muted">–</span>`}</td>
          <td><${LastVerify} p=${p} /></td>
          <td><${KnownGood} p=${p} /></td>
          <td><${Endpoints} p=${p} /></td>
          <td><${Failovers} p=${p} /></td>
        </tr>`;
      })}</tbody>
    </table></div>
    ${pairs.length === 0 && html`<p class="muted empty">${s.connected ? "no ReplicationPairs you may read" : "connecting…"}</p>`}
  </section>`;
}

// ---------------------------------------------------------------- events

function Events({ pair }: { pair?: string }) {
  const s = useStore();
  const [byPair, setByPair] = useState("");
  const [type, setType] = useState("");
  const want = pair ?? byPair;
  const names = useMemo(() => [...new Set(s.events.map((e) => `${e.namespace}/${e.name}`))].sort(), [s.events]);
  const evs = s.events.filter((e) => (!want || `${e.namespace}/${e.name}` === want) && (!type || e.type === type)).slice(0, 200);
  return html`<aside class="events">
    <div class="bar"><h2>Events</h2>
      ${!pair && html`<select aria-label="filter by pair" onChange=${(e: Event) => setByPair((e.target as HTMLSelectElement).value)}><option value="">all objects</option>${names.map((n) => html`<option value=${n} selected=${n === byPair}>${n}</option>`)}</select>`}
      <select aria-label="filter by type" onChange=${(e: Event) => setType((e.target as HTMLSelectElement).value)}><option value="">all types</option><option value="Normal">Normal</option><option value="Warning">Warning</option></select>
    </div>
    <ol id="events">${evs.map((e) => html`<li key=${e.uid} class=${e.type === "Warning" ? "warn" : ""} data-reason=${e.reason}>
      <div><span class="when" title=${e.last}>${ago(e.last)}</span> <b>${e.reason}</b>${e.count > 1 ? html` <span class="muted">×${e.count}</span>` : ""} <span class="obj">${e.kind === "ReplicationPair" ? "" : `${e.kind} `}${e.namespace}/${e.name}</span></div>
      <div class="msg">${e.message}</div></li>`)}</ol>
    ${evs.length === 0 && html`<p class="muted">no events</p>`}
  </aside>`;
}

// ---------------------------------------------------------------- detail and actions

interface Running {
  action: Action;
  side?: string;
  request?: string;
  lines: string[];
  done?: "ok" | "failed";
}

/** The line the plugin prints while it waits, and whether the action is finished (as operator/plugin.ts decides). */
function progress(p: PairView, r: Running): { line: string; done?: "ok" | "failed" } {
  const s = p.status;
  if (r.action === "verify") {
    const v = s.lastVerify;
    const line = `verify: ${v?.result ?? "?"}${v?.filesCompared ? `, ${v.filesCompared} files compared` : ""}${v?.differences ? `, ${v.differences} difference(s)` : ""}${v?.repaired ? `, ${v.repaired} repaired` : ""}`;
    if (s.lastHandledVerifyRequest === r.request && v?.finishedAt && v.result !== "Running" && Date.parse(v.finishedAt) >= Number(r.request) - 1000) return { line, done: v.result === "Passed" ? "ok" : "failed" };
    return { line: s.lastHandledVerifyRequest === r.request ? line : "verify: waiting for the operator" };
  }
  if (r.action === "mirror") {
    const m = mirrorOf(p);
    const line = `mirror: ${m?.text ?? "?"}`;
    if (s.lastHandledMirrorRequest === r.request && !(s.targets ?? []).some((t) => t.mirror?.active)) return { line, done: (s.targets ?? []).every((t) => !t.mirror?.result || t.mirror.result === "ok") ? "ok" : "failed" };
    return { line: s.lastHandledMirrorRequest === r.request ? line : "mirror: waiting for the operator" };
  }
  const fo = cond(p, "FailedOver");
  const line = `${s.phase ?? "?"}: ${fo ? `${fo.reason}: ${fo.message}` : ""}`;
  if ((s.activeSide ?? "source") === r.side && s.observedGeneration === p.generation && s.phase !== "FailingBack" && s.phase !== "FailingOver") return { line, done: "ok" };
  if (fo?.reason === "FailoverRefused") return { line, done: "failed" };
  return { line };
}

const LABEL: Record<Action, string> = { failover: "Fail over", cutover: "Cut over", failback: "Fail back", verify: "Verify", mirror: "Mirror" };
const EXPLAIN: Record<Action, string> = {
  failover: "Make the chosen target serve (only a known-good copy is accepted; with the source alive this drains it first).",
  cutover: "Planned move to the chosen target: final sync, then the target serves; the old server stays a fallback.",
  failback: "Bring the original source back: changes made meanwhile travel back, then it serves again.",
  verify: "Compare every target with the source now.",
  mirror: "Copy what differs from the source to every target now.",
};

function Actions({ p }: { p: PairView }) {
  const [perms, setPerms] = useState<Permissions | undefined>();
  const [permErr, setPermErr] = useState<string | undefined>();
  const [target, setTarget] = useState(p.status.knownGood?.find((k) => k.ok)?.target ?? p.spec.targets[0]?.name ?? "");
  const [repair, setRepair] = useState(false);
  const [mode, setMode] = useState<"checksum" | "full">("checksum");
  const [confirm, setConfirm] = useState<Action | undefined>();
  const [run, setRun] = useState<Running | undefined>();
  const k = keyOf(p);
  useEffect(() => {
    fetch(`/api/pairs/${k}/permissions`, { headers: authHeaders() }).then(async (r) => (r.ok ? setPerms((await r.json()) as Permissions) : setPermErr(((await r.json()) as ActionReply).message)), (e: Error) => setPermErr(e.message));
  }, [k]);
  // Progress follows the pair's live status.
  useEffect(() => {
    if (!run || run.done || run.lines.length === 0) return;
    const pr = progress(p, run);
    if (pr.line !== run.lines[run.lines.length - 1] || pr.done) setRun({ ...run, lines: pr.line !== run.lines[run.lines.length - 1] ? [...run.lines, pr.line] : run.lines, ...(pr.done ? { done: pr.done } : {}) });
  }, [p, run]);
  const side = (a: Action) => (a === "failback" ? "source" : target);
  async function go(a: Action) {
    setConfirm(undefined);
    const body = a === "verify" ? { repair } : a === "mirror" ? { mode } : a === "failback" ? {} : { target };
    const r0: Running = { action: a, side: side(a), lines: [] };
    setRun(r0);
    const res = await fetch(`/api/pairs/${k}/actions/${a}`, { method: "POST", headers: { ...authHeaders(), "Content-Type": "application/json" }, body: JSON.stringify(body) }).catch((e: Error) => ({ ok: false, json: async () => ({ ok: false, message: e.message }) }) as Response);
    const rep = (await res.json()) as ActionReply;
    if (!res.ok) return setRun({ ...r0, lines: [`refused: ${rep.message}`], done: "failed" });
    setRun({ ...r0, ...(rep.request ? { request: rep.request } : {}), lines: [rep.message] });
  }
  const btn = (a: Action) => {
    const d = perms?.[a];
    return html`<button class="act" data-action=${a} disabled=${!d?.allowed || (run && !run.done)} title=${d?.why ?? EXPLAIN[a]} onClick=${() => setConfirm(a)}>${LABEL[a]}</button>
      ${d && !d.allowed && html`<span class="why" data-why=${a}>${d.why}</span>`}`;
  };
  const targets = p.spec.targets.map((t) => t.name);
  return html`<section class="actions">
    <h3>Actions <span class="muted">as ${st.snap?.user}</span></h3>
    ${permErr && html`<p class="note">${permErr}</p>`}
    ${!perms && !permErr && html`<p class="muted">asking what you may do…</p>`}
    ${perms && html`<div class="grid">
      <div>${btn("failover")} <label>to <select aria-label="failover target" onChange=${(e: Event) => setTarget((e.target as HTMLSelectElement).value)}>${targets.map((t) => html`<option value=${t} selected=${t === target}>${t}</option>`)}</select></label></div>
      <div>${btn("cutover")} <span class="muted">to ${target}</span></div>
      <div>${btn("failback")}</div>
      <div>${btn("verify")} <label><input type="checkbox" checked=${repair} onChange=${(e: Event) => setRepair((e.target as HTMLInputElement).checked)} /> repair</label></div>
      <div>${btn("mirror")} <select aria-label="mirror mode" onChange=${(e: Event) => setMode((e.target as HTMLSelectElement).value as "checksum" | "full")}><option value="checksum">checksum</option><option value="full">full</option></select></div>
    </div>`}
    ${confirm && html`<div class="modal" role="dialog" aria-modal="true"><div>
      <h3>${LABEL[confirm]} ${k}${confirm === "failback" ? " to its source" : confirm === "verify" || confirm === "mirror" ? "" : ` to ${target}`}?</h3>
      <p>${EXPLAIN[confirm]}</p>
      <button class="primary" data-confirm="yes" onClick=${() => void go(confirm)}>${LABEL[confirm]}</button> <button onClick=${() => setConfirm(undefined)}>Cancel</button>
    </div></div>`}
    ${run && html`<div class=${`progress ${run.done ?? "running"}`} id="progress"><b>${LABEL[run.action]}${run.done ? (run.done === "ok" ? " — done" : " — failed") : " — in progress…"}</b>
      <ol>${run.lines.map((l) => html`<li>${l}</li>`)}</ol></div>`}
  </section>`;
}

function Chart({ points, now, pick, fmt, label }: { points: HistoryPoint[]; now: HistoryPoint; pick: (x: HistoryPoint) => number; fmt: (n: number) => string; label: string }) {
  const max = Math.max(0, ...points.map(pick), pick(now));
  return html`<figure class="chart"><figcaption>${label} <span class="muted">last hour, max ${fmt(max)}</span></figcaption><${Spark} points=${points} now=${now} pick=${pick} w=${420} h=${80} label=${label} /></figure>`;
}

function Detail({ k }: { k: string }) {
  const s = useStore();
  const p = s.pairs.get(k);
  if (!p) return html`<section class="detail"><p><a href="#/">← all pairs</a></p><p class="muted">${s.connected ? `no pair ${k} that you may read` : "connecting…"}</p></section>`;
  const h = s.history.get(k) ?? [];
  const m = mirrorOf(p);
  const st2 = p.status;
  return html`<section class="detail" data-pair=${k}>
    <p><a href="#/">← all pairs</a></p>
    <h2>${p.namespace}/<b>${p.name}</b> <${Phase} p=${p} /></h2>
    <div class="facts">
      <div><label>Active side</label><span class="active">${st2.activeSide ?? "source"}</span> <span class="muted">epoch ${st2.epoch ?? 0}</span></div>
      <div><label>Lag</label><span class="num">${st2.lag ?? secs(st2.lagSeconds)}</span></div>
      <div><label>Queued</label><span class="num">${st2.queued ?? bytes(st2.queuedBytes)}</span></div>
      <div><label>Files</label>${st2.files ?? "–"} <span class="muted">${bytes(st2.bytes)}</span></div>
      <div><label>Path</label><code>${p.spec.replicationSet.path}</code></div>
      <div><label>Policy</label>${p.policy ?? html`<span class="muted">none</span>`}</div>
      <div><label>Last verify</label><${LastVerify} p=${p} /></div>
      <div><label>Mirror</label>${m ? m.text : "–"}</div>
    </div>
    <div class="charts"><${Chart} points=${h} now=${nowPoint(p)} pick=${(x: HistoryPoint) => x.lagSeconds} fmt=${secs} label="Lag" /><${Chart} points=${h} now=${nowPoint(p)} pick=${(x: HistoryPoint) => x.queuedBytes} fmt=${bytes} label="Queued" /></div>
    <${Actions} p=${p} />
    <h3>Targets</h3>
    <table class="targets"><thead><tr><th>Target</th><th>Address</th><th>State</th><th>Sent / acked / applied</th><th>Lag</th><th>Mirror</th><th>Known good</th><th>Last error</th></tr></thead>
      <tbody>${(st2.targets ?? []).map((t) => {
        const kg = st2.knownGood?.find((x) => x.target === t.name);
        return html`<tr><td><b>${t.name}</b></td><td><code>${t.address}</code></td><td>${t.state ?? "?"}${t.connected ? "" : " (not connected)"}</td><td>${t.lastSentSeq ?? 0} / ${t.lastAckedSeq ?? 0} / ${t.appliedSeq ?? 0}</td><td>${secs(t.lagSeconds)}</td>
          <td>${t.mirror ? `${t.mirror.active ? "running" : (t.mirror.result ?? "")} ${t.mirror.filesDone ?? 0}/${t.mirror.filesTotal ?? 0} files` : "–"}</td>
          <td>${kg ? (kg.ok ? html`<span class="ok">✓ yes</span>` : html`<span class="bad">✗ ${(kg.failed ?? []).join("; ")}</span>`) : html`<span class="muted">–</span>`}</td><td class="err">${t.lastError ?? ""}</td></tr>`;
      })}</tbody></table>
    <div class="cols">
      <div><h3>Endpoints</h3><${Endpoints} p=${p} />
        ${(st2.endpoints ?? []).map((e) => html`<p class="ep-detail"><b>${e.name}</b> (${e.kind}) ${e.phase ?? ""}${e.instanceId ? ` · ${e.instanceId} ${e.instanceType ?? ""} ${e.instanceState ?? ""}` : ""}${e.agentAddress ? ` · agent ${e.agentAddress}` : ""}${e.message ? html`<br /><span class="muted">${e.message}</span>` : ""}</p>`)}</div>
      <div><h3>Failovers</h3><${Failovers} p=${p} all=${true} />${st2.reverse && html`<p>reverse replication: ${st2.reverse.state}${st2.reverse.mirrored ? ", source up to date" : ""}</p>`}</div>
    </div>
    <h3>Conditions</h3>
    <table class="conds"><tbody>${(st2.conditions ?? []).map((c) => html`<tr class=${(c.type === "Degraded" ? c.status === "True" : c.status === "False") ? "bad" : ""}><td>${c.type}</td><td>${c.status}</td><td>${c.reason}</td><td>${c.message}</td><td class="muted">${ago(c.lastTransitionTime)}</td></tr>`)}</tbody></table>
  </section>`;
}

// ---------------------------------------------------------------- shell

function SignIn({ why }: { why: string }) {
  const [t, setT] = useState("");
  return html`<section class="signin"><h2>Sign in</h2><p>${why}</p>
    <p class="muted">The token is kept in this tab only (sessionStorage) and sent in the Authorization header; the operator checks it with a TokenReview and every action with a SubjectAccessReview, and makes changes as you.</p>
    <form onSubmit=${(e: Event) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, t.trim());
      void connect();
    }}><textarea id="token" rows="4" placeholder="eyJhbGciOi…" value=${t} onInput=${(e: Event) => setT((e.target as HTMLTextAreaElement).value)}></textarea><br /><button class="primary" type="submit">Sign in</button></form></section>`;
}

function App() {
  const s = useStore();
  useEffect(() => {
    const f = () => {
      st.route = location.hash;
      changed();
    };
    addEventListener("hashchange", f);
    // ages ("3s ago") and ETAs move on even without news
    const t = setInterval(changed, 5000);
    return () => {
      removeEventListener("hashchange", f);
      clearInterval(t);
    };
  }, []);
  const m = /^#\/pair\/([^/]+)\/([^/]+)$/.exec(s.route);
  return html`<header><h1>understudy</h1>
      <span class=${`live ${s.connected ? "on" : "off"}`} id="live">${s.connected ? "live" : "offline"}</span>
      ${s.snap && html`<span class="who">${s.snap.source === "demo" ? "demo (no Kubernetes): the demo's agents, read directly" : `signed in as ${s.snap.user}`}</span>`}
      ${token() && html`<button class="link" onClick=${() => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); }}>sign out</button>`}
    </header>
    ${s.error && html`<p class="note">${s.error}</p>`}
    ${s.needToken ? html`<${SignIn} why=${s.needToken} />` : html`<main>${m ? html`<${Detail} k=${`${m[1]}/${m[2]}`} />` : html`<${Overview} />`}<${Events} pair=${m ? `${m[1]}/${m[2]}` : undefined} /></main>`}`;
}

render(html`<${App} />`, document.getElementById("app")!);
void connect();
