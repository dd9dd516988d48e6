// operator/ssh installer and session without a real host: option checks
// (nothing is attempted), the refusals that need no connection, and, against
// an in-process ssh2 server that plays a host, the paths a real sshd in the
// e2e test does not take: a user that is not root and whose sudo wants a
// password, or who has no sudo.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { pino } from "pino";
import ssh2 from "ssh2";
import type { Connection, Server as ServerType } from "ssh2";
import { HostKeyError, SshAuthError, SshError, SudoError } from "../../operator/ssh/errors.ts";
import { installAgent, stopAgent, type InstallOptions } from "../../operator/ssh/installer.ts";
import { formatKnownHostsLine } from "../../operator/ssh/known-hosts.ts";
import { shq, SshSession } from "../../operator/ssh/session.ts";

const { Server, utils } = ssh2;
const log = pino({ level: "silent" });

function blobOf(publicLine: string): Buffer {
  return Buffer.from(publicLine.split(" ")[1]!, "base64");
}

/**
 * An ed25519 key pair from ssh2 that ssh2 itself can parse: its keygen strips the leading zero bytes
 * of the public key, so about 1 pair in 256 is unreadable ("Malformed OpenSSH private key",
 * mscdex/ssh2 issues 1390 and 1513); such a pair is made again.
 */
function sshKeyPair(): { private: string; public: string } {
  for (;;) {
    const kp = utils.generateKeyPairSync("ed25519");
    if (!(utils.parseKey(kp.private) instanceof Error) && !(utils.parseKey(kp.public) instanceof Error)) return kp;
  }
}

/** A fake host: public key auth for one key; `exec` answers each command. */
async function fakeHost(clientPublic: Buffer, exec: (cmd: string) => { code: number; stdout?: string; stderr?: string } | undefined): Promise<{ port: number; knownHosts: string; commands: string[]; close(): Promise<void> }> {
  const hostKey = sshKeyPair();
  const commands: string[] = [];
  const server: ServerType = new Server({ hostKeys: [hostKey.private] }, (c: Connection) => {
    c.on("error", () => undefined);
    c.on("authentication", (ctx) => {
      if (ctx.method === "publickey" && ctx.key.data.equals(clientPublic)) return ctx.accept();
      ctx.reject(["publickey"]);
    });
    c.on("ready", () => {
      c.on("session", (accept) => {
        const session = accept();
        session.on("exec", (acceptExec, _reject, info) => {
          commands.push(info.command);
          const stream = acceptExec();
          const r = exec(info.command);
          if (!r) return; // a command that never ends
          if (r.stdout) stream.write(r.stdout);
          if (r.stderr) stream.stderr.write(r.stderr);
          stream.exit(r.code);
          stream.end();
        });
      });
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    port,
    knownHosts: formatKnownHostsLine("127.0.0.1", port, blobOf(hostKey.public)) + "\n",
    commands,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

describe("ssh installer", () => {
  const client = sshKeyPair();
  let dir = "";
  let bundlePath = "";
  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), "understudy-ssh-unit-"));
    bundlePath = path.join(dir, "bundle.tar.gz");
    await writeFile(bundlePath, "not really");
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const opts = (o: Partial<InstallOptions> = {}): InstallOptions => ({
    host: "127.0.0.1",
    port: 1, // nothing listens: a check that connects would fail with Connect, not the error expected
    user: "root",
    privateKey: client.private,
    knownHosts: `[127.0.0.1]:1 ${client.public}`,
    bundlePath,
    version: "1.2.3",
    files: {},
    start: "process",
    log,
    ...o,
  });
  const failure = (p: Promise<unknown>) => p.then(() => assert.fail("expected a failure"), (e: unknown) => e as Error);

  test("bad options are refused before anything is attempted", async () => {
    const cases: [Partial<InstallOptions>, RegExp][] = [
      [{ prefix: "relative/understudy" }, /prefix must be an absolute path/],
      [{ prefix: "/opt/agent" }, /prefix must end in \/understudy/],
      [{ etcDir: "/etc/understudy/../x/understudy" }, /etcDir must be an absolute path/],
      [{ etcDir: "/etc/x y/understudy" }, /etcDir must be an absolute path/],
      [{ version: "1.0;rm -rf /" }, /version: expected/],
      [{ files: { "../agent.yaml": { content: "", mode: 0o600 } } }, /files: "\.\.\/agent\.yaml"/],
      [{ files: { "/etc/passwd": { content: "", mode: 0o600 } } }, /relative path/],
      [{ files: { "tls/agent.key": { content: "k", mode: 0o644 } } }, /tls\/agent\.key: a private key must not be readable by group or others \(mode 0644/],
      [{ files: { "agent.yaml": { content: "", mode: 0o1777 } } }, /mode must be permission bits/],
      [{ bundlePath: path.join(os.tmpdir(), "no-such-bundle.tar.gz") }, /bundlePath: no such file/],
      [{ start: "cron" as never }, /start: expected systemd, process or auto/],
    ];
    for (const [o, re] of cases) {
      const e = await failure(installAgent(opts(o)));
      assert.ok(e instanceof SshError && e.code === "Invalid", `${JSON.stringify(o)}: ${String(e)}`);
      assert.match(e.message, re);
    }
  });

  test("an empty known_hosts is refused without connecting; a bad private key is named, not shown", async () => {
    const e = await failure(installAgent(opts({ knownHosts: "\n# only a comment\n" })));
    assert.ok(e instanceof HostKeyError, String(e));
    assert.match(e.message, /refusing to connect to 127\.0\.0\.1:1: known_hosts is empty/);
    assert.match(e.message, /ssh-keyscan -p 1 127\.0\.0\.1/);

    const k = await failure(installAgent(opts({ privateKey: "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0IHN0dWZm\n-----END OPENSSH PRIVATE KEY-----\n" })));
    assert.ok(k instanceof SshError && k.code === "Invalid", String(k));
    assert.match(k.message, /the ssh private key cannot be used/);
    assert.ok(!k.message.includes("c2VjcmV0"), "no key material in the message");
  });

  test("connection refused is a retryable Connect error", async () => {
    const e = await failure(SshSession.connect({ host: "127.0.0.1", port: 1, user: "root", privateKey: client.private, knownHosts: `[127.0.0.1]:1 ${client.public}` }));
    assert.ok(e instanceof SshError, String(e));
    assert.equal(e.code, "Connect");
    assert.equal(e.retryable, true);
    assert.match(e.message, /ssh connection to 127\.0\.0\.1:1 refused/);
  });

  test("not root, sudo wants a password: a SudoError before anything is uploaded", async () => {
    const h = await fakeHost(blobOf(client.public), (cmd) =>
      cmd === "id -u" ? { code: 0, stdout: "1000\n" } : cmd === "sudo -n true" ? { code: 1, stderr: "sudo: a password is required\n" } : { code: 99, stderr: "unexpected" },
    );
    try {
      const e = await failure(installAgent(opts({ port: h.port, user: "deploy", knownHosts: h.knownHosts })));
      assert.ok(e instanceof SudoError, String(e));
      assert.match(e.message, /^deploy@127\.0\.0\.1:\d+: deploy is not root and sudo asks for a password; .*passwordless sudo/);
      assert.deepEqual(h.commands, ["id -u", "sudo -n true"]);
    } finally {
      await h.close();
    }
  });

  test("not root, no sudo", async () => {
    const h = await fakeHost(blobOf(client.public), (cmd) => (cmd === "id -u" ? { code: 0, stdout: "1000\n" } : { code: 127, stderr: "sh: 1: sudo: not found\n" }));
    try {
      const e = await failure(stopAgent({ ...opts({ port: h.port, user: "deploy", knownHosts: h.knownHosts }) }));
      assert.ok(e instanceof SudoError, String(e));
      assert.match(e.message, /sudo is not installed/);
    } finally {
      await h.close();
    }
  });

  test("not root with passwordless sudo: every root step goes through sudo -n", async () => {
    const h = await fakeHost(blobOf(client.public), (cmd) =>
      cmd === "id -u" ? { code: 0, stdout: "1000\n" } : cmd === "sudo -n true" ? { code: 0 } : cmd.startsWith("sudo -n -- sh -c ") ? { code: 0, stdout: "stopped=no\n" } : { code: 99 },
    );
    try {
      const r = await stopAgent({ ...opts({ port: h.port, user: "deploy", knownHosts: h.knownHosts }) });
      assert.deepEqual(r, { stopped: false, startMode: "process" });
      assert.equal(h.commands.length, 4);
      assert.ok(h.commands.slice(2).every((c) => c.startsWith("sudo -n -- sh -c '")), h.commands.join("\n"));
    } finally {
      await h.close();
    }
  });

  test("a host key that is not the one known: HostKeyError with the offered fingerprint; a wrong client key: SshAuthError", async () => {
    const h = await fakeHost(blobOf(client.public), () => ({ code: 0 }));
    const other = sshKeyPair();
    try {
      const e = await failure(SshSession.connect({ host: "127.0.0.1", port: h.port, user: "root", privateKey: client.private, knownHosts: formatKnownHostsLine("127.0.0.1", h.port, blobOf(other.public)) }));
      assert.ok(e instanceof HostKeyError, String(e));
      assert.match(e.message, new RegExp(`host key verification failed for 127\\.0\\.0\\.1:${h.port}: the host offered the ssh-ed25519 key SHA256:`));
      assert.ok(e.fingerprint && e.message.includes(e.fingerprint));
      assert.deepEqual(h.commands, []);

      const a = await failure(SshSession.connect({ host: "127.0.0.1", port: h.port, user: "root", privateKey: other.private, knownHosts: h.knownHosts }));
      assert.ok(a instanceof SshAuthError, String(a));
      assert.match(a.message, new RegExp(`^ssh authentication as root@127\\.0\\.0\\.1:${h.port} failed: the server refused the ssh-ed25519 key SHA256:`));
    } finally {
      await h.close();
    }
  });

  test("the whole operation has a deadline, and the error says where it was", async () => {
    const h = await fakeHost(blobOf(client.public), (cmd) => (cmd === "id -u" ? { code: 0, stdout: "0\n" } : undefined));
    try {
      const t0 = Date.now();
      const e = await failure(installAgent(opts({ port: h.port, knownHosts: h.knownHosts, timeoutMs: 1500 })));
      assert.ok(e instanceof SshError && e.code === "Timeout", String(e));
      assert.equal(e.retryable, true);
      assert.match(e.message, /^root@127\.0\.0\.1:\d+: did not finish within 2 s \(at: looking at the installed agent\)$/);
      assert.ok(Date.now() - t0 < 5000);
    } finally {
      await h.close();
    }
  });

  test("shq quotes anything for sh", () => {
    assert.equal(shq("a b"), "'a b'");
    assert.equal(shq("it's"), `'it'\\''s'`);
  });
});
