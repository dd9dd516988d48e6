// The netns lab: agents on hosts of their own (network namespaces on a
// bridge), replication between them over mTLS, and a cut link that looks like
// a dead server from the root namespace and stops replication until restored.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdir, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { AgentCallError, fetchStatus } from "../../agent/control-client.ts";
import { createCA, issueCert } from "../../common/tls.ts";
import type { TlsConfig } from "../../common/config.ts";
import { compareTrees, snapshotTree, tmpDir, waitFor } from "./harness.ts";
import { createLab, NetnsAgentProc, type Host } from "./netns.ts";

const PORT = 7702; // every host has its own network namespace: the same port on all of them

// Needs root (network namespaces), as CI runs.
test("netns lab: replication between hosts, a cut link is a dead server until restored", async (t) => {
  const t0 = Date.now();
  const lab = await createLab();
  const a = await lab.addHost("a");
  const b = await lab.addHost("b");
  const setupMs = Date.now() - t0;
  t.diagnostic(`lab ${lab.id} (${lab.subnet}) with 2 hosts set up in ${setupMs} ms`);
  const dir = await tmpDir("understudy-netns-");
  const agents: NetnsAgentProc[] = [];
  let disposed = false;
  t.after(async () => {
    if (!disposed) {
      await Promise.all(agents.map((x) => x.stop()));
      await lab.dispose();
    }
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });

  assert.match(lab.bridge, /^us-br-[0-9a-f]{4}$/);
  assert.ok(lab.bridge.length <= 15);
  assert.match(lab.subnet, /^10\.\d+\.\d+\.0\/24$/);
  assert.equal(a.ns, `${lab.prefix}-a`);
  assert.notEqual(a.ip, b.ip);
  await lab.verifyConnectivity();
  // processes really run in the host: its only interfaces are lo and eth0 with the host's address
  const addrs = JSON.parse((await a.run("ip", ["-j", "-4", "addr"])).stdout) as { ifname: string; addr_info: { local: string }[] }[];
  assert.deepEqual(addrs.map((l) => [l.ifname, l.addr_info.map((x) => x.local)]), [["lo", ["127.0.0.1"]], ["eth0", [a.ip]]]);

  // mTLS: insecure is refused off loopback
  await createCA(path.join(dir, "ca"));
  const cert = async (name: string, hosts: string[]): Promise<TlsConfig> => {
    const c = await issueCert({ caDir: path.join(dir, "ca"), name, hosts, outDir: path.join(dir, "certs", name) });
    return { ca: c.caPath, cert: c.certPath, key: c.keyPath };
  };
  const srcTls = await cert("src-agent", [a.ip]);
  const dstTls = await cert("dst-agent", [b.ip]);
  const testerTls = await cert("tester", ["127.0.0.1"]);

  await mkdir(path.join(dir, "src"));
  const tcfg = { name: "dst-agent", listen: `${b.ip}:${PORT}`, dataDir: "state-dst", tls: dstTls, target: { root: "dst" } };
  const scfg = { name: "src-agent", listen: `${a.ip}:${PORT}`, dataDir: "state-src", tls: srcTls, source: { sets: [{ name: "data", path: "src", targets: [`${b.ip}:${PORT}`] }] } };
  await writeFile(path.join(dir, "target.yaml"), YAML.stringify(tcfg));
  await writeFile(path.join(dir, "source.yaml"), YAML.stringify(scfg));
  const target = new NetnsAgentProc(b, "dst-agent", path.join(dir, "target.yaml"), PORT, path.join(dir, "target.log"), testerTls);
  const source = new NetnsAgentProc(a, "src-agent", path.join(dir, "source.yaml"), PORT, path.join(dir, "source.log"), testerTls);
  agents.push(target, source);
  await target.start();
  await source.start();

  const src = path.join(dir, "src");
  const image = path.join(dir, "dst", "src-agent", "data");
  const waitEqual = async (what: string) => {
    let diff: string[] = [];
    try {
      await waitFor(what, async () => {
        diff = compareTrees(await snapshotTree(src), await snapshotTree(image));
        return diff.length === 0;
      }, 60_000, 250);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n  ${diff.slice(0, 20).join("\n  ")}\nsource log:\n${(await source.log()).split("\n").slice(-15).join("\n")}\ntarget log:\n${(await target.log()).split("\n").slice(-15).join("\n")}`);
    }
  };

  // replication from host a to host b
  await mkdir(path.join(src, "d"));
  await writeFile(path.join(src, "one.txt"), "one\n");
  await writeFile(path.join(src, "d", "two.bin"), Buffer.alloc(300_000, 7));
  await waitEqual("the image on host b to equal the source on host a");

  // the root namespace reaches both agents; the source reports its target at b's address
  const [sa, sb] = [await source.status(), await target.status()];
  assert.equal(sa.sets[0]!.targets[0]!.address, `${b.ip}:${PORT}`);
  assert.ok(sb, "target answers");

  // cut a's link: from the root namespace, a is a dead server (a call times out, nothing refuses)...
  await a.cutLink();
  assert.equal(a.linkIsUp, false);
  const t1 = Date.now();
  const err = await fetchStatus(source.address, testerTls, 2000).then(
    () => assert.fail("a status call reached a host whose link is cut"),
    (e: unknown) => e,
  );
  assert.ok(err instanceof AgentCallError, String(err));
  assert.equal(err.code, 4 /* DEADLINE_EXCEEDED */, err.message);
  assert.ok(Date.now() - t1 >= 1900, "the call waited for its deadline");
  // ...while its process runs on
  assert.ok(source.alive, "the source agent still runs");
  process.kill(source.pid, 0);
  // b is not affected
  await target.status();
  // what is written on a meanwhile does not reach b
  await writeFile(path.join(src, "during-cut.txt"), "written while a's link was cut\n");
  await writeFile(path.join(src, "one.txt"), "one, changed while cut\n");
  await new Promise((r) => setTimeout(r, 4000));
  const img = await snapshotTree(image);
  assert.equal(img.has("during-cut.txt"), false, "a file written during the cut reached b");
  assert.equal(img.get("one.txt")!.size, "one\n".length, "a change made during the cut reached b");
  assert.ok(source.alive, "the source agent still runs");

  // restored: it all arrives
  await a.restoreLink();
  const t2 = Date.now();
  await waitEqual("the changes made during the cut to reach b after the link is restored");
  t.diagnostic(`caught up ${Date.now() - t2} ms after the link was restored`);
  await source.status();

  // dispose kills the agents (still running) and removes everything
  const procs = agents.map((x) => x.proc!);
  await lab.dispose();
  await lab.dispose(); // idempotent
  disposed = true;
  assert.ok(procs.every((p) => p.exitCode !== null || p.signalCode !== null), "dispose killed the hosts' processes");
  const leftovers = (cmd: string[]) =>
    execFileSync("ip", cmd, { encoding: "utf8" })
      .split("\n")
      .filter((l) => l.includes(lab.prefix) || l.includes(lab.bridge));
  assert.deepEqual(leftovers(["netns", "list"]), []);
  assert.deepEqual(leftovers(["-br", "link"]), []);
  await assert.rejects(a.run("true"), /disposed/);
  assert.throws(() => (b as Host).exec("true"), /disposed/);
});
