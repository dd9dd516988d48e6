// Installing the agent over SSH (operator/ssh/installer.ts) against a real
// OpenSSH sshd in a netns lab host: the bundle is built once (and repacked as
// a second version for the upgrade); the agent is started through the SSH
// session, so it runs in the host's network namespace, and answers status
// over mTLS at host.ip. Hosts share the file system with the test: each case
// gets its own prefix and etc directories under a temporary directory.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { lstat, readFile, readlink, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { pino } from "pino";
import { fetchStatus } from "../../agent/control-client.ts";
import type { TlsConfig } from "../../common/config.ts";
import { HostKeyError, SshAuthError, SshError, RemoteCommandError } from "../../operator/ssh/errors.ts";
import { hostKeyFingerprint } from "../../operator/ssh/known-hosts.ts";
import { agentVersionOverSsh, installAgent, stopAgent, type AgentFile, type InstallOptions } from "../../operator/ssh/installer.ts";
import { buildBundle, repackBundle, type BuiltBundle } from "../env/bundle.ts";
import { makeKeyPair, requireSshd, startSshd, type KeyPair, type Sshd } from "../env/sshd.ts";
import { tmpDir, waitFor } from "./harness.ts";
import { Pki } from "./k8s-harness.ts";
import { createLab, type Host, type Lab } from "./netns.ts";

const AGENT_PORT = 7702;

function sh(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => execFile(cmd, args, { timeout: 60_000 }, (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr })));
}

/** The process runs (a zombie does not count). */
function alive(pid: number): boolean {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, "utf8");
    return st.slice(st.lastIndexOf(")") + 2, st.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

describe("agent install over SSH", { timeout: 900_000 }, () => {
  let tmp = "";
  let lab: Lab | undefined;
  let host: Host;
  let sshd: Sshd;
  let v1: BuiltBundle;
  let v2: BuiltBundle;
  let client: KeyPair;
  let stranger: KeyPair;
  let pki: Pki;
  let operatorTls: TlsConfig;
  let agentFiles: Record<string, AgentFile>;
  const log = pino({ level: process.env.UNDERSTUDY_LOG_LEVEL ?? "warn" }, pino.destination(2));
  let progress: string[] = [];
  let t0 = Date.now();
  /** the steps of the next install, with the time each began */
  const trace = () => {
    progress = [];
    t0 = Date.now();
  };

  /** Separate prefix and etc directories per case (the hosts share this file system). */
  const dirs = (name: string) => ({ prefix: path.join(tmp, name, "opt", "understudy"), etcDir: path.join(tmp, name, "etc", "understudy") });
  const base = (name: string): Omit<InstallOptions, "bundlePath" | "version"> => ({
    host: host.ip,
    port: sshd.port,
    user: "root",
    privateKey: client.privateKey,
    knownHosts: sshd.hostKeyLine + "\n",
    ...dirs(name),
    files: agentFiles,
    start: "process",
    log,
    onProgress: (m) => progress.push(`${((Date.now() - t0) / 1000).toFixed(1)}s ${m}`),
    timeoutMs: 300_000,
  });

  before(async () => {
    requireSshd();
    tmp = await tmpDir("understudy-ssh-install-");
    const start = Date.now();
    v1 = await buildBundle(path.join(tmp, "dist"));
    v2 = await repackBundle(v1, `${v1.version}-next`);
    lab = await createLab();
    host = await lab.addHost("ssh1");
    client = await makeKeyPair(path.join(tmp, "keys"), "operator");
    stranger = await makeKeyPair(path.join(tmp, "keys"), "stranger");
    sshd = await startSshd(host, { authorizedKeys: [client.publicKey], port: 2222 });
    pki = await Pki.create(path.join(tmp, "pki"));
    operatorTls = await pki.tlsFor("understudy-operator");
    const web1 = await pki.tlsFor("web1", [host.ip]);
    const config = {
      name: "web1",
      listen: `${host.ip}:${AGENT_PORT}`,
      dataDir: "state", // relative: against the config's directory, so per case
      tls: { ca: "tls/ca.crt", cert: "tls/agent.crt", key: "tls/agent.key" },
      target: { root: "replicas" },
    };
    agentFiles = {
      "agent.yaml": { content: YAML.stringify(config), mode: 0o600 },
      "tls/ca.crt": { content: await readFile(web1.ca), mode: 0o644 },
      "tls/agent.crt": { content: await readFile(web1.cert), mode: 0o644 },
      "tls/agent.key": { content: await readFile(web1.key), mode: 0o600 },
    };
    process.stderr.write(`# setup: bundle built in ${(v1.ms / 1000).toFixed(1)} s, repacked as ${v2.version} in ${(v2.ms / 1000).toFixed(1)} s; sshd on ${sshd.host}:${sshd.port}; ${((Date.now() - start) / 1000).toFixed(1)} s in all\n`);
  });

  after(async () => {
    await sshd?.stop();
    await lab?.dispose();
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  const status = (timeoutMs = 3000) => fetchStatus(`${host.ip}:${AGENT_PORT}`, operatorTls, timeoutMs);

  test("install: files in place with their modes, the agent runs in the host's namespace and answers over mTLS", async (t) => {
    const d = dirs("a");
    trace();
    const r = await installAgent({ ...base("a"), bundlePath: v1.tarball, version: v1.version });
    t.diagnostic(`fresh install in ${((Date.now() - t0) / 1000).toFixed(1)} s; progress: ${progress.join(" | ")}`);
    assert.equal(r.installedVersion, v1.version);
    assert.equal(r.previousVersion, undefined);
    assert.equal(r.installed, true);
    assert.deepEqual(r.filesWritten.sort(), Object.keys(agentFiles).sort());
    assert.equal(r.started, true);
    assert.equal(r.startMode, "process");
    assert.ok(r.pid && r.pid > 0);

    assert.equal(await readlink(d.prefix), `understudy-${v1.version}`);
    assert.equal((await readFile(path.join(d.prefix, "VERSION"), "utf8")).trim(), v1.version);
    for (const [f, want] of Object.entries(agentFiles)) {
      const p = path.join(d.etcDir, f);
      assert.ok((await lstat(p)).isFile(), f);
      assert.equal((await stat(p)).mode & 0o777, want.mode, `${f} mode`);
      assert.deepEqual(await readFile(p), Buffer.from(want.content), `${f} content`);
    }
    assert.equal((await stat(path.join(d.etcDir, "tls", "agent.key"))).mode & 0o777, 0o600);
    assert.equal((await readFile(path.join(d.etcDir, "run", "agent.pid"), "utf8")).trim(), String(r.pid));
    // nothing left behind: no temporary files next to the config, no staging directories
    assert.deepEqual((await sh("find", [d.etcDir, "-name", ".*.tmp.*"])).stdout, "");

    // the agent runs in the host's network namespace (started by the SSH session), not the test's
    const ns = await sh("ip", ["netns", "identify", String(r.pid)]);
    assert.equal(ns.stdout.trim(), host.ns, `agent pid ${r.pid} is in netns ${host.ns}`);
    const exe = await readlink(`/proc/${r.pid}/exe`);
    assert.equal(exe, path.join(path.dirname(d.prefix), `understudy-${v1.version}`, "node", "bin", "node"));

    const s = await waitFor("the installed agent to answer status over mTLS", () => status().catch(() => undefined), 30_000, 250);
    assert.equal(s.name, "web1");
    assert.equal(s.agentVersion, v1.version);
    assert.equal(await agentVersionOverSsh({ ...base("a") }), v1.version);
  });

  test("the same version and files again: nothing changes, the agent is not restarted", async () => {
    const pidBefore = Number(await readFile(path.join(dirs("a").etcDir, "run", "agent.pid"), "utf8"));
    const r = await installAgent({ ...base("a"), bundlePath: v1.tarball, version: v1.version });
    assert.equal(r.installed, false);
    assert.deepEqual(r.filesWritten, []);
    assert.equal(r.started, false);
    assert.equal(r.pid, pidBefore, "same pid");
    assert.equal(r.previousVersion, v1.version);
    assert.ok(alive(pidBefore));
    assert.equal((await status()).agentVersion, v1.version);
  });

  test("a changed config file: only it is written, and the agent restarts", async () => {
    const pidBefore = Number(await readFile(path.join(dirs("a").etcDir, "run", "agent.pid"), "utf8"));
    const files = { ...agentFiles, "agent.yaml": { content: `${String(agentFiles["agent.yaml"]!.content)}# changed\n`, mode: 0o600 } };
    const r = await installAgent({ ...base("a"), files, bundlePath: v1.tarball, version: v1.version });
    assert.equal(r.installed, false);
    assert.deepEqual(r.filesWritten, ["agent.yaml"]);
    assert.equal(r.started, true);
    assert.notEqual(r.pid, pidBefore);
    await waitFor("the old agent to be gone", () => !alive(pidBefore), 60_000);
    assert.match(await readFile(path.join(dirs("a").etcDir, "agent.yaml"), "utf8"), /# changed\n$/);
    await waitFor("the restarted agent to answer", () => status().catch(() => undefined), 30_000, 250);
    // and back, so later cases see the original files
    const back = await installAgent({ ...base("a"), bundlePath: v1.tarball, version: v1.version });
    assert.deepEqual(back.filesWritten, ["agent.yaml"]);
  });

  test("a new certificate for the same identity: the installed one is kept when accepted (no restart), replaced when not", async () => {
    const certPath = path.join(dirs("a").etcDir, "tls", "agent.crt");
    const installed = await readFile(certPath, "utf8");
    const pidBefore = Number(await readFile(path.join(dirs("a").etcDir, "run", "agent.pid"), "utf8"));
    const again = await pki.tlsFor("web1", [host.ip]);
    const files = { ...agentFiles, "tls/agent.crt": { content: await readFile(again.cert), mode: 0o644 }, "tls/agent.key": { content: await readFile(again.key), mode: 0o600 } };
    assert.notEqual(String(files["tls/agent.crt"].content), installed, "a newly signed certificate");
    const seen: string[] = [];
    const kept = await installAgent({ ...base("a"), files, bundlePath: v1.tarball, version: v1.version, keepCertificate: { cert: "tls/agent.crt", key: "tls/agent.key", accept: (pem) => (seen.push(pem), true) } });
    assert.deepEqual(seen, [installed], "accept is shown the installed certificate");
    assert.deepEqual(kept.filesWritten, []);
    assert.deepEqual(kept.filesKept, ["tls/agent.crt", "tls/agent.key"]);
    assert.equal(kept.started, false);
    assert.equal(kept.pid, pidBefore);
    assert.equal(await readFile(certPath, "utf8"), installed);
    const replaced = await installAgent({ ...base("a"), files, bundlePath: v1.tarball, version: v1.version, keepCertificate: { cert: "tls/agent.crt", key: "tls/agent.key", accept: () => false } });
    assert.deepEqual(replaced.filesWritten, ["tls/agent.crt", "tls/agent.key"]);
    assert.equal(replaced.started, true);
    assert.equal(await readFile(certPath, "utf8"), String(files["tls/agent.crt"].content));
    await waitFor("the restarted agent to answer with the new certificate", () => status().catch(() => undefined), 30_000, 250);
    // and back, so later cases see the original files
    assert.deepEqual((await installAgent({ ...base("a"), bundlePath: v1.tarball, version: v1.version })).filesWritten, ["tls/agent.crt", "tls/agent.key"]);
  });

  test("host keys: a wrong key, an empty known_hosts, a host it has no line for are refused; ssh-keyscan output is accepted", async () => {
    const d = dirs("c");
    const other = await makeKeyPair(path.join(tmp, "keys"), "not-the-host-key");
    const wrong = `[${host.ip}]:${sshd.port} ${other.publicKey.split(" ").slice(0, 2).join(" ")}\n`;
    const realBlob = Buffer.from(sshd.hostKeyLine.split(" ")[2]!, "base64");
    const fp = hostKeyFingerprint(realBlob);
    // the fingerprint as OpenSSH itself prints it
    const kg = await sh("ssh-keygen", ["-lf", path.join(sshd.dir, "ssh_host_ed25519_key.pub")]);
    assert.equal(kg.stdout.split(" ")[1], fp);

    const e1 = await installAgent({ ...base("c"), knownHosts: wrong, bundlePath: v1.tarball, version: v1.version }).then(() => undefined, (e: unknown) => e);
    assert.ok(e1 instanceof HostKeyError, `HostKeyError, got ${String(e1)}`);
    assert.equal(e1.fingerprint, fp);
    assert.equal(e1.keyType, "ssh-ed25519");
    assert.match(e1.message, new RegExp(`${host.ip}:${sshd.port}`));
    assert.ok(e1.message.includes(fp), e1.message);
    assert.match(e1.message, /known-hosts Secret/);
    assert.ok(!existsSync(path.join(tmp, "c")), "nothing was installed");

    const e2 = await installAgent({ ...base("c"), knownHosts: "# nothing here\n", bundlePath: v1.tarball, version: v1.version }).then(() => undefined, (e: unknown) => e);
    assert.ok(e2 instanceof HostKeyError, String(e2));
    assert.match(e2.message, /known_hosts is empty/);
    assert.match(e2.message, /never trusted on first use/);

    // a line for the same address on another port does not count
    assert.ok(sshd.hostKeyLine.startsWith(`[${host.ip}]:${sshd.port} ssh-ed25519 `), sshd.hostKeyLine);
    const otherPort = `[${host.ip}]:${sshd.port + 1} ${sshd.hostKeyLine.split(" ").slice(1).join(" ")}\n${host.ip} ${sshd.hostKeyLine.split(" ").slice(1).join(" ")}\n`;
    const e3 = await agentVersionOverSsh({ ...base("c"), knownHosts: otherPort }).then(() => undefined, (e: unknown) => e);
    assert.ok(e3 instanceof HostKeyError, String(e3));
    assert.ok(e3.message.includes(fp), e3.message);
    assert.match(e3.message, /has no key for/);
    assert.ok(!existsSync(d.prefix));

    // what the docs tell users to do: ssh-keyscan, plain and hashed (-H); and a line of only the ecdsa key
    for (const args of [[], ["-H"]]) {
      const scan = await sh("ssh-keyscan", [...args, "-p", String(sshd.port), host.ip]);
      assert.equal(scan.code, 0, scan.stderr);
      assert.equal(await agentVersionOverSsh({ ...base("c"), knownHosts: scan.stdout }), undefined, `ssh-keyscan ${args.join(" ")}`);
    }
    const ecdsaOnly = sshd.hostKeyLines.find((l) => l.includes(" ecdsa-"))!;
    assert.equal(await agentVersionOverSsh({ ...base("c"), knownHosts: ecdsaOnly }), undefined, "a host known by its ecdsa key only");
  });

  test("a client key the server does not know: an authentication error", async () => {
    const e = await installAgent({ ...base("d"), privateKey: stranger.privateKey, bundlePath: v1.tarball, version: v1.version }).then(() => undefined, (x: unknown) => x);
    assert.ok(e instanceof SshAuthError, String(e));
    assert.equal(e.code, "Auth");
    assert.match(e.message, new RegExp(`^ssh authentication as root@${host.ip.replace(/\./g, "\\.")}:${sshd.port} failed: `));
    assert.ok(!e.message.includes("PRIVATE KEY"), "no key material in the message");
    assert.ok(!existsSync(path.join(tmp, "d")));
  });

  test("a config the agent refuses: the install fails with the agent's own words", async () => {
    const files = { ...agentFiles, "agent.yaml": { content: "name: CHANGE-ME\nlisten: nowhere\n", mode: 0o600 } };
    const e = await installAgent({ ...base("bad"), files, bundlePath: v1.tarball, version: v1.version }).then(() => undefined, (x: unknown) => x);
    assert.ok(e instanceof RemoteCommandError, String(e));
    assert.equal(e.code, "Agent");
    assert.match(e.message, /exited right after it started/);
    assert.match(e.stderrTail, /listen|name/);
  });

  test("a damaged bundle: install.sh is never reached, the error has the remote's words, nothing changes", async () => {
    const junk = path.join(tmp, "dist", "junk.tar.gz");
    await writeFile(junk, "this is not a tarball");
    const e = await installAgent({ ...base("junk"), bundlePath: junk, version: "9.9.9" }).then(() => undefined, (x: unknown) => x);
    assert.ok(e instanceof RemoteCommandError, String(e));
    assert.equal(e.code, "Install");
    assert.equal(e.step, "install.sh");
    assert.match(e.message, /cannot unpack the bundle/);
    assert.ok(!existsSync(dirs("junk").prefix), "no program installed");
    assert.ok(!existsSync(path.join(dirs("junk").etcDir, "agent.yaml")), "no config written");
    assert.deepEqual((await sh("sh", ["-c", "ls -d /tmp/understudy-install.* 2>/dev/null || true"])).stdout, "", "the temporary directory is gone");
  });

  test("upgrade: the new version replaces the old one, the agent restarts on it", async (t) => {
    const d = dirs("a");
    const pidBefore = Number(await readFile(path.join(d.etcDir, "run", "agent.pid"), "utf8"));
    trace();
    const r = await installAgent({ ...base("a"), bundlePath: v2.tarball, version: v2.version });
    t.diagnostic(`upgrade in ${((Date.now() - t0) / 1000).toFixed(1)} s; progress: ${progress.join(" | ")}`);
    assert.equal(r.installed, true);
    assert.equal(r.installedVersion, v2.version);
    assert.equal(r.previousVersion, v1.version);
    assert.equal(r.started, true);
    assert.deepEqual(r.filesWritten, []);
    assert.notEqual(r.pid, pidBefore);
    await waitFor("the old agent to be gone", () => !alive(pidBefore), 60_000);
    assert.equal(await readlink(d.prefix), `understudy-${v2.version}`);
    assert.ok(existsSync(path.join(path.dirname(d.prefix), `understudy-${v1.version}`)), "the previous version stays for a rollback");
    const s = await waitFor("the upgraded agent to answer", () => status().catch(() => undefined), 30_000, 250);
    assert.equal(s.agentVersion, v2.version);
    assert.equal(await agentVersionOverSsh(base("a")), v2.version);

    // the same again: nothing to do; "auto" picks process here (no systemd in the test host)
    const again = await installAgent({ ...base("a"), start: "auto", bundlePath: v2.tarball, version: v2.version });
    assert.equal(again.startMode, "process");
    assert.equal(again.started, false);
    assert.equal(again.pid, r.pid);
  });

  test("stop, then a stopped sshd: connection refused", async () => {
    const pid = Number(await readFile(path.join(dirs("a").etcDir, "run", "agent.pid"), "utf8"));
    const st = await stopAgent({ ...base("a") });
    assert.deepEqual(st, { stopped: true, startMode: "process" });
    assert.ok(!alive(pid));
    assert.deepEqual(await stopAgent({ ...base("a") }), { stopped: false, startMode: "process" });
    await sshd.stop();
    const e = await agentVersionOverSsh(base("a")).then(() => undefined, (x: unknown) => x);
    assert.ok(e instanceof SshError, String(e));
    assert.equal(e.code, "Connect");
    assert.match(e.message, /refused/);
  });
});
