// One SSH connection (ssh2, pure JavaScript) to a host whose key known_hosts
// vouches for: commands with their exit code and output, and SFTP uploads.
//
// The host key is always verified, before the client authenticates (so a host
// that is not the one known_hosts names never sees a signature made with the
// client key): an empty known_hosts is refused without connecting, and a key
// that is not on a line for host:port fails with a HostKeyError that names the
// key offered (type and SHA256 fingerprint) and how to trust it. The client
// key and everything sent are never logged.
import ssh2 from "ssh2";
import type { Client as ClientType, ClientChannel, SFTPWrapper } from "ssh2";
import type { Logger } from "../../common/log.ts";
import { HostKeyError, SshAuthError, SshError } from "./errors.ts";
import { checkHostKey, entriesFor, formatKnownHostsLine, hostKeyAlgorithms, hostKeyFingerprint, keyBlobType, knownHostsName, parseKnownHosts } from "./known-hosts.ts";

// ssh2 is CommonJS: Node's ESM loader sees no named exports for it
const { Client, utils } = ssh2;

export interface SshTarget {
  host: string;
  port: number;
  user: string;
  /** the client's private key: OpenSSH (`-----BEGIN OPENSSH PRIVATE KEY-----`) or PEM, unencrypted */
  privateKey: string;
  /** OpenSSH known_hosts text (what `ssh-keyscan -p <port> <host>` prints, for instance) */
  knownHosts: string;
}

export interface ExecResult {
  /** exit code; null when the command died of a signal (or the channel closed without one) */
  code: number | null;
  signal?: string;
  stdout: string;
  stderr: string;
}

/** `'…'` for sh: safe for any string. */
export function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** `user@host:port`, as messages name a target. */
export function targetName(t: { user: string; host: string; port: number }): string {
  return `${t.user}@${t.host}:${t.port}`;
}

interface Offered {
  blob: Buffer;
  type: string;
  fingerprint: string;
}

function clientKeyInfo(privateKey: string): { type: string; fingerprint: string } {
  const parsed = utils.parseKey(privateKey);
  if (parsed instanceof Error) throw new SshError("Invalid", `the ssh private key cannot be used: ${parsed.message}`);
  if (!parsed.isPrivateKey()) throw new SshError("Invalid", "the ssh private key is a public key");
  const blob = parsed.getPublicSSH();
  return { type: parsed.type, fingerprint: hostKeyFingerprint(blob) };
}

function hostKeyHelp(host: string, port: number): string {
  return `get the host's keys from a trusted path (on the host: \`cat /etc/ssh/ssh_host_*_key.pub\`, or \`ssh-keyscan -p ${port} ${host}\` where the network is trusted), check their fingerprints (\`ssh-keygen -lf\`), and add the lines to the known-hosts Secret`;
}

/** The error for a host key known_hosts does not vouch for (or a host whose key never arrived). */
function hostKeyError(host: string, port: number, why: "revoked" | "mismatch" | "unknown-host" | "no-common-type", offered: Offered | undefined, knownTypes: string[]): HostKeyError {
  const at = `${host}:${port}`;
  const what = offered ? `${offered.type} key ${offered.fingerprint}` : "";
  let msg: string;
  switch (why) {
    case "revoked":
      msg = `host key verification failed for ${at}: the host offered the ${what}, which known_hosts marks @revoked`;
      break;
    case "mismatch":
      msg =
        `host key verification failed for ${at}: the host offered the ${what}, which is not the key known_hosts has for ${knownHostsName(host, port)} ` +
        `(known: ${knownTypes.join(", ")}). Either the host was reinstalled (or its keys regenerated) or this is not the host you think it is ` +
        `(a man in the middle). If the new key is right, replace the line in the known-hosts Secret with:\n  ${offered ? formatKnownHostsLine(host, port, offered.blob) : ""}`;
      break;
    case "unknown-host":
      msg =
        `host key verification failed for ${at}: known_hosts has no key for ${knownHostsName(host, port)}; the host offered the ${what}. ` +
        `Keys are never trusted on first use: ${hostKeyHelp(host, port)}` +
        (offered ? `; for this key the line would be:\n  ${formatKnownHostsLine(host, port, offered.blob)}` : "");
      break;
    case "no-common-type":
      msg = `host key verification failed for ${at}: known_hosts has only ${knownTypes.join(", ")} keys for ${knownHostsName(host, port)}, and the host offers none of these types; ${hostKeyHelp(host, port)}`;
      break;
  }
  return new HostKeyError(msg, { host, port, ...(offered ? { keyType: offered.type, fingerprint: offered.fingerprint } : {}) });
}

export class SshSession {
  readonly target: SshTarget;
  private readonly client: ClientType;
  private readonly pending = new Set<(e: Error) => void>();
  private closedWith?: Error;
  private sftpP?: Promise<SFTPWrapper>;

  private constructor(target: SshTarget, client: ClientType) {
    this.target = target;
    this.client = client;
    client.on("error", (e) => this.abort(new SshError("Connect", `ssh connection to ${target.host}:${target.port} failed: ${e.message}`, true)));
    client.on("close", () => this.abort(new SshError("Connect", `ssh connection to ${target.host}:${target.port} closed`, true)));
  }

  /**
   * Connect, verify the host key against known_hosts, authenticate with the
   * private key. `timeoutMs` bounds TCP connect, handshake and authentication.
   */
  static async connect(t: SshTarget, o: { log?: Logger; timeoutMs?: number } = {}): Promise<SshSession> {
    const { host, port, user } = t;
    if (!host) throw new SshError("Invalid", "ssh: host is required");
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new SshError("Invalid", `ssh: bad port ${port}`);
    if (!user) throw new SshError("Invalid", "ssh: user is required");
    const client = clientKeyInfo(t.privateKey);
    const known = parseKnownHosts(t.knownHosts);
    if (known.entries.length === 0) {
      const skipped = known.skipped.length ? ` (${known.skipped.length} unusable line(s), e.g. line ${known.skipped[0]!.line}: ${known.skipped[0]!.reason})` : "";
      throw new HostKeyError(`refusing to connect to ${host}:${port}: known_hosts is empty${skipped}. Keys are never trusted on first use: ${hostKeyHelp(host, port)}`, { host, port });
    }
    const mine = entriesFor(known, host, port).filter((e) => !e.marker);
    const knownTypes = [...new Set(mine.map((e) => e.keyType))];
    // Ask for the key types known_hosts has for this host; for a host it has no
    // line for, the default list: the connection only goes as far as the key offered.
    const algos = hostKeyAlgorithms(knownTypes);
    if (mine.length > 0 && algos.length === 0) {
      throw new HostKeyError(`known_hosts has keys for ${knownHostsName(host, port)} only of types this client does not support (${knownTypes.join(", ")}); add its ed25519, ecdsa or rsa key`, { host, port });
    }
    let offered: Offered | undefined;
    let verdict: "revoked" | "mismatch" | "unknown-host" | undefined;
    const log = o.log;
    log?.debug({ host, port, user, hostKeyTypes: knownTypes, clientKey: client.fingerprint }, "ssh connect");

    const c = new Client();
    return new Promise<SshSession>((resolve, reject) => {
      let done = false;
      const finish = (e?: Error) => {
        if (done) return;
        done = true;
        c.removeAllListeners("ready");
        if (e) {
          c.on("error", () => undefined); // late socket errors after we gave up
          c.end();
          c.destroy();
          reject(e);
        } else {
          c.removeAllListeners("error");
          resolve(new SshSession(t, c));
        }
      };
      c.once("ready", () => finish());
      c.on("error", (e: Error & { level?: string; code?: string }) => {
        if (verdict) return finish(hostKeyError(host, port, verdict, offered, knownTypes));
        const at = `${host}:${port}`;
        if (/no matching host key format/.test(e.message)) return finish(hostKeyError(host, port, "no-common-type", undefined, knownTypes));
        switch (e.level) {
          case "client-authentication":
            return finish(
              new SshAuthError(
                `ssh authentication as ${targetName(t)} failed: the server refused the ${client.type} key ${client.fingerprint} (${e.message}); ` +
                  `its public key must be in ~${user}/.ssh/authorized_keys on ${host}`,
                { cause: e },
              ),
            );
          case "client-timeout":
            return finish(new SshError("Timeout", `ssh to ${at}: no connection and handshake within ${((o.timeoutMs ?? 20_000) / 1000).toFixed(0)} s (host down, a firewall dropping packets, or not an SSH server?)`, true, { cause: e }));
          case "client-dns":
            return finish(new SshError("Connect", `ssh to ${at}: cannot resolve ${host}: ${e.message}`, true, { cause: e }));
          case "client-socket":
            if (e.code === "ECONNREFUSED") return finish(new SshError("Connect", `ssh connection to ${at} refused (is sshd running and listening on port ${port}?)`, true, { cause: e }));
            if (e.code === "ETIMEDOUT") return finish(new SshError("Timeout", `ssh connection to ${at} timed out`, true, { cause: e }));
            if (e.code === "EHOSTUNREACH" || e.code === "ENETUNREACH") return finish(new SshError("Connect", `ssh to ${at}: ${e.code === "EHOSTUNREACH" ? "host" : "network"} unreachable`, true, { cause: e }));
            return finish(new SshError("Connect", `ssh connection to ${at} failed: ${e.code ?? e.message}`, true, { cause: e }));
          default:
            return finish(new SshError("Connect", `ssh to ${at} failed: ${e.message}`, true, { cause: e }));
        }
      });
      try {
        c.connect({
          host,
          port,
          username: user,
          privateKey: t.privateKey,
          readyTimeout: o.timeoutMs ?? 20_000,
          keepaliveInterval: 15_000,
          keepaliveCountMax: 4,
          tryKeyboard: false,
          ...(algos.length ? { algorithms: { serverHostKey: algos as never } } : {}),
          hostVerifier: (key: Buffer): boolean => {
            const type = keyBlobType(key) ?? "unknown";
            offered = { blob: Buffer.from(key), type, fingerprint: hostKeyFingerprint(key) };
            const v = checkHostKey(known, host, port, key);
            if (v.ok) {
              log?.debug({ host, port, hostKey: offered.fingerprint, knownHostsLine: v.entry.line }, "ssh host key verified");
              return true;
            }
            verdict = v.reason;
            return false;
          },
        });
      } catch (e) {
        // ssh2 throws synchronously on bad options (a key it cannot parse, say); the message carries no key material
        finish(new SshError("Invalid", `ssh to ${host}:${port}: ${(e as Error).message}`));
      }
    });
  }

  /** Fail everything in flight with `e` and close the connection (idempotent). */
  abort(e: Error): void {
    if (!this.closedWith) this.closedWith = e;
    for (const r of [...this.pending]) r(this.closedWith);
    this.pending.clear();
    this.client.end();
  }

  close(): void {
    this.abort(new SshError("Connect", "ssh session closed"));
  }

  private track<T>(run: (resolve: (v: T) => void, reject: (e: Error) => void) => void): Promise<T> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    return new Promise<T>((resolve, reject) => {
      const fail = (e: Error) => {
        this.pending.delete(fail);
        reject(e);
      };
      this.pending.add(fail);
      run(
        (v) => {
          this.pending.delete(fail);
          resolve(v);
        },
        fail,
      );
    });
  }

  /**
   * Run a command line (interpreted by the user's login shell) with `stdin`
   * (closed after it) and collect its output; never rejects for a non-zero
   * exit, only when the connection fails or `timeoutMs` passes.
   */
  exec(command: string, o: { stdin?: string | Buffer; timeoutMs?: number; what?: string } = {}): Promise<ExecResult> {
    return this.track<ExecResult>((resolve, reject) => {
      this.client.exec(command, (err, stream: ClientChannel) => {
        if (err) return reject(new SshError("Connect", `ssh ${this.target.host}:${this.target.port}: cannot run ${o.what ?? "a command"}: ${err.message}`, true));
        const out: Buffer[] = [];
        const errs: Buffer[] = [];
        let timer: NodeJS.Timeout | undefined;
        if (o.timeoutMs) {
          timer = setTimeout(() => {
            stream.close();
            reject(new SshError("Timeout", `ssh ${this.target.host}:${this.target.port}: ${o.what ?? "a command"} did not finish within ${(o.timeoutMs! / 1000).toFixed(0)} s`, true));
          }, o.timeoutMs);
        }
        stream.on("data", (d: Buffer) => out.push(d));
        stream.stderr.on("data", (d: Buffer) => errs.push(d));
        stream.on("close", (code: number | null | undefined, signal?: string) => {
          if (timer) clearTimeout(timer);
          resolve({ code: typeof code === "number" ? code : null, ...(signal ? { signal } : {}), stdout: Buffer.concat(out).toString("utf8"), stderr: Buffer.concat(errs).toString("utf8") });
        });
        stream.end(o.stdin ?? "");
      });
    });
  }

  private sftp(): Promise<SFTPWrapper> {
    this.sftpP ??= this.track<SFTPWrapper>((resolve, reject) =>
      this.client.sftp((err, sftp) => {
        if (err) reject(new SshError("Install", `ssh ${this.target.host}:${this.target.port}: the SFTP subsystem is not available (${err.message}); enable it in sshd_config (Subsystem sftp …)`));
        else resolve(sftp);
      }),
    );
    return this.sftpP;
  }

  /** Upload a local file to `remote` (created with `mode`, before the umask). */
  async putFile(local: string, remote: string, mode: number): Promise<void> {
    const sftp = await this.sftp();
    await this.track<void>((resolve, reject) =>
      sftp.fastPut(local, remote, { mode, concurrency: 16, chunkSize: 64 * 1024 }, (err) => (err ? reject(new SshError("Install", `sftp upload to ${remote} failed: ${err.message}`, true)) : resolve())),
    );
  }

  /** Write `data` to `remote` (created with `mode`, before the umask). */
  async writeFile(remote: string, data: Buffer, mode: number): Promise<void> {
    const sftp = await this.sftp();
    await this.track<void>((resolve, reject) => sftp.writeFile(remote, data, { mode }, (err) => (err ? reject(new SshError("Install", `sftp write of ${remote} failed: ${err.message}`, true)) : resolve())));
  }
}
