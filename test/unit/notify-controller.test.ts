// The NotificationPolicy controller with its Kubernetes parts replaced by
// memory (policy, pairs, Secrets, status writes) and real HTTP receivers:
// retries with backoff shown in status, a hanging channel that blocks no other
// channel, and a restart from the written status that sends nothing again.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer, type Server } from "node:http";
import { NotificationController, type NotificationDeps } from "../../operator/controllers/notifications.ts";
import { DeliveryError } from "../../operator/notify/channel.ts";
import { createLogger } from "../../common/log.ts";
import type { NotificationPolicy, NotificationPolicyStatus, ReplicationPair } from "../../operator/api/v1alpha1/index.ts";

async function receiver(behave: (n: number) => number | "hang"): Promise<{ url: string; got: { kind: string; state: string }[]; stop(): Promise<void> }> {
  const got: { kind: string; state: string }[] = [];
  let n = 0;
  const s: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (d: Buffer) => chunks.push(d));
    req.on("end", () => {
      const b = behave(n++);
      if (b === "hang") return;
      if (b === 200) got.push(JSON.parse(Buffer.concat(chunks).toString()) as { kind: string; state: string });
      res.writeHead(b).end();
    });
  });
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", () => r()));
  return { url: `http://127.0.0.1:${(s.address() as { port: number }).port}/x`, got, stop: () => new Promise<void>((r) => (s.closeAllConnections(), s.close(() => r()))) };
}

async function until(what: string, f: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!f()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function world(channels: NotificationPolicy["spec"]["channels"], status?: NotificationPolicyStatus) {
  const policy: NotificationPolicy = { metadata: { namespace: "shop", name: "oncall", uid: "pol-1", generation: 1, creationTimestamp: new Date("2026-01-01T00:00:00Z") }, spec: { selector: { matchLabels: { tier: "db" } }, channels, retry: { maxAttempts: 5, maxBackoff: "200ms" }, thresholds: { gracePeriod: "0s" } }, ...(status ? { status } : {}) };
  const pair = { metadata: { namespace: "shop", name: "db", labels: { tier: "db" } }, spec: { source: { agent: { address: "10.0.0.5:7702" } }, targets: [{ name: "a", agent: { address: "10.0.0.6:7702" } }], replicationSet: { path: "/srv" } }, status: { conditions: [] } } as unknown as ReplicationPair;
  const writes: NotificationPolicyStatus[] = [];
  const deps: NotificationDeps = {
    policy: () => policy,
    policies: () => [policy],
    pairs: () => [pair],
    secrets: { read: async (_ns, name) => (name === "hook" ? { url: "http://127.0.0.1:1/" } : Promise.reject(new DeliveryError("SecretNotFound", `Secret ${name} not found in namespace shop`))) },
    writeStatus: async (_p, s) => {
      writes.push(s);
      policy.status = s;
    },
    log: createLogger("test", "silent"),
    tickMs: 50,
  };
  return { policy, pair, writes, deps, degrade: () => ((pair.status as { conditions: unknown[] }).conditions = [{ type: "Degraded", status: "True", reason: "TargetDegraded", message: "b cannot take changes", lastTransitionTime: "2026-12-08T01:00:00Z" }]), heal: () => ((pair.status as { conditions: unknown[] }).conditions = [{ type: "Degraded", status: "False", reason: "AllHealthy", message: "ok", lastTransitionTime: "2026-12-08T01:01:00Z" }]) };
}

test("failed deliveries are retried with backoff and shown in status; a hanging channel blocks no other; a missing Secret is a clear condition", async () => {
  const flaky = await receiver((n) => (n < 2 ? 500 : 200));
  const hang = await receiver(() => "hang");
  const w = world([{ name: "flaky", webhook: { url: flaky.url } }, { name: "stuck", timeout: "300ms", webhook: { url: hang.url } }, { name: "nosecret", webhook: { urlSecretRef: { name: "gone" } } }]);
  const ctl = new NotificationController(w.deps);
  try {
    ctl.start();
    w.degrade();
    ctl.touchAll();
    await until("flaky got the event after two failures", () => flaky.got.length === 1);
    assert.equal(flaky.got[0]!.kind, "PairDegraded");
    await until("status written with the retries", () => w.policy.status?.channels?.find((c) => c.name === "flaky")?.lastSentEvent === "PairDegraded/firing");
    const st = w.policy.status!;
    const flakyCh = st.channels!.find((c) => c.name === "flaky")!;
    assert.match(flakyCh.lastError ?? "", /HTTP 500/);
    assert.equal(flakyCh.consecutiveFailures, 0);
    await until("stuck channel times out and says so", () => /no answer within 300 ms/.test(w.policy.status?.channels?.find((c) => c.name === "stuck")?.lastError ?? ""));
    const cond = (t: string) => w.policy.status!.conditions!.find((c) => c.type === t)!;
    assert.equal(cond("ConfigValid").reason, "SecretNotFound");
    assert.match(cond("ConfigValid").message, /channel nosecret \(webhook\): Secret gone not found/);
    assert.match(cond("Delivering").message, /channel stuck \(webhook\): POST http:\/\/127\.0\.0\.1:\d+\/…: no answer within 300 ms/);
    // The resolved message goes out on the healthy channel while the stuck one is still retrying.
    w.heal();
    ctl.touchAll();
    await until("resolved delivered", () => flaky.got.length === 2);
    assert.deepEqual(flaky.got.map((g) => `${g.kind}/${g.state}`), ["PairDegraded/firing", "PairDegraded/resolved"]);
    await until("stuck channel gives up after maxAttempts", () => (w.policy.status?.channels?.find((c) => c.name === "stuck")?.dropped ?? 0) >= 1, 20_000);
    assert.match(w.policy.status!.channels!.find((c) => c.name === "stuck")!.lastError!, /gave up after 5 attempts/);
  } finally {
    ctl.stop();
    await flaky.stop();
    await hang.stop();
  }
});

test("a new leader starts from the written status: nothing is sent again, and what was waiting is sent", async () => {
  const r = await receiver(() => 200);
  const w = world([{ name: "hook", webhook: { url: r.url } }]);
  const first = new NotificationController(w.deps);
  first.start();
  w.degrade();
  first.touchAll();
  await until("firing delivered and written", () => r.got.length === 1 && w.policy.status?.channels?.[0]?.pending === 0);
  first.stop();
  // The pair heals while no operator leads; the new leader has only the status.
  w.heal();
  const second = new NotificationController({ ...w.deps });
  second.start();
  await until("resolved delivered by the new leader", () => r.got.length === 2);
  await new Promise((res) => setTimeout(res, 300));
  assert.deepEqual(r.got.map((g) => `${g.kind}/${g.state}`), ["PairDegraded/firing", "PairDegraded/resolved"]);
  second.stop();
  await r.stop();
});
