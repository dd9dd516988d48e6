// A ReplicationPair whose source and target are ssh endpoints: the operator
// (chart RBAC, provisioning on) installs the agent bundle on two lab hosts
// through a real OpenSSH sshd each, with certificates from its CA, and the
// pair replicates a whole-server tree between them (P2V/V2V in small: every
// file type, xattrs, holes; /proc, /dev, /run … left out). A host key that does not match
// the Secret's known_hosts is refused with a clear condition; an agent
// upgraded on one side only stops the pair (VersionMismatch) until the other
// side runs the same version.
import assert from "node:assert/strict";
import { link, mkdir, open, readFile, readdir, rm, symlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { pino } from "pino";
import { fetchStatus } from "../../agent/control-client.ts";
import type { TlsConfig } from "../../common/config.ts";
import type { EndpointStatus, ReplicationPair } from "../../operator/api/v1alpha1/index.ts";
import { installAgent, type AgentFile } from "../../operator/ssh/installer.ts";
import { sshAgentName } from "../../operator/ssh/provisioner.ts";
import { buildBundle, repackBundle, type BuiltBundle } from "../env/bundle.ts";
import { makeKeyPair, startSshd, type KeyPair, type Sshd } from "../env/sshd.ts";
import { FailoverWorld } from "./failover-fixture.ts";
import { setAttribute } from "@napi-rs/xattr";
import { makeSpecial } from "../../agent/fs/special.ts";
import { compareTrees, snapshotTree, tmpDir, waitFor } from "./harness.ts";
import { condition, kubectlOk } from "./k8s-harness.ts";
import type { Host } from "./netns.ts";

const NS = "servers";
let w: FailoverWorld;
let bundle: BuiltBundle;
let client: KeyPair;
let tls: TlsConfig;
const hosts: Record<string, { host: Host; sshd: Sshd; root: string }> = {};

function endpoint(p: ReplicationPair | undefined, name: string): EndpointStatus | undefined {
  return p?.status?.endpoints?.find((e) => e.name === name);
}

/** Where a host's agent lives (hosts share the test's file system, so each has its own tree). */
function layout(name: string) {
  const root = hosts[name]!.root;
  return { prefix: `${root}/opt/understudy`, etcDir: `${root}/etc/understudy`, dataDir: `${root}/var/lib/understudy`, targetRoot: `${root}/replicas`, start: "process" };
}

function sshEndpoint(name: string, secretName = `ssh-${name}`): Record<string, unknown> {
  return { host: hosts[name]!.host.ip, port: 22, user: "root", secretName, ...layout(name) };
}

async function secret(name: string, knownHosts: string): Promise<void> {
  await kubectlOk(w.cluster, ["create", "secret", "generic", name, "-n", NS, `--from-literal=ssh-privatekey=${client.privateKey}`, `--from-literal=known_hosts=${knownHosts}`]);
}

/** Directories a whole-server set keeps empty (their contents are the running system's, not the server's). */
const EMPTIED = ["proc", "sys", "dev", "run", "tmp"];

/**
 * A server's root: files, hard links across directories, symlinks, a sparse
 * file, odd modes, a FIFO, a device node, a socket, extended attributes, and
 * /proc, /sys, /dev, /run, /tmp with contents a whole-server set leaves out.
 */
async function serverTree(dir: string): Promise<void> {
  for (const d of EMPTIED) await mkdir(path.join(dir, d), { recursive: true });
  await writeFile(path.join(dir, "proc/cpuinfo"), "not a server file\n");
  await writeFile(path.join(dir, "tmp/scratch"), "scratch\n");
  await makeSpecial(path.join(dir, "dev/null"), "c", 1, 3);
  await mkdir(path.join(dir, "var/spool"), { recursive: true });
  await mkdir(path.join(dir, "lib/udev/devices"), { recursive: true });
  await makeSpecial(path.join(dir, "var/spool/queue.fifo"), "p", 0, 0);
  await makeSpecial(path.join(dir, "lib/udev/devices/null"), "c", 1, 3);
  await makeSpecial(path.join(dir, "var/app.sock"), "s", 0, 0);
  await mkdir(path.join(dir, "etc/app"), { recursive: true });
  await mkdir(path.join(dir, "usr/bin"), { recursive: true });
  await mkdir(path.join(dir, "var/lib/db"), { recursive: true });
  await writeFile(path.join(dir, "etc/hostname"), "web1\n");
  await writeFile(path.join(dir, "etc/app/app.conf"), "listen 80\n".repeat(50), { mode: 0o640 });
  await writeFile(path.join(dir, "usr/bin/tool"), "#!/bin/sh\necho tool\n", { mode: 0o4755 });
  await link(path.join(dir, "usr/bin/tool"), path.join(dir, "usr/bin/tool-alias"));
  await link(path.join(dir, "etc/hostname"), path.join(dir, "var/lib/hostname.hard"));
  await symlink("../etc/app/app.conf", path.join(dir, "usr/app.conf"));
  await symlink("/nonexistent/target", path.join(dir, "usr/dangling"));
  const f = await open(path.join(dir, "var/lib/db/data.img"), "w");
  await f.write(Buffer.alloc(65536, 7), 0, 65536, 0);
  await f.write(Buffer.alloc(65536, 9), 0, 65536, 32 * 1024 * 1024);
  await f.truncate(48 * 1024 * 1024);
  await f.close();
  setAttribute(path.join(dir, "etc/hostname"), "user.origin", Buffer.from("physical web1"));
}

/** The replica equals the tree less what a whole-server set leaves out: type, mode, owner, times, links, rdev, xattrs, content, holes. */
async function waitServerCopy(tree: string, image: string, what: string): Promise<void> {
  let diff: string[] = [];
  try {
    await waitFor(what, async () => {
      const src = await snapshotTree(tree);
      for (const p of [...src.keys()]) if (EMPTIED.some((d) => p.startsWith(`${d}/`))) src.delete(p);
      diff = compareTrees(src, await snapshotTree(image), { allocSlack: 1024 * 1024 });
      return diff.length === 0;
    }, 120_000, 500);
  } catch (e) {
    throw new Error(`${(e as Error).message}\n  ${diff.slice(0, 20).join("\n  ")}`);
  }
}

before(async () => {
  const tmp = await tmpDir("understudy-sshp-bundle-");
  bundle = await buildBundle(tmp);
  w = await FailoverWorld.create(NS, [], {
    helmSet: ["provisioning.enabled=true", "provisioning.caSecretName=agent-ca", "provisioning.enrollURL=https://enroll.example.com:7443"],
    beforeOperator: async (world) => ["--ca-dir", world.pki.dir, "--agent-bundle", bundle.tarball],
  });
  tls = await w.pki.tlsFor("tester");
  client = await makeKeyPair(path.join(w.dir, "keys"), "operator");
  for (const name of ["web1", "dr1"]) {
    const host = await w.lab.addHost(name);
    const sshd = await startSshd(host, { authorizedKeys: [client.publicKey] });
    hosts[name] = { host, sshd, root: path.join(w.dir, `host-${name}`) };
    await secret(`ssh-${name}`, sshd.hostKeyLines.join("\n"));
  }
});

after(async () => {
  // the agents the operator started over SSH (detached processes in the hosts' namespaces)
  for (const h of Object.values(hosts)) {
    for (const f of await readdir(path.join(h.root, "etc/understudy/run")).catch(() => [] as string[])) {
      if (!f.endsWith(".pid")) continue;
      const pid = Number(await readFile(path.join(h.root, "etc/understudy/run", f), "utf8").catch(() => ""));
      try {
        if (pid > 0) process.kill(pid, "SIGKILL");
      } catch {
        /* gone */
      }
    }
    await h.sshd.stop();
  }
  await w?.dispose();
  if (bundle && !process.env.KEEP_TEST_DIRS) await rm(path.dirname(bundle.tarball), { recursive: true, force: true });
});

describe("ssh endpoints", { timeout: 900_000 }, () => {
  let tree = "";

  test("the operator installs agents over SSH on both hosts and the server tree replicates byte for byte", async () => {
    tree = path.join(hosts.web1!.root, "srv");
    await serverTree(tree);
    await w.apply({ apiVersion: "understudy.dev/v1alpha1", kind: "ReplicationPair", metadata: { name: "server", namespace: NS }, spec: { source: { ssh: sshEndpoint("web1") }, targets: [{ name: "dr", ssh: sshEndpoint("dr1") }], replicationSet: { path: tree, wholeServer: true } } });
    const p = await w.waitPair("server", "both agents installed, Ready", (x) => endpoint(x, "source")?.phase === "Ready" && endpoint(x, "dr")?.phase === "Ready" && condition(x, "Ready").status === "True", 240_000);
    assert.equal(endpoint(p, "source")?.agentVersion, bundle.version);
    assert.equal(endpoint(p, "dr")?.agentAddress, `${hosts.dr1!.host.ip}:7702`);
    assert.equal(condition(p, "Provisioned").status, "True");
    const st = await fetchStatus(`${hosts.web1!.host.ip}:7702`, tls, 5000);
    assert.equal(st.name, sshAgentName(hosts.web1!.host.ip));
    assert.equal(st.agentVersion, bundle.version);
    assert.match(await w.events("server"), /AgentInstalled/);

    const image = path.join(layout("dr1").targetRoot, sshAgentName(hosts.web1!.host.ip), `${NS}.server`);
    await waitServerCopy(tree, image, "the replica equals the server tree");
    await writeFile(path.join(tree, "etc/app/app.conf"), "listen 8080\n");
    await link(path.join(tree, "etc/app/app.conf"), path.join(tree, "etc/app.conf.hard"));
    await makeSpecial(path.join(tree, "var/spool/second.fifo"), "p", 0, 0);
    setAttribute(path.join(tree, "usr/bin/tool"), "user.build", Buffer.from("2026-11-27"));
    await writeFile(path.join(tree, "run/app.pid"), "42\n");
    await waitServerCopy(tree, image, "live changes reach the replica");
  });

  test("a host key that is not the Secret's known_hosts is refused with a clear condition", async () => {
    const other = await makeKeyPair(path.join(w.dir, "keys"), "not-the-host");
    const [type, b64] = other.publicKey.split(/\s+/);
    await secret("ssh-wrong", `${hosts.dr1!.host.ip} ${type} ${b64}`);
    await w.apply({ apiVersion: "understudy.dev/v1alpha1", kind: "ReplicationPair", metadata: { name: "wrongkey", namespace: NS }, spec: { source: { ssh: sshEndpoint("web1") }, targets: [{ name: "dr", ssh: sshEndpoint("dr1", "ssh-wrong") }], replicationSet: { path: tree } } });
    const p = await w.waitPair("wrongkey", "host key refused", (x) => condition(x, "Provisioned").reason === "HostKeyMismatch", 120_000);
    assert.match(condition(p, "Provisioned").message ?? "", /SHA256:[A-Za-z0-9+/]{43}/, "names the offered key's fingerprint");
    assert.match(condition(p, "Provisioned").message ?? "", new RegExp(hosts.dr1!.host.ip.replaceAll(".", "[.]")));
    assert.equal(endpoint(p, "dr")?.phase, "Failed");
    assert.notEqual(condition(p, "Ready").status, "True");
    await kubectlOk(w.cluster, ["delete", "replicationpair", "wrongkey", "-n", NS]);
  });

  test("an agent upgraded on one side only is refused until both run the same version", async () => {
    const v2 = await repackBundle(bundle, `${bundle.version}-hotfix.1`);
    const upgrade = async (name: string) => {
      const l = layout(name);
      const files: Record<string, AgentFile> = {};
      for (const f of ["agent.yaml", "tls/ca.crt", "tls/agent.crt", "tls/agent.key"]) files[f] = { content: await readFile(path.join(l.etcDir, f)), mode: f.endsWith(".key") || f === "agent.yaml" ? 0o600 : 0o644 };
      const s = hosts[name]!.sshd;
      return installAgent({ host: hosts[name]!.host.ip, port: s.port, user: "root", privateKey: client.privateKey, knownHosts: s.hostKeyLines.join("\n"), bundlePath: v2.tarball, version: v2.version, prefix: l.prefix, etcDir: l.etcDir, files, start: "process", log: pino({ level: "silent" }) });
    };
    const r = await upgrade("dr1");
    assert.equal(r.installedVersion, v2.version);
    const p = await w.waitPair("server", "VersionMismatch", (x) => condition(x, "Degraded").reason === "VersionMismatch", 120_000);
    assert.match(condition(p, "Degraded").message ?? "", new RegExp(`runs ${v2.version.replaceAll(".", "[.]")}`));
    assert.notEqual(condition(p, "Ready").status, "True");

    await upgrade("web1");
    await w.waitPair("server", "Ready again with both sides upgraded", (x) => condition(x, "Ready").status === "True" && condition(x, "Degraded").status === "False", 120_000);
    await writeFile(path.join(tree, "etc/after-upgrade"), "both sides run the hotfix\n");
    await waitServerCopy(tree, path.join(layout("dr1").targetRoot, sshAgentName(hosts.web1!.host.ip), `${NS}.server`), "replicating after the upgrade");
  });
});
