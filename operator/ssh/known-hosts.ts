// OpenSSH known_hosts, as far as verifying a host key needs it: plain host
// patterns (comma-separated, `*` and `?` wildcards, `!` negation), `[host]:port`
// for ports other than 22, hashed names (`|1|salt|hash`, HMAC-SHA1, what
// `ssh-keyscan -H` and HashKnownHosts write), and `@revoked` keys.
// `@cert-authority` lines are skipped: host certificates are not supported.
//
// A key matches when its blob (the wire encoding, base64 in the file) is
// byte for byte the one on a line whose patterns match the host: the same
// comparison OpenSSH makes.
import { createHash, createHmac, timingSafeEqual } from "node:crypto";

export interface KnownHostEntry {
  /** the line's patterns (one hashed entry, or comma-separated patterns) */
  hosts: string;
  /** "revoked" for @revoked lines */
  marker?: "revoked";
  /** the key type as written: ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa, … */
  keyType: string;
  /** the public key blob */
  key: Buffer;
  /** 1-based line number, for messages */
  line: number;
}

export interface ParsedKnownHosts {
  entries: KnownHostEntry[];
  /** lines that could not be used, with why (bad base64, a key type that does not match its blob, …) */
  skipped: { line: number; reason: string }[];
}

/** The type name inside a public key blob (its first SSH string), or undefined when it is no blob. */
export function keyBlobType(blob: Buffer): string | undefined {
  if (blob.length < 4) return undefined;
  const n = blob.readUInt32BE(0);
  if (n === 0 || n > 64 || blob.length < 4 + n) return undefined;
  const t = blob.subarray(4, 4 + n).toString("latin1");
  return /^[\x21-\x7e]+$/.test(t) ? t : undefined;
}

/** OpenSSH's fingerprint of a public key blob: `SHA256:<base64, no padding>` (as `ssh-keygen -lf` prints). */
export function hostKeyFingerprint(blob: Buffer): string {
  return `SHA256:${createHash("sha256").update(blob).digest("base64").replace(/=+$/, "")}`;
}

/** The name a host is looked up by: `host` on port 22, `[host]:port` otherwise (as OpenSSH writes it). */
export function knownHostsName(host: string, port: number): string {
  return port === 22 ? host : `[${host}]:${port}`;
}

/**
 * A known_hosts line for a host's key, e.g. `[10.0.0.5]:2222 ssh-ed25519 AAAA…`:
 * what `ssh-keyscan -p 2222 10.0.0.5` prints for that key. `key` is the blob
 * (or its base64, as in a `.pub` file's second field).
 */
export function formatKnownHostsLine(host: string, port: number, key: Buffer | string): string {
  const blob = typeof key === "string" ? Buffer.from(key, "base64") : key;
  const type = keyBlobType(blob);
  if (!type) throw new Error("formatKnownHostsLine: not an SSH public key blob");
  return `${knownHostsName(host, port)} ${type} ${blob.toString("base64")}`;
}

export function parseKnownHosts(text: string): ParsedKnownHosts {
  const entries: KnownHostEntry[] = [];
  const skipped: { line: number; reason: string }[] = [];
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i]!.trim();
    if (!raw || raw.startsWith("#")) continue;
    const f = raw.split(/\s+/);
    let marker: "revoked" | undefined;
    if (f[0]!.startsWith("@")) {
      const m = f.shift()!;
      if (m === "@revoked") marker = "revoked";
      else {
        skipped.push({ line: i + 1, reason: m === "@cert-authority" ? "host certificates (@cert-authority) are not supported" : `unknown marker ${m}` });
        continue;
      }
    }
    const [hosts, keyType, b64] = f;
    if (!hosts || !keyType || !b64) {
      skipped.push({ line: i + 1, reason: "expected: hosts key-type base64-key [comment]" });
      continue;
    }
    if (!/^[A-Za-z0-9+/]+={0,2}$/.test(b64)) {
      skipped.push({ line: i + 1, reason: "the key is not base64" });
      continue;
    }
    const key = Buffer.from(b64, "base64");
    const inBlob = keyBlobType(key);
    if (inBlob !== keyType) {
      skipped.push({ line: i + 1, reason: inBlob ? `the key is a ${inBlob} key, the line says ${keyType}` : "the key is not an SSH public key" });
      continue;
    }
    entries.push({ hosts, keyType, key, line: i + 1, ...(marker ? { marker } : {}) });
  }
  return { entries, skipped };
}

/** OpenSSH's wildcard match: `*` any run, `?` one character; case-insensitive. */
function wildcard(pattern: string, name: string): boolean {
  const re = new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".")}$`, "i");
  return re.test(name);
}

function hashedMatch(entry: string, name: string): boolean {
  // |1|<base64 salt>|<base64 HMAC-SHA1(salt, name)>
  const parts = entry.split("|");
  if (parts.length !== 4 || parts[0] !== "" || parts[1] !== "1") return false;
  const salt = Buffer.from(parts[2]!, "base64");
  const want = Buffer.from(parts[3]!, "base64");
  const got = createHmac("sha1", salt).update(name).digest();
  return want.length === got.length && timingSafeEqual(want, got);
}

/** Whether a line's host field covers `host` on `port`. */
export function hostsMatch(hosts: string, host: string, port: number): boolean {
  const name = knownHostsName(host, port);
  if (hosts.startsWith("|")) return hashedMatch(hosts, name);
  let matched = false;
  for (const p of hosts.split(",")) {
    if (!p) continue;
    const negated = p.startsWith("!");
    const pat = negated ? p.slice(1) : p;
    if (wildcard(pat, name)) {
      if (negated) return false;
      matched = true;
    }
  }
  return matched;
}

/** The entries for this host and port (revoked ones included). */
export function entriesFor(known: ParsedKnownHosts, host: string, port: number): KnownHostEntry[] {
  return known.entries.filter((e) => hostsMatch(e.hosts, host, port));
}

export type HostKeyVerdict = { ok: true; entry: KnownHostEntry } | { ok: false; reason: "revoked" | "mismatch" | "unknown-host" };

/**
 * Whether `blob` is a key known_hosts accepts for host:port: "revoked" when a
 * @revoked line has it (for any host, as OpenSSH does), "unknown-host" when no
 * line is for this host, "mismatch" when lines are but none has this key.
 */
export function checkHostKey(known: ParsedKnownHosts, host: string, port: number, blob: Buffer): HostKeyVerdict {
  if (known.entries.some((e) => e.marker === "revoked" && e.key.equals(blob))) return { ok: false, reason: "revoked" };
  const mine = entriesFor(known, host, port).filter((e) => !e.marker);
  if (mine.length === 0) return { ok: false, reason: "unknown-host" };
  const entry = mine.find((e) => e.key.equals(blob));
  return entry ? { ok: true, entry } : { ok: false, reason: "mismatch" };
}

/**
 * The host key algorithms to offer for the key types known for a host, in
 * the order of the client's preference, so that the server proves the key
 * known_hosts has (a server with ed25519 and RSA keys, known by its RSA key
 * only, must be asked for RSA). Empty when no usable key is known.
 */
export function hostKeyAlgorithms(keyTypes: Iterable<string>): string[] {
  const types = new Set(keyTypes);
  const order: [string, string[]][] = [
    ["ssh-ed25519", ["ssh-ed25519"]],
    ["ecdsa-sha2-nistp256", ["ecdsa-sha2-nistp256"]],
    ["ecdsa-sha2-nistp384", ["ecdsa-sha2-nistp384"]],
    ["ecdsa-sha2-nistp521", ["ecdsa-sha2-nistp521"]],
    ["ssh-rsa", ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]],
  ];
  return order.filter(([t]) => types.has(t)).flatMap(([, algos]) => algos);
}
