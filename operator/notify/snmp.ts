// SNMP: the snmp channel's notifications (v2c with a community, v3 with a USM
// user; traps or acknowledged informs), and the operator's read-only agent
// answering GET/GETNEXT/GETBULK on the pair table of mibs/UNDERSTUDY-MIB.txt.
// net-snmp does both; the agent's table comes from the MIB itself (net-snmp's
// module store parses the file), so MIB and agent cannot drift apart.
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createHash } from "node:crypto";
import snmp, { type Agent, type Session, type Varbind } from "net-snmp";
import type { NotificationEvent, ReplicationPair } from "../api/v1alpha1/index.ts";
import type { Logger } from "../../common/log.ts";
import { DeliveryError, within, type Sender } from "./channel.ts";

export const MIB_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../mibs");
/** UNDERSTUDY-MIB::understudyMIB (experimental.7701). */
export const BASE_OID = "1.3.6.1.3.7701";
export const EVENT_OID = `${BASE_OID}.2.1`;
const EV = (n: number) => `${BASE_OID}.3.${n}.0`;
const STATE = { firing: 1, resolved: 2, info: 3 } as const;
const SEVERITY = { critical: 1, warning: 2, info: 3 } as const;

export interface SnmpConfig {
  host: string;
  port: number;
  version: "v2c" | "v3";
  notification: "trap" | "inform";
  community?: string;
  v3?: { user: string; level: "noAuthNoPriv" | "authNoPriv" | "authPriv"; authProtocol: string; privProtocol: string; authKey?: string; privKey?: string; engineID: string };
}

/** The default engine ID of a policy's v3 traps: RFC 3411 format, enterprise 8072 (net-snmp), "local" octets from the policy UID. */
export function defaultEngineId(seed: string): string {
  return `800007e580${createHash("sha256").update(seed).digest("hex").slice(0, 16)}`;
}

/** Checks a v3 configuration before anything is sent (RFC 3414 wants keys of at least 8 characters). */
export function checkSnmpConfig(c: SnmpConfig): void {
  if (c.version === "v2c" && !c.community) throw new DeliveryError("InvalidSNMPConfig", "v2c needs a community (communitySecretRef)");
  const v3 = c.v3;
  if (c.version === "v3" && v3) {
    if (v3.level !== "noAuthNoPriv" && (!v3.authKey || v3.authKey.length < 8)) throw new DeliveryError("InvalidSNMPCredentials", `v3 user ${v3.user}: authKey must be at least 8 characters (RFC 3414)`);
    if (v3.level === "authPriv" && (!v3.privKey || v3.privKey.length < 8)) throw new DeliveryError("InvalidSNMPCredentials", `v3 user ${v3.user}: privKey must be at least 8 characters (RFC 3414)`);
    if (!(v3.authProtocol in snmp.AuthProtocols)) throw new DeliveryError("InvalidSNMPConfig", `unknown authProtocol ${v3.authProtocol}`);
    if (!(v3.privProtocol in snmp.PrivProtocols)) throw new DeliveryError("InvalidSNMPConfig", `unknown privProtocol ${v3.privProtocol}`);
  }
}

export function eventVarbinds(e: NotificationEvent): Varbind[] {
  const s = (n: number, v: string): Varbind => ({ oid: EV(n), type: snmp.ObjectType.OctetString, value: v.slice(0, 255) });
  return [
    s(1, e.kind),
    { oid: EV(2), type: snmp.ObjectType.Integer, value: STATE[e.state] },
    { oid: EV(3), type: snmp.ObjectType.Integer, value: SEVERITY[e.severity] },
    s(4, `${e.namespace}/${e.pair}`),
    s(5, e.subject ?? ""),
    s(6, e.summary),
    s(7, e.id),
  ];
}

/** net-snmp's errors for v3 informs (reports from the receiver) → condition reasons. */
export function snmpError(e: unknown, where: string, c: SnmpConfig): DeliveryError {
  if (e instanceof DeliveryError) return e;
  const msg = (e as Error)?.message ?? String(e);
  if (/1\.3\.6\.1\.6\.3\.15\.1\.1\.(2|3|5|6)\.0|usmStats|Unknown user|wrong digest|authentication|decrypt/i.test(msg)) return new DeliveryError("SNMPAuthFailed", `SNMP receiver ${where} refused the v3 credentials of user ${c.v3?.user ?? "?"}: ${msg}`);
  if (/timed out|timeout/i.test(msg)) return new DeliveryError("SNMPNoAnswer", `SNMP receiver ${where} did not acknowledge the inform${c.version === "v3" ? " (receiver down, or it silently drops bad v3 credentials)" : ""}: ${msg}`);
  return new DeliveryError("SNMPFailed", `SNMP ${c.notification} to ${where}: ${msg}`);
}

export class SnmpSender implements Sender {
  private readonly c: SnmpConfig;
  private readonly where: string;
  constructor(c: SnmpConfig) {
    checkSnmpConfig(c);
    this.c = c;
    this.where = `${c.host}:${c.port}`;
  }

  private session(timeoutMs: number): Session {
    const opts = { trapPort: this.c.port, port: this.c.port, timeout: Math.max(500, Math.floor(timeoutMs / 2)), retries: 1, transport: this.c.host.includes(":") ? "udp6" : "udp4" };
    if (this.c.version === "v2c") return snmp.createSession(this.c.host, this.c.community!, { ...opts, version: snmp.Version2c });
    const v3 = this.c.v3!;
    return snmp.createV3Session(this.c.host, {
      name: v3.user,
      level: snmp.SecurityLevel[v3.level],
      ...(v3.level !== "noAuthNoPriv" ? { authProtocol: snmp.AuthProtocols[v3.authProtocol], authKey: v3.authKey } : {}),
      ...(v3.level === "authPriv" ? { privProtocol: snmp.PrivProtocols[v3.privProtocol], privKey: v3.privKey } : {}),
    }, { ...opts, version: snmp.Version3, engineID: v3.engineID.replace(/^0x/, "") });
  }

  async send(e: NotificationEvent, timeoutMs: number): Promise<void> {
    const s = this.session(timeoutMs);
    s.on("error", () => undefined);
    try {
      await within(new Promise<void>((resolve, reject) => {
        const done = (err: Error | null) => (err ? reject(err) : resolve());
        if (this.c.notification === "inform") s.inform(EVENT_OID, eventVarbinds(e), {}, done);
        else s.trap(EVENT_OID, eventVarbinds(e), done);
      }), timeoutMs, `SNMP ${this.c.notification} to ${this.where}`);
    } catch (err) {
      throw snmpError(err, this.where, this.c);
    } finally {
      s.close();
    }
  }

  close(): void {}
}

export interface PairRow {
  name: string;
  phase: string;
  activeSide: string;
  lagMillis: number;
  queuedBytes: number;
  lastVerify: string;
}

export function pairRow(p: ReplicationPair): PairRow {
  const st = p.status ?? {};
  const v = st.lastVerify;
  return {
    name: `${p.metadata.namespace}/${p.metadata.name}`,
    phase: st.phase ?? "Pending",
    activeSide: st.activeSide ?? "source",
    lagMillis: Math.min(0xffffffff, Math.round((st.lagSeconds ?? 0) * 1000)),
    queuedBytes: Math.min(0xffffffff, st.queuedBytes ?? 0),
    lastVerify: v?.result ? [v.result, v.target ?? "", v.finishedAt ?? v.startedAt ?? "", String(v.differences ?? 0)].join(" ") : "",
  };
}

const TABLE = "understudyPairEntry";

/**
 * The read-only SNMP agent (v2c communities). Rows are rebuilt from the pair
 * cache at most once a second, on demand: net-snmp serves from its own MIB
 * object, so a refresh timer keeps it current.
 */
export class PairTableAgent {
  private agent?: Agent;
  private timer?: NodeJS.Timeout;
  private rows = 0;
  private readonly o: { address: string; port: number; communities: string[]; pairs: () => readonly ReplicationPair[]; log: Logger; refreshMs?: number };
  constructor(o: { address: string; port: number; communities: string[]; pairs: () => readonly ReplicationPair[]; log: Logger; refreshMs?: number }) {
    this.o = o;
  }

  async start(): Promise<void> {
    const store = snmp.createModuleStore();
    store.loadFromFile(path.join(MIB_DIR, "UNDERSTUDY-MIB.txt"));
    const providers = store.getProvidersForModule("UNDERSTUDY-MIB");
    await new Promise<void>((resolve, reject) => {
      const agent = snmp.createAgent({ port: this.o.port, address: this.o.address, transport: this.o.address.includes(":") ? "udp6" : "udp4", disableAuthorization: false }, (err) => {
        if (err) this.o.log.debug({ err: err.message }, "snmp agent: request refused");
      });
      this.agent = agent;
      for (const c of this.o.communities) agent.getAuthorizer().addCommunity(c);
      agent.getMib().registerProviders(providers);
      // net-snmp binds asynchronously and reports bind errors on the socket only: give it a tick.
      const sock = (agent as unknown as { listener?: { sockets?: Record<string, { once(ev: string, cb: (e?: Error) => void): void }> } }).listener?.sockets;
      const first = sock ? Object.values(sock)[0] : undefined;
      if (!first) return resolve();
      first.once("listening", () => resolve());
      first.once("error", (e?: Error) => reject(new Error(`snmp agent cannot listen on ${this.o.address}:${this.o.port}: ${e?.message}`)));
    });
    this.refresh();
    this.timer = setInterval(() => this.refresh(), this.o.refreshMs ?? 1000);
    this.timer.unref();
    this.o.log.info({ address: `${this.o.address}:${this.o.port}` }, "snmp agent listening (UNDERSTUDY-MIB::understudyPairTable)");
  }

  /** Rebuild the table from the cache (rows numbered 1.. in namespace/name order). */
  refresh(): void {
    const mib = this.agent?.getMib();
    if (!mib) return;
    const rows = this.o.pairs().map(pairRow).sort((a, b) => a.name.localeCompare(b.name));
    for (let i = 1; i <= this.rows; i++) {
      try {
        mib.deleteTableRow(TABLE, [i]);
      } catch {
        // already gone
      }
    }
    rows.forEach((r, i) => mib.addTableRow(TABLE, [i + 1, r.name, r.phase, r.activeSide, r.lagMillis, r.queuedBytes, r.lastVerify]));
    this.rows = rows.length;
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await new Promise<void>((r) => (this.agent ? this.agent.close(() => r()) : r()));
  }
}
