// The dashboard's pure parts and its server with a fake data source and
// authoriser (the real ones run against a real API server and real agents in
// test/e2e/dashboard.test.ts): bounded history, the patches actions make
// (the plugin's), and that reads, actions and the live stream follow the
// caller's permissions.
import { test } from "node:test";
import assert from "node:assert/strict";
import { PairHistory } from "../../operator/dashboard/history.ts";
import { actionPatch, ActionError } from "../../operator/dashboard/actions.ts";
import { DashboardServer } from "../../operator/dashboard/server.ts";
import { AuthError, type Authorizer, type Caller, type Change, type DashboardSource } from "../../operator/dashboard/source.ts";
import type { Action, ActionReply, EventView, PairView } from "../../operator/dashboard/model.ts";
import type { ReplicationPair } from "../../operator/api/v1alpha1/index.ts";
import { createLogger } from "../../common/log.ts";

test("history keeps the worst value per bucket, repeats the last value over silent buckets, and forgets what is older than its window", () => {
  const h = new PairHistory({ bucketMs: 1000, points: 5 });
  h.record("a", 10_000, 1, 100);
  h.record("a", 10_500, 3, 50);
  h.record("a", 10_900, 2, 70);
  assert.deepEqual(h.get("a", 10_900), [{ t: 10_000, lagSeconds: 3, queuedBytes: 100 }]);
  h.record("a", 13_000, 0, 0); // 11 and 12 silent: the last value held
  assert.deepEqual(h.get("a", 13_000).map((p) => [p.t, p.lagSeconds]), [[10_000, 3], [11_000, 3], [12_000, 3], [13_000, 0]]);
  h.record("a", 12_500, 99, 99); // late: its bucket is closed
  assert.equal(h.get("a", 13_000).at(-1)!.lagSeconds, 0);
  h.record("a", 40_000, 5, 5); // a long gap never writes more than the ring holds
  const pts = h.get("a", 40_000);
  assert.equal(pts.length, 5);
  assert.deepEqual(pts.map((p) => p.t), [36_000, 37_000, 38_000, 39_000, 40_000]);
  assert.deepEqual(h.get("a", 43_000).map((p) => p.t), [39_000, 40_000], "points older than the window are not shown");
  h.forget("a");
  assert.deepEqual(h.get("a", 40_000), []);
  assert.equal(h.size, 0);
});

test("history remembers each finished failover once, newest first, bounded", () => {
  const h = new PairHistory({ maxFailovers: 2 });
  h.noteFailover("a", { target: "t", startedAt: "1" }); // unfinished: not recorded
  for (const s of ["1", "1", "2", "3"]) h.noteFailover("a", { target: "t", startedAt: s, finishedAt: s, recoverySeconds: Number(s) });
  assert.deepEqual(h.failoversOf("a").map((f) => f.startedAt), ["3", "2"]);
});

const pair = (o: Partial<ReplicationPair["status"]> = {}, activeSide?: string): ReplicationPair => ({
  metadata: { namespace: "prod", name: "db" },
  spec: { source: { agent: { address: "10.0.0.1:7702" } }, targets: [{ name: "a", agent: { address: "10.0.0.2:7702" } }, { name: "b", agent: { address: "10.0.0.3:7702" } }], replicationSet: { path: "/srv" }, ...(activeSide ? { activeSide } : {}) },
  status: o,
});

test("actions patch what kubectl understudy patches, and refuse up front what the plugin refuses", () => {
  const now = new Date(1_700_000_000_000);
  assert.deepEqual(actionPatch(pair({ knownGood: [{ target: "a", ok: false, failed: ["never verified"] }, { target: "b", ok: true }] }), "failover", {}, now).body, { spec: { activeSide: "b" } }, "default: the known-good target");
  assert.deepEqual(actionPatch(pair(), "failover", { target: "a" }, now).body, { spec: { activeSide: "a" } });
  assert.throws(() => actionPatch(pair({ knownGood: [{ target: "a", ok: false, failed: ["lag 40s is above 30s"] }] }), "failover", {}, now), (e: Error) => e instanceof ActionError && /no target of db is known good: a: lag 40s/.test(e.message));
  assert.throws(() => actionPatch(pair(), "cutover", { target: "zz" }, now), /has no target zz \(targets: a, b\)/);
  assert.deepEqual(actionPatch(pair(), "cutover", { target: "a" }, now).body, { spec: { activeSide: "a" } });
  assert.throws(() => actionPatch(pair(), "failback", {}, now), /served by its source already/);
  assert.deepEqual(actionPatch(pair({ activeSide: "a" }, "a"), "failback", {}, now).body, { spec: { activeSide: "source" } });
  const v = actionPatch(pair(), "verify", { repair: true }, now);
  assert.deepEqual(v.body, { metadata: { annotations: { "understudy.dev/verify": "1700000000000", "understudy.dev/verify-repair": "true" } } });
  assert.equal(v.request, "1700000000000");
  assert.deepEqual(actionPatch(pair(), "mirror", {}, now).body, { metadata: { annotations: { "understudy.dev/mirror": "1700000000000", "understudy.dev/mirror-mode": "checksum" } } }, "the mode is always written: an older one must not linger");
});

// ---- the server, with a fake source and authoriser

const view = (ns: string, name: string, lag = 0): PairView => ({ namespace: ns, name, labels: {}, generation: 1, spec: pair().spec, status: { phase: "Replicating", lagSeconds: lag, queuedBytes: 0 }, failovers: [] });

class FakeSource implements DashboardSource {
  readonly kind = "kubernetes" as const;
  views = [view("prod", "db"), view("secret", "vault")];
  evs: EventView[] = [{ uid: "1", namespace: "secret", kind: "ReplicationPair", name: "vault", type: "Warning", reason: "TargetDegraded", message: "x", count: 1, last: new Date().toISOString() }];
  private fn?: (c: Change) => void;
  acted: string[] = [];
  pairs() { return this.views; }
  pair(ns: string, name: string) { return this.views.find((v) => v.namespace === ns && v.name === name); }
  events() { return this.evs; }
  onChange(fn: (c: Change) => void) { this.fn = fn; }
  emit(c: Change) { this.fn?.(c); }
  async act(c: Caller, ns: string, name: string, a: Action): Promise<ActionReply> {
    this.acted.push(`${c.user} ${a} ${ns}/${name}`);
    return { ok: true, message: `${a} requested` };
  }
  async close() {}
}

/** alice reads prod and may act there; bob reads prod only; nobody reads "secret". */
class FakeAuth implements Authorizer {
  async authenticate(h: string | undefined): Promise<Caller> {
    const t = /^Bearer (\w+)$/.exec(h ?? "")?.[1];
    if (t !== "alice" && t !== "bob") throw new AuthError("sign in");
    return { user: t, groups: [], token: t };
  }
  async canRead(_c: Caller, ns: string) { return { pairs: ns === "prod", events: ns === "prod" }; }
  async can(c: Caller, ns: string, name: string, a: Action) { return c.user === "alice" ? { allowed: true } : { allowed: false, why: `${c.user} may not patch replicationpairs "${name}" in ${ns} (${a})` }; }
}

async function readLive(url: string, token: string, until: (text: string) => boolean): Promise<string> {
  const ac = new AbortController();
  const res = await fetch(url, { headers: { Authorization: `Bearer ${token}` }, signal: ac.signal });
  assert.equal(res.status, 200);
  const r = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  const deadline = Date.now() + 10_000;
  while (!until(text)) {
    if (Date.now() > deadline) throw new Error(`live stream never showed what was awaited; got:\n${text}`);
    const { value, done } = await r.read();
    if (done) break;
    text += value;
  }
  ac.abort();
  return text;
}

test("the server serves the page, and reads, actions and the live stream follow the caller's permissions", async () => {
  const source = new FakeSource();
  const srv = new DashboardServer({ address: "127.0.0.1:0", source, auth: new FakeAuth(), log: createLogger("test", "silent") });
  await srv.start();
  try {
    const u = srv.url;
    const page = await fetch(u);
    assert.equal(page.status, 200);
    assert.match(await page.text(), /<script type="module" src="\/app.js">/);
    assert.match(page.headers.get("content-security-policy") ?? "", /default-src 'self'/);
    const js = await fetch(`${u}app.js`);
    assert.equal(js.status, 200);
    assert.ok((await js.text()).length > 1000);

    const anon = await fetch(`${u}api/live`);
    assert.equal(anon.status, 401);
    assert.match(((await anon.json()) as ActionReply).message, /sign in/);

    // The snapshot holds only what bob may read, and says something is hidden.
    const snap = await readLive(`${u}api/live`, "bob", (t) => t.includes("\n\n"));
    assert.match(snap, /^event: snapshot\n/);
    const data = JSON.parse(snap.split("\n")[1]!.slice(6)) as { user: string; pairs: PairView[]; events: EventView[]; hidden?: string };
    assert.equal(data.user, "bob");
    assert.deepEqual(data.pairs.map((p) => p.name), ["db"]);
    assert.deepEqual(data.events, []);
    assert.match(data.hidden ?? "", /bob may not list ReplicationPairs in 1 namespace/);

    // A change arrives live; a change in a namespace bob may not read does not.
    const live = readLive(`${u}api/live`, "bob", (t) => t.includes('"lagSeconds":7'));
    await new Promise((r) => setTimeout(r, 200));
    source.emit({ pair: view("secret", "vault", 99) });
    source.emit({ pair: view("prod", "db", 7) });
    const text = await live;
    assert.doesNotMatch(text, /"lagSeconds":99/);

    // Permissions are asked up front, with the reason; the action is refused with it.
    const perms = (await (await fetch(`${u}api/pairs/prod/db/permissions`, { headers: { Authorization: "Bearer bob" } })).json()) as Record<string, { allowed: boolean; why?: string }>;
    assert.equal(perms.failover!.allowed, false);
    assert.match(perms.failover!.why!, /bob may not patch replicationpairs "db" in prod/);
    const refused = await fetch(`${u}api/pairs/prod/db/actions/failover`, { method: "POST", headers: { Authorization: "Bearer bob" }, body: "{}" });
    assert.equal(refused.status, 403);
    assert.match(((await refused.json()) as ActionReply).message, /bob may not patch/);
    const ok = await fetch(`${u}api/pairs/prod/db/actions/verify`, { method: "POST", headers: { Authorization: "Bearer alice" }, body: '{"repair":true}' });
    assert.equal(ok.status, 202);
    const hidden = await fetch(`${u}api/pairs/secret/vault/actions/verify`, { method: "POST", headers: { Authorization: "Bearer alice" }, body: "{}" });
    assert.equal(hidden.status, 404, "a pair the caller may not read does not exist for them");
    const garbage = await fetch(`${u}api/pairs/prod/db/actions/verify`, { method: "POST", headers: { Authorization: "Bearer alice" }, body: "{not json" });
    assert.equal(garbage.status, 400);
    assert.deepEqual(source.acted, ["alice verify prod/db"]);
  } finally {
    await srv.stop();
  }
});

test("the dashboard refuses plain HTTP on a non-loopback address", () => {
  assert.throws(() => new DashboardServer({ address: "0.0.0.0:8443", source: new FakeSource(), auth: new FakeAuth(), log: createLogger("test", "silent") }), /needs TLS/);
});
