// A real OpenSSH server (Debian's openssh-server, /usr/sbin/sshd) in a host of
// the netns lab, for tests of provisioning over SSH: its own host keys
// (ed25519 and ecdsa, made with ssh-keygen into a temporary directory), its own
// sshd_config (public keys only, from an authorized_keys file of the test's;
// no PAM, no passwords; internal SFTP), run in the foreground (-D -e) through
// host.exec, so it and every session it starts (and whatever those start) live
// in the host's network namespace. Root may log in (with a key).
//
// Everything goes when stop() is called, when the lab is disposed (it kills
// the namespace's processes), or at exit (exit-cleanup). The sshd binary comes
// from openssh-server: `.ci/run` installs it; without it, startSshd throws
// saying so.
import { execFile } from "node:child_process";
import { closeSync, existsSync, openSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { connect } from "node:net";
import os from "node:os";
import path from "node:path";
import type { Host } from "../e2e/netns.ts";
import { SETPRIV, installExitHook, live, removeOnExit } from "./exit-cleanup.ts";

export const SSHD = "/usr/sbin/sshd";

export interface Sshd {
  host: string;
  port: number;
  /** known_hosts line for the ed25519 host key: `[ip]:port ssh-ed25519 AAAA…` */
  hostKeyLine: string;
  /** known_hosts lines for every host key (ed25519, ecdsa) */
  hostKeyLines: string[];
  /** the authorized_keys file; replace its content to change who may log in */
  authorizedKeysFile: string;
  /** the directory with config, keys and log */
  dir: string;
  /** sshd's stderr (-e: its log) so far */
  log(): Promise<string>;
  stop(): Promise<void>;
}

export interface KeyPair {
  /** the private key (OpenSSH format) */
  privateKey: string;
  /** the public key line: `ssh-ed25519 AAAA… comment` */
  publicKey: string;
  /** path of the private key file (the public one is <path>.pub) */
  path: string;
}

function run(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) =>
    execFile(cmd, args, { timeout: 60_000 }, (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr })),
  );
}

/** Throws, saying how to get it, when there is no sshd on this machine. */
export function requireSshd(): void {
  if (!existsSync(SSHD)) throw new Error(`${SSHD} is missing: install openssh-server (apt-get install -y openssh-server; .ci/run does it)`);
}

/** A new key pair with ssh-keygen (no passphrase). */
export async function makeKeyPair(dir: string, name: string, type: "ed25519" | "ecdsa" | "rsa" = "ed25519"): Promise<KeyPair> {
  await mkdir(dir, { recursive: true });
  const file = path.join(dir, name);
  const r = await run("ssh-keygen", ["-q", "-t", type, "-N", "", "-C", name, "-f", file]);
  if (r.code !== 0) throw new Error(`ssh-keygen -t ${type} failed: ${r.stderr.trim()} (install openssh-client)`);
  return { privateKey: await readFile(file, "utf8"), publicKey: (await readFile(`${file}.pub`, "utf8")).trim(), path: file };
}

/** A known_hosts line for a public key line (`type base64 [comment]`) at ip:port. */
export function knownHostsLineFor(publicKey: string, ip: string, port: number): string {
  const [type, b64] = publicKey.trim().split(/\s+/);
  return `${port === 22 ? ip : `[${ip}]:${port}`} ${type} ${b64}`;
}

function reachable(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host, port });
    const done = (ok: boolean) => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(1000, () => done(false));
    s.once("connect", () => done(true));
    s.once("error", () => done(false));
  });
}

/**
 * Start sshd in `host`, listening on host.ip:port (default 22), letting in the
 * holders of `authorizedKeys` (public key lines) as any user (root included).
 */
export async function startSshd(host: Host, o: { authorizedKeys: string[]; port?: number }): Promise<Sshd> {
  requireSshd();
  installExitHook();
  const port = o.port ?? 22;
  const dir = await mkdtemp(path.join(os.tmpdir(), "understudy-sshd-"));
  removeOnExit.add(dir);
  // sshd's privilege separation directory (Debian's package makes it at boot, through systemd)
  await mkdir("/run/sshd", { recursive: true, mode: 0o755 });

  const lines: string[] = [];
  const hostKeys: string[] = [];
  for (const t of ["ed25519", "ecdsa"] as const) {
    const k = await makeKeyPair(dir, `ssh_host_${t}_key`, t);
    hostKeys.push(k.path);
    lines.push(knownHostsLineFor(k.publicKey, host.ip, port));
  }
  const authorizedKeysFile = path.join(dir, "authorized_keys");
  await writeFile(authorizedKeysFile, o.authorizedKeys.join("\n") + "\n", { mode: 0o600 });
  const config = path.join(dir, "sshd_config");
  await writeFile(
    config,
    [
      `ListenAddress ${host.ip}:${port}`,
      ...hostKeys.map((k) => `HostKey ${k}`),
      `PidFile ${path.join(dir, "sshd.pid")}`,
      `AuthorizedKeysFile ${authorizedKeysFile}`,
      "PubkeyAuthentication yes",
      "PasswordAuthentication no",
      "KbdInteractiveAuthentication no",
      "HostbasedAuthentication no",
      "PermitRootLogin prohibit-password",
      "UsePAM no",
      // the key files live in a temporary directory, not ~/.ssh
      "StrictModes no",
      "UseDNS no",
      "PrintMotd no",
      "PrintLastLog no",
      "PermitUserEnvironment no",
      "Subsystem sftp internal-sftp",
      "LogLevel VERBOSE",
      "",
    ].join("\n"),
  );
  const check = await host.run(SSHD, ["-t", "-f", config]);
  if (check.code !== 0) throw new Error(`sshd -t rejects the test config: ${check.stderr.trim()}`);

  const logFile = path.join(dir, "sshd.log");
  const fd = openSync(logFile, "a");
  // --pdeathsig: sshd dies with the test process however it ends (ip netns exec execs, so setpriv's parent is us)
  const argv = [SSHD, "-D", "-e", "-f", config];
  const p = SETPRIV ? host.exec(SETPRIV, ["--pdeathsig", "KILL", ...argv], { stdio: ["ignore", fd, fd] }) : host.exec(argv[0]!, argv.slice(1), { stdio: ["ignore", fd, fd] });
  closeSync(fd);
  live.add(p);
  const exited = new Promise<void>((r) => p.once("exit", () => r()));
  const log = () => readFile(logFile, "utf8").catch(() => "");

  const deadline = Date.now() + 15_000;
  for (;;) {
    if (p.exitCode !== null || p.signalCode !== null) throw new Error(`sshd exited at start (${p.exitCode ?? p.signalCode}): ${await log()}`);
    if (await reachable(host.ip, port)) break;
    if (Date.now() > deadline) throw new Error(`sshd does not listen on ${host.ip}:${port} after 15 s: ${await log()}`);
    await new Promise((r) => setTimeout(r, 100));
  }

  let stopped = false;
  return {
    host: host.ip,
    port,
    hostKeyLine: lines[0]!,
    hostKeyLines: lines,
    authorizedKeysFile,
    dir,
    log,
    async stop() {
      if (stopped) return;
      stopped = true;
      if (p.exitCode === null && p.signalCode === null) {
        p.kill("SIGTERM");
        await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
        if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
      }
      live.delete(p);
      await rm(dir, { recursive: true, force: true });
      removeOnExit.delete(dir);
    },
  };
}
