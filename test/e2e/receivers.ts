// Real receivers for notification tests: an SMTP server (smtp-server, with
// STARTTLS and AUTH), an HTTP endpoint, and net-snmp's snmptrapd (Debian's
// `snmptrapd`), each started by the test and recording what arrived.
import { spawn, type ChildProcess } from "node:child_process";
import { createSocket } from "node:dgram";
import { createServer, type Server } from "node:http";
import { readFile, writeFile, mkdir } from "node:fs/promises";
import path from "node:path";
import { SMTPServer } from "smtp-server";
import { REPO, waitFor } from "./harness.ts";

export const MIBS = path.join(REPO, "mibs");

export interface Mail {
  from: string;
  to: string[];
  user?: string;
  secure: boolean;
  raw: string;
  header(name: string): string | undefined;
}

export async function freeUdpPort(): Promise<number> {
  const s = createSocket("udp4");
  await new Promise<void>((r) => s.bind(0, "127.0.0.1", () => r()));
  const port = s.address().port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** SMTP on 127.0.0.1: STARTTLS offered (AUTH only after it), users from `users`; `implicitTls` for port-465 style. */
export async function startSmtp(o: { key: string; cert: string; users: Record<string, string>; implicitTls?: boolean }): Promise<{ port: number; mails: Mail[]; authFailures: number; stop(): Promise<void> }> {
  const mails: Mail[] = [];
  const state = { authFailures: 0 };
  const server = new SMTPServer({
    secure: !!o.implicitTls,
    key: o.key,
    cert: o.cert,
    authMethods: ["PLAIN", "LOGIN"],
    allowInsecureAuth: false,
    logger: false,
    onAuth(auth, _session, cb) {
      if (o.users[auth.username ?? ""] !== undefined && o.users[auth.username ?? ""] === auth.password) return cb(null, { user: auth.username });
      state.authFailures++;
      const err = Object.assign(new Error("authentication failed"), { responseCode: 535 });
      cb(err);
    },
    onData(stream, session, cb) {
      const chunks: Buffer[] = [];
      stream.on("data", (d: Buffer) => chunks.push(d));
      stream.on("end", () => {
        const raw = Buffer.concat(chunks).toString("utf8");
        const head = raw.split(/\r?\n\r?\n/)[0]!.replace(/\r?\n[ \t]+/g, " ");
        mails.push({
          from: session.envelope.mailFrom ? session.envelope.mailFrom.address : "",
          to: session.envelope.rcptTo.map((r) => r.address),
          user: session.user as string | undefined,
          secure: session.secure,
          raw,
          header: (name) => new RegExp(`^${name}:\\s*(.*)$`, "im").exec(head)?.[1]?.trim(),
        });
        cb();
      });
    },
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const port = (server.server.address() as { port: number }).port;
  return {
    port,
    mails,
    get authFailures() {
      return state.authFailures;
    },
    stop: () => new Promise<void>((r) => server.close(() => r())),
  };
}

export async function startWebhook(o: { status?: number } = {}): Promise<{ url: string; posts: { headers: Record<string, string | string[] | undefined>; body: Record<string, unknown> }[]; stop(): Promise<void> }> {
  const posts: { headers: Record<string, string | string[] | undefined>; body: Record<string, unknown> }[] = [];
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (d: Buffer) => chunks.push(d));
    req.on("end", () => {
      try {
        posts.push({ headers: req.headers, body: JSON.parse(Buffer.concat(chunks).toString("utf8")) as Record<string, unknown> });
      } catch {
        posts.push({ headers: req.headers, body: { unparsable: Buffer.concat(chunks).toString("utf8") } });
      }
      res.writeHead(o.status ?? 200).end("ok");
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  const port = (server.address() as { port: number }).port;
  return { url: `http://127.0.0.1:${port}/hooks/T0/SECRET`, posts, stop: () => new Promise<void>((r) => server.close(() => r())) };
}

export interface Trap {
  kind: string;
  state: string;
  pair: string;
  summary: string;
  id: string;
  line: string;
}

/**
 * snmptrapd on 127.0.0.1:<port>, logging to a file with our MIB loaded, accepting
 * v2c `community` and v3 users (`engineID` set: the sender's, for traps; absent:
 * snmptrapd's own, for informs).
 */
export async function startTrapd(dir: string, o: { community?: string; users?: { user: string; auth: string; priv: string; engineID?: string }[] }): Promise<{ port: number; traps(): Promise<Trap[]>; stop(): Promise<void> }> {
  await mkdir(dir, { recursive: true });
  const port = await freeUdpPort();
  const conf = [
    ...(o.community ? [`authCommunity log ${o.community}`] : []),
    ...(o.users ?? []).flatMap((u) => [`createUser ${u.engineID ? `-e 0x${u.engineID} ` : ""}${u.user} SHA ${u.auth} AES ${u.priv}`, `authUser log ${u.user}`]),
  ].join("\n");
  await writeFile(path.join(dir, "snmptrapd.conf"), conf + "\n");
  const log = path.join(dir, "traps.log");
  await writeFile(log, "");
  const p: ChildProcess = spawn("snmptrapd", ["-f", "-C", "-c", path.join(dir, "snmptrapd.conf"), "-Lf", log, "-M", `+${MIBS}`, "-m", "+UNDERSTUDY-MIB", `udp:127.0.0.1:${port}`], { env: { ...process.env, SNMP_PERSISTENT_DIR: path.join(dir, "persist") }, stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  p.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  await waitFor(`snmptrapd on udp:127.0.0.1:${port} to start (stderr: ${stderr.slice(-300)})`, async () => (await readFile(log, "utf8")).includes("NET-SNMP version"), 15_000, 50);
  const traps = async (): Promise<Trap[]> => (await readFile(log, "utf8")).split("\n").filter((l) => l.includes("understudyEventKind")).map((line) => {
    const f = (n: string) => new RegExp(`${n}\\.0 = (?:STRING|INTEGER): ([^\\t]*)`).exec(line)?.[1]?.replace(/^"|"$/g, "") ?? "";
    return { kind: f("understudyEventKind"), state: f("understudyEventState").replace(/\(\d+\)$/, ""), pair: f("understudyEventPair"), summary: f("understudyEventSummary"), id: f("understudyEventId"), line };
  });
  return {
    port,
    traps,
    stop: async () => {
      p.kill("SIGTERM");
      await new Promise((r) => (p.exitCode !== null ? r(undefined) : p.once("exit", r)));
    },
  };
}

/** Runs a net-snmp command-line tool; resolves with its output whatever the exit status. */
export function runTool(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    p.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    p.on("close", (code) => resolve({ code: code ?? 1, stdout, stderr }));
  });
}

/** stderr of net-snmp's tools without the noise about standard MIBs Debian does not ship (snmp-mibs-downloader is non-free). */
export function mibComplaints(stderr: string): string[] {
  return stderr.split("\n").filter((l) => (/UNDERSTUDY/i.test(l) || l.includes(`${MIBS}/`)) && !/^MIB search path/.test(l));
}
