// Provisioned endpoints before the rest of a reconcile: which sides have an
// agent (resolvePair), and the user data an EC2 DR instance boots with.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { test } from "node:test";
import type { EndpointStatus, ReplicationPair } from "../../operator/api/v1alpha1/index.ts";
import { provisionedEndpoints, resolvePair } from "../../operator/controllers/endpoints.ts";
import { renderUserData } from "../../operator/ec2/user-data.ts";
import { SshProvisioner, certStillGood, sshAgentName } from "../../operator/ssh/provisioner.ts";
import type { SshEndpoint } from "../../operator/api/v1alpha1/index.ts";
import { createLogger } from "../../common/log.ts";
import { newCA, signLeaf } from "../../common/tls.ts";

const CA = "-----BEGIN CERTIFICATE-----\nMIIBcjCCARmgAwIBAgIQb4Gu\n-----END CERTIFICATE-----\n";

function pair(): ReplicationPair {
  return {
    metadata: { namespace: "prod", name: "web", uid: "u1" },
    spec: {
      source: { ssh: { host: "10.0.0.5", secretName: "ssh" } },
      targets: [
        { name: "local", agent: { address: "10.0.0.6:7702" } },
        { name: "dr", ec2: { region: "eu-west-1", ami: "ami-12345678", bucket: "b", failoverInstanceType: "m5.large" } },
      ],
      replicationSet: { path: "/srv" },
    },
  };
}

test("provisioned endpoints are listed by kind", () => {
  assert.deepEqual(provisionedEndpoints(pair()), [
    { name: "source", kind: "ssh" },
    { name: "dr", kind: "ec2" },
  ]);
});

test("an enroll source and enroll targets are provisioned endpoints too", () => {
  const p = pair();
  p.spec.source = { enroll: {} };
  p.spec.targets.push({ name: "vault", enroll: { tokenTTL: "1h" } });
  assert.deepEqual(provisionedEndpoints(p), [
    { name: "source", kind: "enroll" },
    { name: "dr", kind: "ec2" },
    { name: "vault", kind: "enroll" },
  ]);
});

test("resolvePair: nothing until the source has an agent; targets join as their agents come", () => {
  const p = pair();
  const none = resolvePair(p, []);
  assert.equal(none.pair, undefined);
  assert.deepEqual(none.pending, ["source: Pending", "dr: Pending"]);

  const src: EndpointStatus = { name: "source", kind: "ssh", phase: "Ready", agentAddress: "10.0.0.5:7702" };
  const dr: EndpointStatus = { name: "dr", kind: "ec2", phase: "Enrolling", message: "waiting for its agent", instanceId: "i-1" };
  const some = resolvePair(p, [src, dr]);
  assert.equal(some.pair?.spec.source.agent.address, "10.0.0.5:7702");
  assert.deepEqual(some.pair?.spec.targets.map((t) => [t.name, t.agent.address]), [["local", "10.0.0.6:7702"]], "the ec2 target waits; the agent target replicates meanwhile");
  assert.deepEqual(some.pending, ["dr: Enrolling (waiting for its agent)"]);

  // an enrolled instance being resized keeps its address (its journal queues meanwhile)
  const all = resolvePair(p, [src, { ...dr, phase: "Resizing", agentAddress: "10.1.0.9:7702" }]);
  assert.deepEqual(all.pair?.spec.targets.map((t) => t.agent.address), ["10.0.0.6:7702", "10.1.0.9:7702"]);
  assert.deepEqual(all.pending, []);
  assert.equal(p.spec.targets[1]!.agent, undefined, "the pair itself is not modified");
});

test("user data: quoted for bash, the bundle checked by sha256, the token passed by environment", () => {
  const ud = renderUserData({ target: "prod/web/dr", bundleUrl: "https://s3.example.com/b/k?X-Amz-Signature=abc&x=it's", bundleSha256: "a".repeat(64), enrollUrl: "https://10.0.0.1:7443", caPem: CA, token: "ust1.x.y", agentPort: 7702, targetRoot: "/var/lib/understudy/replicas" });
  assert.match(ud, /^#!\/bin\/bash\n/);
  assert.ok(ud.includes(`'https://s3.example.com/b/k?X-Amz-Signature=abc&x=it'\\''s'`), "single quotes survive");
  assert.ok(ud.includes(`export UNDERSTUDY_ENROLL_TOKEN='ust1.x.y'`));
  assert.doesNotMatch(ud, /--token/, "the token is not on a command line (ps would show it)");
  assert.ok(ud.includes("sha256sum -c -"));
  // bash parses it
  execFileSync("bash", ["-n"], { input: ud });
});

test("user data: refuses what would not work", () => {
  const base = { target: "a/b/c", bundleUrl: "https://x", bundleSha256: "a".repeat(64), enrollUrl: "https://e", caPem: CA, token: "t", agentPort: 7702, targetRoot: "/r" };
  assert.throws(() => renderUserData({ ...base, bundleSha256: "xyz" }), /not a hex SHA-256/);
  assert.throws(() => renderUserData({ ...base, caPem: "garbage" }), /not a PEM certificate/);
  assert.throws(() => renderUserData({ ...base, bundleUrl: `https://x/${"a".repeat(17000)}` }), /EC2 takes at most 16384/);
});

test("ssh agent names are agent names", () => {
  assert.equal(sshAgentName("10.0.0.5"), "ssh-10.0.0.5");
  assert.equal(sshAgentName("Web1.Example.COM"), "ssh-web1.example.com");
  assert.equal(sshAgentName("fd00::1"), "ssh-fd00-1");
  const long = sshAgentName(`${"a".repeat(80)}.example.com`);
  assert.ok(long.length <= 63 && /^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$/.test(long), long);
});

test("ssh: a second pair asking one host for another layout is refused, naming the pair that has it; same layout shares", async () => {
  let now = Date.parse("2026-01-01T00:00:00Z");
  const p = new SshProvisioner({ bundle: { path: "/nonexistent", version: "1.0.0" }, ca: await newCA("test CA", 1), admins: ["op"], readSecret: async () => undefined, log: createLogger("test", "silent"), now: () => new Date(now) });
  const on = (name: string, ssh: SshEndpoint): ReplicationPair => ({ metadata: { namespace: "prod", name, uid: name }, spec: { source: { ssh }, targets: [{ name: "local", agent: { address: "10.0.0.6:7702" } }], replicationSet: { path: "/srv" } } });
  const a = on("web", { host: "10.0.0.5", secretName: "ssh", targetRoot: "/replicas-a" });
  const b = on("db", { host: "10.0.0.5", secretName: "ssh", targetRoot: "/replicas-b", agentPort: 7800 });
  const c = on("mail", { host: "10.0.0.5", secretName: "ssh", targetRoot: "/replicas-a" });
  assert.notEqual((await p.reconcile(a, "source", undefined, true)).status.phase, "Failed");
  const r = await p.reconcile(b, "source", undefined, true);
  assert.equal(r.status.phase, "Failed");
  assert.equal(r.status.lastError?.code, "SshLayoutConflict");
  assert.match(r.status.message ?? "", /host 10\.0\.0\.5 already runs the agent installed for pair prod\/web \(endpoint source\) with agentPort 7702, targetRoot \/replicas-a; this endpoint asks for agentPort 7800, targetRoot \/replicas-b/);
  assert.deepEqual(r.events?.map((e) => e.reason), ["SshLayoutConflict"]);
  assert.deepEqual((await p.reconcile(b, "source", r.status, true)).events, [], "the Warning event once, not on every pass");
  assert.notEqual((await p.reconcile(c, "source", undefined, true)).status.phase, "Failed", "pairs with the same layout share the host");
  // The pair that had the host goes: the other one may have it.
  await p.finalize(a, "source", undefined);
  await p.finalize(c, "source", undefined);
  assert.notEqual((await p.reconcile(b, "source", undefined, true)).status.lastError?.code, "SshLayoutConflict");
  // A claim not refreshed (its pair stopped using ssh while the operator ran) lapses.
  now += 11 * 60_000;
  assert.notEqual((await p.reconcile(a, "source", undefined, true)).status.lastError?.code, "SshLayoutConflict");
});

test("ssh: an installed certificate stays when this CA issued it for this agent and host with over 30 days left", async () => {
  const ca = await newCA("test CA", 3650);
  const other = await newCA("another CA", 3650);
  const now = new Date();
  const leaf = async (c: typeof ca, cn: string, san: { type: "ip" | "dns"; value: string }, days = 825) => (await signLeaf(c, { commonName: cn, usage: "both", sans: [san], days })).certPem;
  const good = await leaf(ca, "ssh-10.0.0.5", { type: "ip", value: "10.0.0.5" });
  assert.equal(certStillGood(good, ca.certPem, "10.0.0.5", "ssh-10.0.0.5", now), true);
  assert.equal(certStillGood(good, other.certPem, "10.0.0.5", "ssh-10.0.0.5", now), false, "another CA (rotated)");
  assert.equal(certStillGood(good, ca.certPem, "10.0.0.6", "ssh-10.0.0.5", now), false, "another host");
  assert.equal(certStillGood(good, ca.certPem, "10.0.0.5", "ssh-10.0.0.6", now), false, "another name");
  assert.equal(certStillGood(await leaf(ca, "ssh-10.0.0.5", { type: "ip", value: "10.0.0.5" }, 20), ca.certPem, "10.0.0.5", "ssh-10.0.0.5", now), false, "20 days left");
  assert.equal(certStillGood(good, ca.certPem, "10.0.0.5", "ssh-10.0.0.5", new Date(now.getTime() + 800 * 86_400_000)), false, "close to expiry later on");
  const dns = await leaf(ca, "ssh-web1.example.com", { type: "dns", value: "web1.example.com" });
  assert.equal(certStillGood(dns, ca.certPem, "web1.example.com", "ssh-web1.example.com", now), true);
  assert.throws(() => certStillGood("not a certificate", ca.certPem, "10.0.0.5", "ssh-10.0.0.5", now));
});
