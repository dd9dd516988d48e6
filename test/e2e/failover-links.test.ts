// Failover decisions under network faults, manual approval, and a planned
// migration cutover under a live write workload. Agents run on hosts of their
// own (network namespaces), so the source's link can be cut like a cable.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { access, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { waitFor } from "./harness.ts";
import { condition } from "./k8s-harness.ts";
import { FailoverWorld } from "./failover-fixture.ts";
import { fetchStatus } from "../../agent/control-client.ts";

const exists = (p: string) => access(p).then(() => true, () => false);

describe("network faults and manual approval", { timeout: 900_000 }, () => {
  let w: FailoverWorld;
  let srcDir: string;
  const image = () => w.image("a", "src", "web");

  before(async () => {
    w = await FailoverWorld.create("edge", [{ name: "src" }, { name: "a", target: true }]);
    srcDir = await w.sourceTree("www", 20);
    await w.policy("web-ha", { selector: { matchLabels: { app: "web" } }, approval: "automatic", knownGood: { requireVerify: false, maxLag: "30s" } });
    await w.pair("web", { source: "src", targets: ["a"], path: srcDir, labels: { app: "web" } });
    await w.waitPair("web", "Ready and known good", (p) => condition(p, "Ready").status === "True" && !!p.status?.knownGood?.[0]?.ok);
  });
  after(async () => w?.dispose());

  test("the operator loses the source but the target still hears it: not a dead server, no failover", async () => {
    // Only the operator's side is cut: the source drops what it would send to the operator's address.
    const r = await w.hosts.src!.run("ip", ["route", "add", "blackhole", `${w.lab.gateway}/32`]);
    assert.equal(r.code, 0, r.stderr);
    try {
      const p = await w.waitPair("web", "operator misses the source", (x) => (x.status?.health?.missedBeats ?? 0) >= 5, 30_000);
      assert.equal(p.status?.health?.sourceReachable, false);
      assert.equal(p.status?.health?.sourceDown, false, "the target still hears the source");
      assert.equal(p.status?.activeSide ?? "source", "source");
      assert.equal(condition(p, "Degraded").reason, "SourceUnreachable");
      // Replication itself goes on.
      await writeFile(path.join(srcDir, "during-partition.dat"), "still replicated\n");
      await w.waitTreesEqual(srcDir, image(), "replication during the partition");
      assert.equal((await w.get("web"))?.spec.activeSide ?? "source", "source");
    } finally {
      await w.hosts.src!.run("ip", ["route", "del", "blackhole", `${w.lab.gateway}/32`]);
    }
    await w.waitPair("web", "source reachable again", (x) => x.status?.health?.sourceReachable === true && condition(x, "Ready").status === "True");
  });

  test("the source's link cut: failover; when the link returns the still-running source is fenced and brought in line", async () => {
    for (let i = 0; i < 10; i++) await writeFile(path.join(srcDir, `before-cut-${i}.dat`), `acked ${i}\n`);
    await w.waitTreesEqual(srcDir, image(), "acknowledged before the cut");
    const cutAt = Date.now();
    await w.hosts.src!.cutLink();
    // The application on the cut-off source goes on writing: split brain, which fencing must contain.
    await writeFile(path.join(srcDir, "stale-split-brain.dat"), "written on the cut-off source\n");
    const p = await w.waitPair("web", "failed over to a", (x) => x.status?.activeSide === "a" && x.status.phase === "FailedOver");
    process.stderr.write(`# recovery after link cut: ${p.status?.failover?.recoverySeconds}s by the operator's clock, ${Date.now() - cutAt} ms observed by the test\n`);
    assert.ok((p.status?.failover?.recoverySeconds ?? 99) < 10, `recovery ${p.status?.failover?.recoverySeconds}s`);
    assert.equal(p.status?.failover?.reason, "source down");
    await writeFile(path.join(image(), "on-a.dat"), "written on a after failover\n");
    await w.hosts.src!.restoreLink();
    await w.waitPair("web", "source fenced and up to date", (x) => x.status?.reverse?.mirrored === true);
    await w.waitTreesEqual(image(), srcDir, "the source brought in line with a");
    assert.equal(await exists(path.join(image(), "stale-split-brain.dat")), false, "the fenced source's stale write never reached a");
    assert.equal(await readFile(path.join(srcDir, "on-a.dat"), "utf8"), "written on a after failover\n");
    assert.match(await w.agents.a!.log(), /refused a fenced source|promoted to primary/);
  });

  test("manual approval: a dead source makes the pair wait for a person, who fails over with the plugin", async () => {
    const back = await w.plugin(["failback", "web", "--timeout", "90"]);
    assert.equal(back.code, 0, back.out);
    await w.waitPair("web", "Ready again on the source", (x) => x.status?.activeSide === "source" && condition(x, "Ready").status === "True" && !!x.status.knownGood?.[0]?.ok, 90_000);
    await w.policy("web-ha", { selector: { matchLabels: { app: "web" } }, approval: "manual", knownGood: { requireVerify: false, maxLag: "30s" } });
    await new Promise((r) => setTimeout(r, 1000));
    await w.agents.src!.kill9();
    const p = await w.waitPair("web", "failover pending approval", (x) => condition(x, "FailoverPending").status === "True");
    assert.match(condition(p, "FailoverPending").message ?? "", /kubectl understudy failover web/);
    await new Promise((r) => setTimeout(r, 3000));
    assert.equal((await w.get("web"))?.status?.activeSide, "source", "nothing happens without approval");
    const r = await w.plugin(["failover", "web", "--timeout", "60"]);
    assert.equal(r.code, 0, r.out);
    assert.equal((await w.get("web"))?.status?.activeSide, "a");
    await w.waitTreesEqual(srcDir, image(), "a holds everything");
  });
});

describe("migration cutover", { timeout: 900_000 }, () => {
  let w: FailoverWorld;
  let srcDir: string;
  const image = () => w.image("new", "old", "app");

  before(async () => {
    w = await FailoverWorld.create("mig", [{ name: "old" }, { name: "new", target: true }]);
    srcDir = await w.sourceTree("app", 10);
  });
  after(async () => w?.dispose());

  test("cutover under a live write workload loses no write, and the old server stays a fallback", async () => {
    const flag = path.join(w.dir, "stop-app");
    // The application stops when asked and says so; quiesce waits for that.
    await w.policy("move", {
      selector: { matchLabels: { app: "mig" } },
      approval: "manual",
      knownGood: { requireVerify: false, maxLag: "30s" },
      quiesce: [{ name: "stop-app", command: ["sh", "-c", `touch ${flag}; while [ ! -f ${flag}.ack ]; do sleep 0.05; done`], timeout: "30s" }],
    });
    await w.pair("app", { source: "old", targets: ["new"], path: srcDir, labels: { app: "mig" } });
    await w.waitPair("app", "Ready", (p) => condition(p, "Ready").status === "True" && !!p.status?.knownGood?.[0]?.ok);
    let written = 0;
    const workload = (async () => {
      while (!(await exists(flag))) {
        await writeFile(path.join(srcDir, `txn-${written}.dat`), `transaction ${written}\n`.repeat(1 + (written % 50)));
        written++;
        await new Promise((r) => setTimeout(r, 5));
      }
      await writeFile(`${flag}.ack`, `${written}\n`);
    })();
    await new Promise((r) => setTimeout(r, 1500));
    const r = await w.plugin(["cutover", "app", "--to", "new", "--timeout", "90"]);
    await workload;
    assert.equal(r.code, 0, r.out);
    const p = await w.get("app");
    assert.equal(p?.status?.activeSide, "new");
    assert.equal(p?.status?.failover?.reason, "cutover");
    assert.ok(written > 50, `the workload wrote ${written} files`);
    assert.deepEqual(await w.treesDiffer(srcDir, image()), [], "every write made before the application stopped is on the new server");
    // The old server is kept up to date from the new one, as a fallback.
    await writeFile(path.join(image(), "after-cutover.dat"), "on the new server\n");
    await w.waitPair("app", "old server kept as a fallback", (x) => x.status?.reverse?.mirrored === true);
    await w.waitTreesEqual(image(), srcDir, "fallback up to date");
    const st = await fetchStatus(w.agents.old!.address, w.tls);
    assert.equal(st.sets.find((s) => s.name === "mig.app"), undefined);
    await waitFor("events", async () => /Quiesced|ActionDone/.test(await w.events("app")), 60_000, 250);
  });
});
