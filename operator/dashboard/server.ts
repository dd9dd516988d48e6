// The dashboard's HTTP(S) server: the page (static files built by `npm run
// dashboard:build`, served from memory, no CDN), a live stream of pairs,
// history samples and events (text/event-stream read by fetch, so the bearer
// token travels in a header and never in a URL), the permissions of the
// person using the page, and actions. Every request is authenticated and
// authorised as that person (Authorizer); the server itself holds the history.
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";
import path from "node:path";
import type { Logger } from "../../common/log.ts";
import { isLoopback, splitHostPort } from "../../common/config.ts";
import { PairHistory } from "./history.ts";
import { ACTIONS, pairKey, type Action, type ActionRequest, type LiveMessage, type PairView, type Permissions, type Snapshot } from "./model.ts";
import { AuthError, type Authorizer, type Caller, type Change, type DashboardSource } from "./source.ts";

const STATIC_DIR = fileURLToPath(new URL("./static/", import.meta.url));
const TYPES: Record<string, string> = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml" };
const SECURITY_HEADERS = {
  "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
  "X-Content-Type-Options": "nosniff",
  "Referrer-Policy": "no-referrer",
  "Cache-Control": "no-store",
};
/** How long a viewer's read permissions hold before they are asked again (a token may be revoked). */
const READ_RECHECK_MS = 60_000;
const FLUSH_MS = 200;
const MAX_EVENTS_SENT = 300;

interface StaticFile {
  body: Buffer;
  gz: Buffer;
  type: string;
  etag: string;
}

function loadStatic(): Map<string, StaticFile> {
  const files = new Map<string, StaticFile>();
  for (const name of ["index.html", "app.js", "app.css"]) {
    const body = readFileSync(path.join(STATIC_DIR, name));
    files.set(`/${name}`, { body, gz: gzipSync(body, { level: 9 }), type: TYPES[path.extname(name)] ?? "application/octet-stream", etag: `"${createHash("sha256").update(body).digest("base64url").slice(0, 22)}"` });
  }
  files.set("/", files.get("/index.html")!);
  return files;
}

class Viewer {
  readonly res: ServerResponse;
  readonly caller: Caller;
  /** namespace → may read pairs / events, and when that was asked */
  readonly read = new Map<string, { pairs: boolean; events: boolean; at: number }>();
  /** what waits for the next flush, by key (a newer pair message replaces an older one) */
  readonly pending = new Map<string, string>();
  constructor(res: ServerResponse, caller: Caller) {
    this.res = res;
    this.caller = caller;
  }
}

export interface DashboardOptions {
  /** host:port; on a non-loopback address TLS is required */
  address: string;
  source: DashboardSource;
  auth: Authorizer;
  log: Logger;
  /** PEM certificate and key: serve HTTPS */
  tls?: { cert: string; key: string };
  history?: PairHistory;
  /** clock for history samples (tests) */
  now?: () => number;
}

export class DashboardServer {
  readonly history: PairHistory;
  private readonly o: DashboardOptions;
  private readonly files = loadStatic();
  private readonly viewers = new Set<Viewer>();
  private readonly json = new WeakMap<PairView, string>();
  private server?: Server;
  private timers: NodeJS.Timeout[] = [];
  private readonly now: () => number;

  constructor(o: DashboardOptions) {
    this.o = o;
    this.history = o.history ?? new PairHistory();
    this.now = o.now ?? Date.now;
    const hp = splitHostPort(o.address);
    if (!hp) throw new Error(`--dashboard-address must be host:port, not ${o.address}`);
    if (!o.tls && !isLoopback(hp.host)) throw new Error(`the dashboard on ${o.address} needs TLS (bearer tokens travel in its requests): give a certificate, or bind a loopback address`);
  }

  /** The URL the page is served at (after start()). */
  get url(): string {
    const a = this.server?.address();
    const hp = splitHostPort(this.o.address)!;
    const port = typeof a === "object" && a ? a.port : hp.port;
    const host = hp.host === "0.0.0.0" || hp.host === "::" ? "127.0.0.1" : hp.host.includes(":") ? `[${hp.host}]` : hp.host;
    return `${this.o.tls ? "https" : "http"}://${host}:${port}/`;
  }

  async start(): Promise<void> {
    const { source } = this.o;
    const handler = (req: IncomingMessage, res: ServerResponse) => void this.handle(req, res).catch((e: Error) => {
      this.o.log.warn({ err: e.message, url: req.url }, "dashboard request failed");
      if (!res.headersSent) this.reply(res, 500, { ok: false, message: e.message });
      else res.end();
    });
    this.server = this.o.tls ? createHttpsServer({ cert: this.o.tls.cert, key: this.o.tls.key, minVersion: "TLSv1.2" }, handler) : createHttpServer(handler);
    const hp = splitHostPort(this.o.address)!;
    await new Promise<void>((resolve, reject) => {
      this.server!.once("error", reject);
      this.server!.listen(hp.port, hp.host, () => resolve());
    });
    for (const p of source.pairs()) this.observe(p);
    source.onChange((c) => this.changed(c));
    // Every pair gets a point per bucket even when nothing changes (a flat line is news too).
    const sample = setInterval(() => this.sample(), this.history.bucketMs);
    const flush = setInterval(() => this.flush(), FLUSH_MS);
    const beat = setInterval(() => {
      for (const v of this.viewers) v.res.write(": keep-alive\n\n");
    }, 15_000);
    for (const t of [sample, flush, beat]) t.unref();
    this.timers = [sample, flush, beat];
    this.o.log.info({ url: this.url, tls: !!this.o.tls, source: source.kind }, "dashboard serving");
  }

  async stop(): Promise<void> {
    for (const t of this.timers) clearInterval(t);
    for (const v of this.viewers) v.res.end();
    this.viewers.clear();
    const closed = new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
    // Idle keep-alive connections (a browser's) would hold close() open.
    this.server?.closeAllConnections();
    await closed;
  }

  get viewerCount(): number {
    return this.viewers.size;
  }

  private observe(p: PairView): void {
    const key = pairKey(p);
    this.history.record(key, this.now(), p.status.lagSeconds ?? 0, p.status.queuedBytes ?? 0);
    this.history.noteFailover(key, p.status.failover);
  }

  private withFailovers(p: PairView): PairView {
    const f = this.history.failoversOf(pairKey(p));
    return f.length || p.failovers.length ? { ...p, failovers: f } : p;
  }

  private pairJson(p: PairView): string {
    let j = this.json.get(p);
    if (j === undefined) this.json.set(p, (j = JSON.stringify(this.withFailovers(p))));
    return j;
  }

  private changed(c: Change): void {
    if (c.pair) {
      this.observe(c.pair);
      const key = pairKey(c.pair);
      const msg = frame("pair", this.pairJson(c.pair));
      for (const v of this.viewers) this.whenReadable(v, c.pair.namespace, "pairs", () => v.pending.set(`p:${key}`, msg));
    }
    if (c.gone) {
      const key = pairKey(c.gone);
      this.history.forget(key);
      const msg = frame("gone", JSON.stringify(c.gone));
      for (const v of this.viewers) this.whenReadable(v, c.gone.namespace, "pairs", () => v.pending.set(`p:${key}`, msg));
    }
    if (c.event) {
      const e = c.event;
      const msg = frame("event", JSON.stringify(e));
      for (const v of this.viewers) this.whenReadable(v, e.namespace, "events", () => v.pending.set(`e:${e.uid}`, msg));
    }
  }

  private sample(): void {
    const t = this.now();
    const points: Record<string, [number, number]> = {};
    for (const p of this.o.source.pairs()) {
      this.observe(p);
      points[pairKey(p)] = [p.status.lagSeconds ?? 0, p.status.queuedBytes ?? 0];
    }
    for (const v of this.viewers) {
      const mine: Record<string, [number, number]> = {};
      for (const [k, x] of Object.entries(points)) if (v.read.get(k.slice(0, k.indexOf("/")))?.pairs) mine[k] = x;
      v.pending.set("sample", frame("sample", JSON.stringify({ t: Math.floor(t / this.history.bucketMs) * this.history.bucketMs, points: mine })));
    }
  }

  private flush(): void {
    for (const v of this.viewers) {
      if (v.pending.size === 0) continue;
      v.res.write([...v.pending.values()].join(""));
      v.pending.clear();
    }
  }

  /** Run `fn` if the viewer may read `what` in `ns`; ask first when not known (or asked too long ago). */
  private whenReadable(v: Viewer, ns: string, what: "pairs" | "events", fn: () => void): void {
    const r = v.read.get(ns);
    if (r && this.now() - r.at < READ_RECHECK_MS) {
      if (r[what]) fn();
      return;
    }
    void this.readAccess(v, ns).then((x) => x[what] && this.viewers.has(v) && fn(), () => undefined);
  }

  private async readAccess(v: Viewer, ns: string): Promise<{ pairs: boolean; events: boolean }> {
    const r = v.read.get(ns);
    if (r && this.now() - r.at < READ_RECHECK_MS) return r;
    const x = await this.o.auth.canRead(v.caller, ns);
    v.read.set(ns, { ...x, at: this.now() });
    return x;
  }

  private reply(res: ServerResponse, status: number, body: unknown): void {
    res.writeHead(status, { ...SECURITY_HEADERS, "Content-Type": "application/json" }).end(JSON.stringify(body));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? "/", "http://x");
    const p = url.pathname;
    if (req.method === "GET" && this.files.has(p)) return this.serveFile(req, res, this.files.get(p)!);
    if (!p.startsWith("/api/")) return this.reply(res, 404, { ok: false, message: `no such page: ${p}` });
    let caller: Caller;
    try {
      caller = await this.o.auth.authenticate(req.headers.authorization);
    } catch (e) {
      if (e instanceof AuthError) return this.reply(res, e.status, { ok: false, message: e.message });
      throw e;
    }
    if (req.method === "GET" && p === "/api/live") return this.live(req, res, caller);
    const m = /^\/api\/pairs\/([a-z0-9.-]+)\/([a-z0-9.-]+)\/(permissions|actions\/([a-z]+))$/.exec(p);
    if (!m) return this.reply(res, 404, { ok: false, message: `no such API: ${req.method} ${p}` });
    const [, ns, name, , action] = m as unknown as [string, string, string, string, string | undefined];
    if (!(await this.readAccessOnce(caller, ns)).pairs || !this.o.source.pair(ns, name)) return this.reply(res, 404, { ok: false, message: `no pair ${ns}/${name} that ${caller.user} may read` });
    if (req.method === "GET" && !action) {
      const perms = Object.fromEntries(await Promise.all(ACTIONS.map(async (a) => [a, await this.o.auth.can(caller, ns, name, a)] as const))) as Permissions;
      return this.reply(res, 200, perms);
    }
    if (req.method === "POST" && action && (ACTIONS as readonly string[]).includes(action)) {
      let body: ActionRequest;
      try {
        body = await readJson(req);
      } catch (e) {
        return this.reply(res, e instanceof AuthError ? e.status : 400, { ok: false, message: `bad request body: ${(e as Error).message}` });
      }
      const d = await this.o.auth.can(caller, ns, name, action as Action);
      if (!d.allowed) {
        this.o.log.info({ user: caller.user, pair: `${ns}/${name}`, action, why: d.why }, "dashboard action refused");
        return this.reply(res, 403, { ok: false, message: d.why ?? "not allowed" });
      }
      this.o.log.info({ user: caller.user, pair: `${ns}/${name}`, action, request: body }, "dashboard action");
      try {
        return this.reply(res, 202, await this.o.source.act(caller, ns, name, action as Action, body));
      } catch (e) {
        const err = e as Error & { code?: number; status?: number };
        const status = err.code === 403 || err.status === 403 ? 403 : err.code === 409 ? 409 : 400;
        return this.reply(res, status, { ok: false, message: err.message });
      }
    }
    return this.reply(res, 405, { ok: false, message: `${req.method} not allowed on ${p}` });
  }

  private async readAccessOnce(caller: Caller, ns: string): Promise<{ pairs: boolean; events: boolean }> {
    return this.o.auth.canRead(caller, ns);
  }

  private serveFile(req: IncomingMessage, res: ServerResponse, f: StaticFile): void {
    const headers: Record<string, string> = { ...SECURITY_HEADERS, "Content-Type": f.type, ETag: f.etag, "Cache-Control": "no-cache", Vary: "Accept-Encoding" };
    if (req.headers["if-none-match"] === f.etag) return void res.writeHead(304, headers).end();
    const gz = /\bgzip\b/.test(String(req.headers["accept-encoding"] ?? ""));
    res.writeHead(200, { ...headers, ...(gz ? { "Content-Encoding": "gzip" } : {}) }).end(gz ? f.gz : f.body);
  }

  private async live(req: IncomingMessage, res: ServerResponse, caller: Caller): Promise<void> {
    const v = new Viewer(res, caller);
    const pairs = this.o.source.pairs();
    const namespaces = [...new Set([...pairs.map((x) => x.namespace), ...this.o.source.events().map((e) => e.namespace)])];
    await Promise.all(namespaces.map((ns) => this.readAccess(v, ns)));
    const readable = pairs.filter((x) => v.read.get(x.namespace)?.pairs);
    const hiddenNs = namespaces.filter((ns) => !v.read.get(ns)?.pairs);
    const now = this.now();
    const snap: Omit<Snapshot, "pairs"> = {
      user: caller.user,
      source: this.o.source.kind,
      history: Object.fromEntries(readable.map((x) => [pairKey(x), this.history.get(pairKey(x), now)])),
      events: this.o.source.events().filter((e) => v.read.get(e.namespace)?.events).slice(0, MAX_EVENTS_SENT),
      bucketMs: this.history.bucketMs,
      ...(hiddenNs.length ? { hidden: `${caller.user} may not list ReplicationPairs in ${hiddenNs.length} namespace(s) that have some` } : {}),
    };
    res.writeHead(200, { ...SECURITY_HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no" });
    // The pairs' JSON is cached per object: splice it in rather than serialise 500 pairs again per viewer.
    res.write(`event: snapshot\ndata: ${JSON.stringify(snap).slice(0, -1)},"pairs":[${readable.map((x) => this.pairJson(x)).join(",")}]}\n\n`);
    this.viewers.add(v);
    const recheck = setInterval(() => void this.o.auth.authenticate(req.headers.authorization).catch(() => res.end()), READ_RECHECK_MS);
    recheck.unref();
    req.on("close", () => {
      clearInterval(recheck);
      this.viewers.delete(v);
    });
  }
}

function frame(kind: LiveMessage["kind"], json: string): string {
  return `event: ${kind}\ndata: ${json}\n\n`;
}

async function readJson(req: IncomingMessage): Promise<ActionRequest> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > 16_384) throw new AuthError("request body too large", 413);
    chunks.push(c as Buffer);
  }
  const text = Buffer.concat(chunks).toString("utf8");
  if (!text) return {};
  const v = JSON.parse(text) as Record<string, unknown>;
  const out: ActionRequest = {};
  if (typeof v.target === "string") out.target = v.target;
  if (typeof v.repair === "boolean") out.repair = v.repair;
  if (v.mode === "full" || v.mode === "checksum") out.mode = v.mode;
  return out;
}

