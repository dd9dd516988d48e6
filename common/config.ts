// The one config loader: YAML agent config, validated with zod. Errors name
// the offending field (e.g. `source.sets[0].targets[1]: expected host:port`).
// Relative paths are resolved against the directory of the config file.
import { readFile } from "node:fs/promises";
import path from "node:path";
import { isIP } from "node:net";
import YAML from "yaml";
import { z } from "zod";

const UNITS: Record<string, number> = { "": 1, b: 1, k: 1024, kb: 1000, kib: 1024, m: 1024 ** 2, mb: 1e6, mib: 1024 ** 2, g: 1024 ** 3, gb: 1e9, gib: 1024 ** 3, t: 1024 ** 4, tb: 1e12, tib: 1024 ** 4 };

/** "64KiB", "1.5 GiB", 4096 → bytes. */
export function parseSize(v: string | number): number {
  if (typeof v === "number") return v;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(v);
  const mult = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || mult === undefined) throw new Error(`not a size: ${JSON.stringify(v)} (use e.g. 4096, 64KiB, 10MiB, 1GiB)`);
  return Math.round(Number(m[1]) * mult);
}

/** "250ms", "30s", "5m", "1h", 12 (seconds) → milliseconds. */
export function parseDuration(v: string | number): number {
  if (typeof v === "number") return v * 1000;
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(v);
  if (!m) throw new Error(`not a duration: ${JSON.stringify(v)} (use e.g. 500ms, 30s, 5m, 1h)`);
  const mult = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] ?? "s"]!;
  return Math.round(Number(m[1]) * mult);
}

const size = z.union([z.number().int().nonnegative(), z.string()]).transform((v, ctx) => {
  try {
    return parseSize(v);
  } catch (e) {
    ctx.addIssue({ code: "custom", message: (e as Error).message });
    return z.NEVER;
  }
});
const duration = z.union([z.number().nonnegative(), z.string()]).transform((v, ctx) => {
  try {
    return parseDuration(v);
  } catch (e) {
    ctx.addIssue({ code: "custom", message: (e as Error).message });
    return z.NEVER;
  }
});

export function splitHostPort(addr: string): { host: string; port: number } | undefined {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(addr);
  if (!m) return undefined;
  const port = Number(m[3]);
  if (port > 65535) return undefined;
  return { host: (m[1] ?? m[2])!, port };
}

/** host:port, with an IPv6 host in brackets: the inverse of splitHostPort. */
export function joinHostPort(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

export function isLoopback(host: string): boolean {
  if (host === "localhost") return true;
  if (isIP(host) === 4) return host.startsWith("127.");
  return host === "::1";
}

const hostPort = z.string().refine((s) => splitHostPort(s) !== undefined, { message: "expected host:port (e.g. 127.0.0.1:7702)" });
const name = z.string().regex(/^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$/, "expected a lowercase name of letters, digits, '.', '_' or '-' (at most 63)");

export const CompressionSchema = z.enum(["none", "fast", "balanced", "max"]);
export type CompressionLevel = z.infer<typeof CompressionSchema>;

const SetSchema = z
  .object({
    name,
    path: z.string().min(1),
    include: z.array(z.string().min(1)).default(["**"]),
    exclude: z.array(z.string().min(1)).default([]),
    targets: z.array(hostPort).min(1, "a replication set needs at least one target"),
    mode: z.enum(["continuous", "scheduled"]).default("continuous"),
    /** scheduled mode: ship what accumulated every this often */
    interval: duration.optional(),
    compression: CompressionSchema.default("fast"),
    /** bytes per second on the wire for this set, per target; 0 = unlimited */
    bandwidthLimit: size.prefault(0),
    blockSize: size.prefault(64 * 1024).refine((n) => n >= 4096 && n <= 16 * 1024 * 1024 && (n & (n - 1)) === 0, "blockSize must be a power of two between 4KiB and 16MiB"),
    /** send queue held in memory; beyond it the journal is read back from disk */
    queueMemory: size.prefault(32 * 1024 * 1024),
    /** full metadata rescan as a safety net for missed events; 0 = never */
    rescanInterval: duration.prefault(300),
    /** compare every target with the source this often; 0 = only on command */
    verifyInterval: duration.prefault(0),
    /** repair what a scheduled verify finds */
    verifyRepair: z.boolean().default(false),
    /** fencing epoch sent to targets (the operator raises it at failover/failback) */
    epoch: z.number().int().nonnegative().default(0),
    /**
     * whole-server preset (docs/whole-server.md): /proc, /sys, /dev, /run,
     * /tmp, /var/tmp, /mnt, /media kept as empty directories, lost+found, swap
     * files and the agent's own state left out, other file systems not entered
     */
    wholeServer: z.boolean().default(false),
  })
  .strict()
  .refine((s) => s.mode !== "scheduled" || (s.interval ?? 0) > 0, { message: "scheduled mode needs `interval` (e.g. 5m)", path: ["interval"] });

const TlsSchema = z.union([
  z.object({ insecure: z.literal(true) }).strict(),
  z.object({ insecure: z.literal(false).optional(), ca: z.string(), cert: z.string(), key: z.string() }).strict(),
]);

export const AgentConfigSchema = z
  .object({
    name,
    listen: hostPort,
    dataDir: z.string().min(1),
    tls: TlsSchema,
    source: z.object({ sets: z.array(SetSchema).default([]) }).strict().optional(),
    control: z
      .object({
        /**
         * CNs of client certificates (besides the agent's own) that may change
         * this agent: configure and remove sets, start mirrors and verifies.
         */
        admins: z.array(z.string().min(1)).default(["understudy-operator"]),
        /** let admins run commands on this host (failover actions); off by default */
        allowCommands: z.boolean().default(false),
      })
      .strict()
      .prefault({}),
    target: z
      .object({
        root: z.string().min(1),
        /** how often applied data is made durable (fsync) and acknowledged */
        syncInterval: duration.prefault("50ms"),
      })
      .strict()
      .optional(),
  })
  .strict()
  .superRefine((c, ctx) => {
    if (!c.tls.insecure) return;
    const addrs = [["listen", c.listen] as const, ...(c.source?.sets ?? []).flatMap((s, i) => s.targets.map((t, j) => [`source.sets[${i}].targets[${j}]`, t] as const))];
    for (const [where, a] of addrs) {
      const hp = splitHostPort(a);
      if (hp && !isLoopback(hp.host)) ctx.addIssue({ code: "custom", path: where.split(/[.[\]]+/).filter(Boolean).map((p) => (/^\d+$/.test(p) ? Number(p) : p)), message: `tls.insecure is allowed only on loopback, but ${a} is not; configure tls.ca/cert/key (see \`understudy certs\`)` });
    }
    const names = new Set<string>();
    for (const [i, s] of (c.source?.sets ?? []).entries()) {
      if (names.has(s.name)) ctx.addIssue({ code: "custom", path: ["source", "sets", i, "name"], message: `duplicate set name ${s.name}` });
      names.add(s.name);
    }
  });

export type AgentConfig = z.infer<typeof AgentConfigSchema>;
export type SetConfig = z.infer<typeof SetSchema>;
export type TlsConfig = z.infer<typeof TlsSchema>;

export class ConfigError extends Error {}

function formatIssues(file: string, err: z.ZodError): string {
  const lines = err.issues.map((i) => {
    const where = i.path.map((p, k) => (typeof p === "number" ? `[${p}]` : k === 0 ? String(p) : `.${String(p)}`)).join("") || "(top level)";
    return `  ${where}: ${i.message}`;
  });
  return `invalid config ${file}:\n${lines.join("\n")}`;
}

/** Validate an already-parsed object; `base` resolves relative paths. */
export function parseAgentConfig(raw: unknown, base: string, file = "<config>"): AgentConfig {
  const r = AgentConfigSchema.safeParse(raw);
  if (!r.success) throw new ConfigError(formatIssues(file, r.error));
  const c = r.data;
  const abs = (p: string) => path.resolve(base, p);
  c.dataDir = abs(c.dataDir);
  if (c.tls.insecure !== true) c.tls = { ...c.tls, ca: abs(c.tls.ca), cert: abs(c.tls.cert), key: abs(c.tls.key) };
  for (const s of c.source?.sets ?? []) s.path = abs(s.path);
  if (c.target) c.target.root = abs(c.target.root);
  return c;
}

/**
 * Validate one replication set given over the control service (the operator's
 * managed sets), with the same rules as a set in the config file.
 */
export function parseSetConfig(raw: unknown, insecure: boolean): SetConfig {
  const r = SetSchema.safeParse(raw);
  if (!r.success) throw new ConfigError(formatIssues("replication set", r.error));
  const s = r.data;
  if (!path.isAbsolute(s.path)) throw new ConfigError(`replication set ${s.name}: path must be absolute, not ${JSON.stringify(s.path)}`);
  if (insecure) {
    for (const t of s.targets) {
      const hp = splitHostPort(t);
      if (hp && !isLoopback(hp.host)) throw new ConfigError(`replication set ${s.name}: target ${t} is not on loopback, and this agent runs with tls.insecure`);
    }
  }
  return s;
}

export async function loadAgentConfig(file: string): Promise<AgentConfig> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (e) {
    throw new ConfigError(`cannot read config ${file}: ${(e as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = YAML.parse(text);
  } catch (e) {
    throw new ConfigError(`config ${file} is not valid YAML: ${(e as Error).message}`);
  }
  return parseAgentConfig(raw, path.dirname(path.resolve(file)), file);
}
