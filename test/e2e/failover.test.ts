// Failover and failback end to end: agents on hosts of their own (network
// namespaces), a real API server with the chart's RBAC, and a FailoverPolicy.
// The source is killed (kill -9); the operator must fail over only to a target
// whose copy is known good, move the Service's EndpointSlice, fence the old
// source when it returns, bring it up to date from the target, and fail back.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFile, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { waitFor } from "./harness.ts";
import { condition, kubectlOk } from "./k8s-harness.ts";
import { FailoverWorld } from "./failover-fixture.ts";
import { fetchStatus } from "../../agent/control-client.ts";

const NS = "shop";

describe("failover and failback", { timeout: 900_000 }, () => {
  let w: FailoverWorld;
  let srcDir: string;
  const image = (t: "a" | "b") => w.image(t, "src", "db");

  before(async () => {
    w = await FailoverWorld.create(NS, [{ name: "src" }, { name: "a", target: true }, { name: "b", target: true }]);
    srcDir = await w.sourceTree("data", 30);
  });
  after(async () => w?.dispose());

  test("a pair under an automatic FailoverPolicy shows its known-good gate at all times", async () => {
    await w.apply({ apiVersion: "v1", kind: "Service", metadata: { name: "db", namespace: NS }, spec: { ports: [{ port: 5432 }] } });
    await w.policy("db-ha", {
      selector: { matchLabels: { tier: "db" } },
      approval: "automatic",
      knownGood: { requireVerify: true, maxVerifyAge: "1h", maxLag: "30s" },
      actions: [{ name: "start-db", command: ["sh", "-c", `echo started > ${path.join(w.dir, "action-ran")}`] }],
      serviceIdentity: { service: { name: "db", port: 5432 } },
    });
    await w.pair("db", { source: "src", targets: ["a", "b"], path: srcDir, labels: { tier: "db" } });
    await w.waitPair("db", "Ready", (p) => condition(p, "Ready").status === "True");
    const p = await w.waitPair("db", "gate status", (x) => (x.status?.knownGood?.length ?? 0) === 2);
    assert.equal(p.status?.health?.policy, "db-ha");
    // The policy requires a verify (the default): the operator runs one itself once the copies are complete,
    // and until it has passed the status says that failover is not possible yet, and why.
    const ok = await w.waitPair("db", "both targets known good without anyone asking for a verify", (x) => !!x.status?.knownGood?.every((k) => k.ok));
    assert.equal(ok.status?.lastHandledVerifyRequest, undefined, "no verify was requested");
    assert.ok(ok.status?.targets?.every((t) => t.lastVerify?.result === "Passed"));
    assert.match(await w.events("db"), /VerifyStarted/);
    assert.equal(condition(ok, "FailoverReady").status, "True");
    assert.match(condition(ok, "FailoverReady").message ?? "", /failover possible to a, b: automatic when the source is down/);
    if (p.status?.knownGood?.every((k) => !k.ok)) assert.match(condition(p, "FailoverReady").message ?? "", /failover not possible yet/);
    const v = await w.plugin(["verify", "db"]);
    assert.equal(v.code, 0, v.out);
    await waitFor("policy status", async () => JSON.parse(await kubectlOk(w.cluster, ["get", "fop", "db-ha", "-n", NS, "-o", "json"])).status?.matchedPairs === 1, 30_000, 250);
    assert.match((await w.plugin(["status", "db"])).out, /known good: a yes/);
  });

  test("source killed (kill -9): automatic failover to the known-good target only; identity moves; every acknowledged write is there", async () => {
    // b's copy goes bad and its verify says so: b is no longer known good.
    await writeFile(path.join(image("b"), "row-3.dat"), "tampered on b\n");
    await kubectlOk(w.cluster, ["annotate", "rp", "db", "-n", NS, "understudy.dev/verify=b-check", "--overwrite"]);
    await w.waitPair("db", "b refused by the gate", (x) => x.status?.knownGood?.find((k) => k.target === "b")?.ok === false && x.status.knownGood.find((k) => k.target === "a")?.ok === true);
    assert.match((await w.get("db"))!.status!.knownGood!.find((k) => k.target === "b")!.failed!.join(" "), /last verify failed/);
    // Writes the source acknowledged, then the source dies.
    for (let i = 0; i < 20; i++) await writeFile(path.join(srcDir, `order-${i}.dat`), `order ${i}\n`);
    await waitFor("source acknowledged by a", async () => {
      const s = (await fetchStatus(w.agents.src!.address, w.tls)).sets.find((x) => x.name === `${NS}.db`);
      const t = s?.targets.find((x) => x.address === w.agents.a!.address);
      return !!s && !!t && s.lastSeq > 0 && t.lastAckedSeq === s.lastSeq && (await w.treesDiffer(srcDir, image("a"))).length === 0;
    }, 30_000, 100);
    const killedAt = Date.now();
    await w.agents.src!.kill9();
    const p = await w.waitPair("db", "failed over to a", (x) => x.status?.activeSide === "a" && x.status.phase === "FailedOver");
    const tookMs = Date.now() - killedAt;
    assert.equal(p.spec.activeSide, "a", "the decision is declared in spec.activeSide");
    assert.equal(p.status?.epoch, 1);
    assert.ok((p.status?.failover?.recoverySeconds ?? 99) < 10, `recovery ${p.status?.failover?.recoverySeconds}s (observed ${tookMs} ms)`);
    assert.equal(condition(p, "FailedOver").status, "True");
    // The status describes the new direction: a serves with what it was promoted with (the message says the same
    // number), b waits, nothing from the stopped forward replication (acks, lag, queue, verify) looks current.
    const applied = p.status?.failover?.appliedSeq;
    assert.ok(applied && applied > 0);
    assert.match(condition(p, "FailedOver").message ?? "", new RegExp(`every change up to ${applied}\\b`));
    assert.match(condition(p, "FailedOver").message ?? "", new RegExp(`recovered ${p.status?.failover?.recoverySeconds}s after the source was last seen`));
    assert.deepEqual(p.status?.targets?.map((t) => [t.name, t.state, t.appliedSeq ?? null, t.lastAckedSeq ?? null]), [["a", "serving", applied, null], ["b", "waiting", null, null]]);
    assert.equal(p.status?.lag, undefined);
    assert.equal(p.status?.queued, undefined);
    assert.equal(p.status?.lastVerify, undefined);
    assert.equal(condition(p, "Mirrored").status, "False");
    assert.ok(p.status?.failover?.sourceDownSince && Date.parse(p.status.failover.sourceDownSince) <= killedAt + 1000, `recovery counted from the last check the source answered (${p.status?.failover?.sourceDownSince}), before the kill at ${new Date(killedAt).toISOString()}`);
    // Every acknowledged write is on a (the source directory is exactly what was acknowledged).
    assert.deepEqual(await w.treesDiffer(srcDir, image("a")), []);
    const es = await w.endpointSlice("db");
    assert.deepEqual(es.endpoints[0]?.addresses, [w.hosts.a!.ip]);
    assert.equal(es.ports[0]?.port, 5432);
    assert.equal((await readFile(path.join(w.dir, "action-ran"), "utf8")).trim(), "started");
    const img = (await fetchStatus(w.agents.a!.address, w.tls)).images.find((i) => i.set === `${NS}.db`);
    assert.equal(img?.promoted, true);
    assert.equal(img?.epoch, 1);
    const ev = await w.events("db");
    assert.match(ev, /SourceDown/);
    assert.match(ev, /IdentityMoved/);
    process.stderr.write(`# recovery after kill -9: ${p.status?.failover?.recoverySeconds}s by the operator's clock, ${tookMs} ms observed by the test\n`);
  });

  test("the old source returns: it is fenced, and is brought up to date from the new primary", async () => {
    // The application now writes on a.
    await writeFile(path.join(image("a"), "order-during-outage.dat"), "written on a while the source was down\n");
    await writeFile(path.join(image("a"), "row-5.dat"), "changed on a\n");
    await w.agents.src!.start(w.tls);
    const p = await w.waitPair("db", "source brought up to date", (x) => x.status?.reverse?.mirrored === true);
    assert.equal(p.status?.activeSide, "a");
    // The old source's health as it is now, and Degraded agrees with it.
    assert.equal(p.status?.health?.sourceReachable, true);
    assert.equal(p.status?.health?.sourceDown, false);
    assert.equal(condition(p, "Degraded").status, "False");
    assert.equal(condition(p, "Replicating").reason, "ReverseReplicating");
    assert.equal(condition(p, "Mirrored").reason, "ReverseMirrorComplete");
    const st = await fetchStatus(w.agents.src!.address, w.tls);
    assert.equal(st.sets.find((s) => s.name === `${NS}.db`), undefined, "the old source no longer replicates forward");
    await w.waitTreesEqual(image("a"), srcDir, "source equal to a");
    assert.equal(await readFile(path.join(image("a"), "order-during-outage.dat"), "utf8"), "written on a while the source was down\n");
    await writeFile(path.join(image("a"), "more.dat"), "more\n");
    await w.waitTreesEqual(image("a"), srcDir, "live reverse replication");
  });

  test("failback: the source serves again, the identity moves back, and both targets are replicas again", async () => {
    const failbackAt = Date.now();
    const r = await w.plugin(["failback", "db", "--timeout", "90"]);
    assert.equal(r.code, 0, r.out);
    const p = await w.waitPair("db", "source active and Ready", (x) => x.status?.activeSide === "source" && condition(x, "Ready").status === "True", 90_000);
    assert.equal(p.status?.epoch, 2);
    assert.deepEqual((await w.endpointSlice("db")).endpoints[0]?.addresses, [w.hosts.src!.ip]);
    await writeFile(path.join(srcDir, "after-failback.dat"), "back home\n");
    await w.waitTreesEqual(srcDir, image("a"), "a is a replica again");
    await w.waitTreesEqual(srcDir, image("b"), "b (whose copy was bad) is repaired by its mirror");
    const img = (await fetchStatus(w.agents.a!.address, w.tls)).images.find((i) => i.set === `${NS}.db`);
    assert.equal(img?.promoted, false);
    assert.equal(img?.epoch, 2);
    await stat(path.join(srcDir, "order-during-outage.dat"));
    // Known good again only on a verify of the new direction (the verify from before the failover does not count).
    const kg = await w.waitPair("db", "known good after failback", (x) => !!x.status?.knownGood?.every((k) => k.ok), 90_000);
    for (const t of kg.status?.targets ?? []) assert.ok(t.lastVerify?.finishedAt && Date.parse(t.lastVerify.finishedAt) >= failbackAt - 1000, `${t.name}'s verify ${t.lastVerify?.finishedAt} is from after the failback`);
  });
});
