// NotificationPolicy controller: turns what the ReplicationPairs' status shows
// into messages on the policy's channels (email, webhook, SNMP).
//
// - It never sits on the pair reconcile path: it reads the pair cache, keeps
//   its own timers, and every delivery runs on its own with a deadline, so a
//   dead SMTP host or a wrong password cannot slow reconciling or failover.
// - What was sent (alerts raised, one-shots already announced) and what is
//   still to send (the outbox) live in the policy's status, written by the
//   leader only: a restarted operator or a new leader goes on from there
//   instead of announcing everything again. Delivery is at least once (a
//   crash between send and status write repeats that one message, with the
//   same event id).
// - Failed deliveries are retried with backoff (common/retry.ts) and shown per
//   channel (last sent, last error) and in the conditions Ready, ConfigValid
//   and Delivering, whose reason and message name the channel and the cause.
import { ApiException, CoreV1Api, CustomObjectsApi, PatchStrategy, setHeaderOptions, type KubeConfig } from "@kubernetes/client-node";
import { parseDuration, parseSize } from "../../common/config.ts";
import type { Logger } from "../../common/log.ts";
import { Backoff } from "../../common/retry.ts";
import { Gauge, type Registry } from "prom-client";
import { GROUP, NOTIFICATION_POLICIES, VERSION, setCondition, timestamp, type AlertState, type ChannelStatus, type Condition, type Delivery, type EventMark, type NotificationChannel, type NotificationEvent, type NotificationPolicy, type NotificationPolicyStatus, type ReplicationPair } from "../api/v1alpha1/index.ts";
import { crInformer } from "../kube.ts";
import { errText } from "../runtime/leader-election.ts";
import { DeliveryError, type Sender } from "../notify/channel.ts";
import { forget, observe, serversOf, step } from "../notify/derive.ts";
import { EmailSender } from "../notify/email.ts";
import { PairTableAgent, SnmpSender, defaultEngineId } from "../notify/snmp.ts";
import { WebhookSender } from "../notify/webhook.ts";
import { selects } from "./known-good.ts";

const merge = setHeaderOptions("Content-Type", PatchStrategy.MergePatch);
/** Deliveries kept per channel; beyond it the oldest are dropped (and counted). */
const OUTBOX_PER_CHANNEL = 50;
/** Channels (and the Secrets they name) are re-read this often, and email logins re-checked. */
const CHANNEL_REFRESH_MS = 60_000;

/** Reads the Secrets channels name (in the policy's namespace). */
export interface SecretReader {
  read(namespace: string, name: string): Promise<Record<string, string>>;
}

export interface NotificationDeps {
  policy(namespace: string, name: string): NotificationPolicy | undefined;
  policies(): readonly NotificationPolicy[];
  pairs(namespace: string): readonly ReplicationPair[];
  secrets: SecretReader;
  writeStatus(p: NotificationPolicy, status: NotificationPolicyStatus): Promise<void>;
  log: Logger;
  now?: () => Date;
  /** How often every policy is looked at even without a change (grace periods, retries). */
  tickMs?: number;
  /** Every pair (all namespaces), for the understudy_pair_problem metric the chart's PrometheusRule alerts on. */
  allPairs?(): readonly ReplicationPair[];
  problemGauge?: Gauge<"namespace" | "name" | "kind" | "subject">;
}

interface ChannelRuntime {
  name: string;
  type: "email" | "webhook" | "snmp";
  sender?: Sender;
  /** The channel cannot work as configured (Secret missing, bad URL, ...). */
  configError?: DeliveryError;
  /** Checking it (email: connect and log in) failed. */
  verifyError?: DeliveryError;
  timeoutMs: number;
  busy: boolean;
  engineID?: string;
}

interface PolicyRuntime {
  key: string;
  uid: string;
  status: NotificationPolicyStatus;
  channels: Map<string, ChannelRuntime>;
  channelsFor?: string;
  channelsAt: number;
  resolving?: Promise<void>;
  writing: boolean;
  dirty: boolean;
  written: string;
  evaluating: boolean;
  again: boolean;
}

export class SecretNotReadable extends DeliveryError {}

export class KubeSecretReader implements SecretReader {
  private readonly api: CoreV1Api;
  private readonly cache = new Map<string, { at: number; data: Record<string, string> }>();
  constructor(kc: KubeConfig) {
    this.api = kc.makeApiClient(CoreV1Api);
  }

  async read(namespace: string, name: string): Promise<Record<string, string>> {
    const k = `${namespace}/${name}`;
    const hit = this.cache.get(k);
    if (hit && Date.now() - hit.at < 30_000) return hit.data;
    try {
      const s = await this.api.readNamespacedSecret({ name, namespace });
      const data: Record<string, string> = { ...(s.stringData ?? {}) };
      for (const [key, v] of Object.entries(s.data ?? {})) data[key] = Buffer.from(v, "base64").toString("utf8");
      this.cache.set(k, { at: Date.now(), data });
      return data;
    } catch (e) {
      if (e instanceof ApiException && e.code === 404) throw new SecretNotReadable("SecretNotFound", `Secret ${name} not found in namespace ${namespace}`);
      if (e instanceof ApiException && e.code === 403) throw new SecretNotReadable("SecretForbidden", `the operator may not read Secret ${name} in namespace ${namespace} (the chart grants get on Secrets only in notifications.secretNamespaces)`);
      throw new SecretNotReadable("SecretUnreadable", `Secret ${name} in namespace ${namespace}: ${errText(e)}`);
    }
  }
}

function key(p: { metadata: { namespace?: string; name?: string } }): string {
  return `${p.metadata.namespace}/${p.metadata.name}`;
}

function channelType(c: NotificationChannel): ChannelRuntime["type"] {
  return c.email ? "email" : c.webhook ? "webhook" : "snmp";
}

/** Build a channel's sender from its spec and Secrets; a DeliveryError says what is wrong. */
export async function buildSender(ns: string, c: NotificationChannel, secrets: SecretReader, uid: string): Promise<{ sender: Sender; engineID?: string }> {
  const secretKey = async (ref: { name: string; key?: string }, dflt: string, field: string): Promise<string> => {
    const data = await secrets.read(ns, ref.name);
    const k = ref.key ?? dflt;
    const v = data[k];
    if (v === undefined || v === "") throw new DeliveryError("SecretKeyMissing", `${field}: Secret ${ref.name} has no key ${k}`);
    return v;
  };
  if (c.email) {
    const e = c.email;
    let auth: { user: string; pass: string } | undefined;
    if (e.authSecretRef) {
      const user = await secretKey({ name: e.authSecretRef.name, key: "username" }, "username", "email.authSecretRef");
      const pass = await secretKey({ name: e.authSecretRef.name, key: "password" }, "password", "email.authSecretRef");
      auth = { user, pass };
    }
    const ca = e.caSecretRef ? await secretKey(e.caSecretRef, "ca.crt", "email.caSecretRef") : undefined;
    return { sender: new EmailSender({ host: e.host, ...(e.port ? { port: e.port } : {}), security: e.security ?? "starttls", ...(ca ? { ca } : {}), ...(auth ? { auth } : {}), from: e.from, to: e.to ?? [], recipients: e.recipients ?? [] }) };
  }
  if (c.webhook) {
    const w = c.webhook;
    const url = w.url ?? (await secretKey(w.urlSecretRef!, "url", "webhook.urlSecretRef"));
    const headers = w.headersSecretRef ? await secrets.read(ns, w.headersSecretRef.name) : {};
    for (const h of Object.keys(headers)) if (!/^[A-Za-z0-9-]+$/.test(h)) throw new DeliveryError("InvalidWebhookHeader", `webhook.headersSecretRef: key ${JSON.stringify(h)} of Secret ${w.headersSecretRef!.name} is not an HTTP header name`);
    const ca = w.caSecretRef ? await secretKey(w.caSecretRef, "ca.crt", "webhook.caSecretRef") : undefined;
    return { sender: new WebhookSender({ url, format: w.format ?? "json", headers, ...(ca ? { ca } : {}) }) };
  }
  const s = c.snmp!;
  if (s.version === "v2c") {
    const community = await secretKey(s.communitySecretRef!, "community", "snmp.communitySecretRef");
    return { sender: new SnmpSender({ host: s.host, port: s.port ?? 162, version: "v2c", notification: s.notification ?? "inform", community }) };
  }
  const v3 = s.v3!;
  const creds = v3.level === "noAuthNoPriv" ? {} : await secrets.read(ns, v3.credentialsSecretRef!.name);
  const engineID = (v3.engineID ?? defaultEngineId(`${uid}/${c.name}`)).replace(/^0x/, "");
  return {
    engineID,
    sender: new SnmpSender({ host: s.host, port: s.port ?? 162, version: "v3", notification: s.notification ?? "inform", v3: { user: v3.user, level: v3.level, authProtocol: v3.authProtocol ?? "sha", privProtocol: v3.privProtocol ?? "aes", ...(creds.authKey ? { authKey: creds.authKey } : {}), ...(creds.privKey ? { privKey: creds.privKey } : {}), engineID } }),
  };
}

/** Conditions from the channels' state: ConfigValid, Delivering and Ready. */
export function policyConditions(prev: Condition[] | undefined, channels: { name: string; type: string; configError?: DeliveryError; verifyError?: DeliveryError; status?: ChannelStatus }[], generation: number, now: Date): Condition[] {
  const conds = (prev ?? []).map((c) => ({ ...c }));
  const cfg = channels.filter((c) => c.configError);
  const del = channels.filter((c) => !c.configError && (c.verifyError || (c.status?.consecutiveFailures ?? 0) > 0));
  const say = (c: (typeof channels)[number], e?: { reason?: string; message: string }) => `channel ${c.name} (${c.type}): ${e?.message ?? ""}`;
  const cfgC = cfg.length ? { status: "False" as const, reason: cfg[0]!.configError!.reason, message: cfg.map((c) => say(c, c.configError)).join("; ") } : { status: "True" as const, reason: "ChannelsValid", message: `${channels.length} channel(s) configured` };
  const delErr = (c: (typeof channels)[number]) => (c.status?.consecutiveFailures ? { reason: c.status.lastErrorReason ?? "DeliveryFailed", message: `${c.status.lastError} (${c.status.consecutiveFailures} failed attempt(s), ${c.status.pending ?? 0} waiting; retried with backoff)` } : c.verifyError!);
  const delC = del.length ? { status: "False" as const, reason: delErr(del[0]!).reason, message: del.map((c) => say(c, delErr(c))).join("; ") } : { status: "True" as const, reason: "Delivering", message: "every channel delivers (or has had nothing to send)" };
  setCondition(conds, { type: "ConfigValid", ...cfgC }, generation, now);
  setCondition(conds, { type: "Delivering", ...delC }, generation, now);
  const bad = cfgC.status === "False" ? cfgC : delC.status === "False" ? delC : undefined;
  setCondition(conds, { type: "Ready", ...(bad ?? { status: "True", reason: "Ready", message: `${channels.length} channel(s) ready` }) }, generation, now);
  return conds;
}

export class NotificationController {
  private readonly d: NotificationDeps;
  private readonly rts = new Map<string, PolicyRuntime>();
  private timer?: NodeJS.Timeout;
  private running = false;
  private readonly pendingTouch = new Set<string>();
  private touchTimer?: NodeJS.Timeout;
  private readonly everSeen = new Set<string>();

  constructor(d: NotificationDeps) {
    this.d = d;
  }

  private now(): Date {
    return this.d.now?.() ?? new Date();
  }

  /** Begin acting (the leader only): every policy now and then every tick. */
  start(): void {
    if (this.running) return;
    this.running = true;
    this.timer = setInterval(() => (this.touchAll(), this.exportProblems()), this.d.tickMs ?? 2000);
    this.timer.unref();
    this.touchAll();
  }

  stop(): void {
    this.running = false;
    clearInterval(this.timer);
    clearTimeout(this.touchTimer);
    for (const rt of this.rts.values()) for (const c of rt.channels.values()) c.sender?.close();
  }

  /** understudy_pair_problem: 1 per problem a pair shows now (no grace period: Prometheus rules have their own `for`). */
  exportProblems(): void {
    const g = this.d.problemGauge;
    if (!g || !this.d.allPairs) return;
    g.reset();
    // "Has been known good" as the policies remember it, and as seen by this process.
    for (const p of this.d.policies()) for (const m of p.status?.marks ?? []) if (m.key === "seen") this.everSeen.add(`${p.metadata.namespace}/${m.pair}|${m.kind}|${m.subject ?? ""}`);
    const ids = new Set(this.d.allPairs().map((x) => `${x.metadata.namespace}/${x.metadata.name}`));
    for (const k of this.everSeen) if (!ids.has(k.split("|")[0]!)) this.everSeen.delete(k);
    for (const pair of this.d.allPairs()) {
      const { problems, seen } = observe(pair, { lagSeconds: Infinity, queuedBytes: Infinity, graceMs: 0 });
      const id = `${pair.metadata.namespace}/${pair.metadata.name}`;
      for (const x of seen) this.everSeen.add(`${id}|${x.kind}|${x.subject}`);
      for (const x of problems) if (!x.holdOnly && (!x.needsMark || this.everSeen.has(`${id}|${x.needsMark}`))) g.set({ namespace: pair.metadata.namespace!, name: pair.metadata.name!, kind: x.kind, subject: x.subject ?? "" }, 1);
    }
  }

  touchAll(): void {
    for (const p of this.d.policies()) this.touch(key(p));
  }

  /** Something changed in a namespace (a pair or a policy): look at its policies soon. */
  touchNamespace(ns: string | undefined): void {
    for (const p of this.d.policies()) if (!ns || p.metadata.namespace === ns) this.touch(key(p));
  }

  touch(k: string): void {
    if (!this.running) return;
    this.pendingTouch.add(k);
    this.touchTimer ??= setTimeout(() => {
      this.touchTimer = undefined;
      const keys = [...this.pendingTouch];
      this.pendingTouch.clear();
      for (const x of keys) void this.evaluate(x).catch((e) => this.d.log.warn({ policy: x, err: errText(e) }, "notification policy evaluation failed"));
    }, 100);
  }

  /** Waits for in-flight work of a policy (tests). */
  runtime(k: string): PolicyRuntime | undefined {
    return this.rts.get(k);
  }

  async evaluate(k: string): Promise<void> {
    const [ns, name] = k.split("/") as [string, string];
    const p = this.d.policy(ns, name);
    let rt = this.rts.get(k);
    if (!p) {
      if (rt) for (const c of rt.channels.values()) c.sender?.close();
      this.rts.delete(k);
      return;
    }
    if (!rt || rt.uid !== p.metadata.uid) {
      rt = { key: k, uid: p.metadata.uid ?? "", status: JSON.parse(JSON.stringify(p.status ?? {})) as NotificationPolicyStatus, channels: new Map(), channelsAt: 0, writing: false, dirty: false, written: JSON.stringify(p.status ?? {}), evaluating: false, again: false };
      this.rts.set(k, rt);
    }
    if (rt.evaluating) {
      rt.again = true;
      return;
    }
    rt.evaluating = true;
    try {
      await this.refreshChannels(rt, p);
      this.derive(rt, p);
      this.scheduleWrite(rt, p);
      this.pump(rt, p);
    } finally {
      rt.evaluating = false;
      if (rt.again) {
        rt.again = false;
        this.touch(k);
      }
    }
  }

  private async refreshChannels(rt: PolicyRuntime, p: NotificationPolicy): Promise<void> {
    const want = JSON.stringify([p.metadata.generation, p.spec.channels]);
    if (rt.channelsFor === want && Date.now() - rt.channelsAt < CHANNEL_REFRESH_MS) return;
    const ns = p.metadata.namespace!;
    const next = new Map<string, ChannelRuntime>();
    for (const c of p.spec.channels) {
      let timeoutMs = 10_000;
      try {
        timeoutMs = parseDuration(c.timeout ?? "10s");
      } catch {
        // the CRD checks the format
      }
      // One object per channel for its whole life: a delivery in flight holds it (and its busy flag).
      const ch: ChannelRuntime = rt.channels.get(c.name) ?? { name: c.name, type: channelType(c), timeoutMs, busy: false };
      ch.type = channelType(c);
      ch.timeoutMs = timeoutMs;
      const old = ch.sender;
      delete ch.sender;
      delete ch.configError;
      delete ch.engineID;
      try {
        const built = await buildSender(ns, c, this.d.secrets, rt.uid);
        ch.sender = built.sender;
        if (built.engineID) ch.engineID = built.engineID;
      } catch (e) {
        ch.configError = e instanceof DeliveryError ? e : new DeliveryError("InvalidChannel", errText(e));
        delete ch.verifyError;
      }
      old?.close();
      next.set(c.name, ch);
      // Email can be checked without sending anything: connect, STARTTLS, log in. Off the path, with a deadline.
      const sender = ch.sender;
      if (sender?.verify) {
        void sender.verify(ch.timeoutMs).then(
          () => {
            if (ch.sender === sender) delete ch.verifyError;
          },
          (e: unknown) => {
            if (ch.sender === sender) ch.verifyError = e instanceof DeliveryError ? e : new DeliveryError("VerifyFailed", errText(e));
          },
        ).finally(() => this.touch(rt.key));
      }
    }
    for (const [name, ch] of rt.channels) if (!next.has(name)) ch.sender?.close();
    rt.channels = next;
    rt.channelsFor = want;
    rt.channelsAt = Date.now();
  }

  /** The pure part: pairs' status → alerts, marks and new deliveries; then channel status and conditions. */
  private derive(rt: PolicyRuntime, p: NotificationPolicy): void {
    const now = this.now();
    const ns = p.metadata.namespace!;
    const th = p.spec.thresholds ?? {};
    const thresholds = { lagSeconds: parseDuration(th.lag ?? "5m") / 1000, queuedBytes: parseSize(th.queuedBytes ?? "1GiB"), graceMs: parseDuration(th.gracePeriod ?? "2m") };
    const selected = this.d.pairs(ns).filter((x) => selects(p as never, x.metadata.labels ?? {}));
    const st = rt.status;
    const byPair = <T extends { pair: string }>(xs: T[] | undefined) => {
      const m = new Map<string, T[]>();
      for (const x of xs ?? []) m.set(x.pair, [...(m.get(x.pair) ?? []), x]);
      return m;
    };
    const alerts = byPair<AlertState>(st.alerts);
    const marks = byPair<EventMark>(st.marks);
    const nextAlerts: AlertState[] = [];
    const nextMarks: EventMark[] = [];
    const events: NotificationEvent[] = [];
    const notBefore = p.metadata.creationTimestamp ? timestamp(new Date(p.metadata.creationTimestamp as unknown as string)) : "";
    for (const pair of selected) {
      const name = pair.metadata.name!;
      const { problems, oneShots, seen } = observe(pair, thresholds);
      const out = step({ policyUid: rt.uid, namespace: ns, pair: name, kinds: p.spec.events ?? [], problems, oneShots, seen, alerts: alerts.get(name) ?? [], marks: marks.get(name) ?? [], graceMs: thresholds.graceMs, notBefore, servers: serversOf(pair), now });
      nextAlerts.push(...out.alerts);
      nextMarks.push(...out.marks);
      events.push(...out.events);
      alerts.delete(name);
    }
    for (const [pair, gone] of alerts) events.push(...forget({ policyUid: rt.uid, namespace: ns, pair, alerts: gone, now }));
    st.alerts = nextAlerts;
    st.marks = nextMarks;
    const outbox: Delivery[] = (st.outbox ?? []).filter((d) => rt.channels.has(d.channel));
    const chStatus = new Map((st.channels ?? []).map((c) => [c.name, c]));
    for (const e of events) {
      this.d.log.info({ policy: rt.key, kind: e.kind, state: e.state, pair: `${e.namespace}/${e.pair}`, subject: e.subject, id: e.id }, "notification");
      for (const ch of rt.channels.values()) {
        if (outbox.some((d) => d.id === `${e.id}.${ch.name}`)) continue;
        outbox.push({ id: `${e.id}.${ch.name}`, channel: ch.name, attempts: 0, event: e });
      }
    }
    // Bound each channel's backlog (a channel that cannot deliver must not grow the status without end).
    for (const ch of rt.channels.values()) {
      const mine = outbox.filter((d) => d.channel === ch.name);
      if (mine.length <= OUTBOX_PER_CHANNEL) continue;
      const drop = new Set(mine.slice(0, mine.length - OUTBOX_PER_CHANNEL).map((d) => d.id));
      for (let i = outbox.length - 1; i >= 0; i--) if (drop.has(outbox[i]!.id)) outbox.splice(i, 1);
      const cs = chStatus.get(ch.name) ?? { name: ch.name };
      cs.dropped = (cs.dropped ?? 0) + drop.size;
      chStatus.set(ch.name, cs);
    }
    st.outbox = outbox;
    st.channels = [...rt.channels.values()].map((ch) => {
      const cs: ChannelStatus = { ...(chStatus.get(ch.name) ?? { name: ch.name }), name: ch.name, type: ch.type, pending: outbox.filter((d) => d.channel === ch.name).length };
      if (ch.engineID) cs.engineID = ch.engineID;
      const err = ch.configError ?? ch.verifyError;
      if (err && cs.lastError !== err.message) {
        cs.lastError = err.message;
        cs.lastErrorReason = err.reason;
        cs.lastErrorTime = timestamp(now);
      }
      return cs;
    });
    st.observedGeneration = p.metadata.generation;
    st.matchedPairs = selected.length;
    st.firing = nextAlerts.filter((a) => a.firedAt).length;
    st.conditions = policyConditions(st.conditions as Condition[] | undefined, [...rt.channels.values()].map((ch) => ({ ...ch, status: st.channels!.find((c) => c.name === ch.name) })), p.metadata.generation ?? 0, now);
  }

  /** Start the next due delivery of every idle channel (one at a time per channel: order is kept). */
  private pump(rt: PolicyRuntime, p: NotificationPolicy): void {
    const now = this.now().getTime();
    const maxAttempts = p.spec.retry?.maxAttempts ?? 20;
    let maxBackoffMs = 300_000;
    try {
      maxBackoffMs = parseDuration(p.spec.retry?.maxBackoff ?? "5m");
    } catch {
      // the CRD checks the format
    }
    for (const ch of rt.channels.values()) {
      if (ch.busy || !ch.sender) continue;
      const d = rt.status.outbox?.find((x) => x.channel === ch.name);
      if (!d || (d.nextAttemptAt && Date.parse(d.nextAttemptAt) > now)) continue;
      ch.busy = true;
      const sender = ch.sender;
      void sender.send(d.event, ch.timeoutMs).then(
        () => this.delivered(rt, ch.name, d, undefined, maxAttempts, maxBackoffMs),
        (e: unknown) => this.delivered(rt, ch.name, d, e instanceof DeliveryError ? e : new DeliveryError("DeliveryFailed", errText(e)), maxAttempts, maxBackoffMs),
      ).finally(() => {
        ch.busy = false;
        const cur = this.d.policy(p.metadata.namespace!, p.metadata.name!);
        if (cur && this.running) {
          this.scheduleWrite(rt, cur);
          this.pump(rt, cur);
        }
      });
    }
  }

  private delivered(rt: PolicyRuntime, channel: string, d: Delivery, err: DeliveryError | undefined, maxAttempts: number, maxBackoffMs: number): void {
    const now = this.now();
    const st = rt.status;
    const cs = st.channels?.find((c) => c.name === channel);
    const idx = st.outbox?.findIndex((x) => x.id === d.id) ?? -1;
    if (!err) {
      if (idx >= 0) st.outbox!.splice(idx, 1);
      if (cs) {
        cs.lastSentTime = timestamp(now);
        cs.lastSentEvent = `${d.event.kind}/${d.event.state}`;
        cs.delivered = (cs.delivered ?? 0) + 1;
        cs.consecutiveFailures = 0;
      }
      const ch = rt.channels.get(channel);
      if (ch) delete ch.verifyError;
      this.d.log.info({ policy: rt.key, channel, kind: d.event.kind, state: d.event.state, id: d.event.id }, "notification delivered");
    } else {
      const attempts = d.attempts + 1;
      const b = new Backoff({ initialMs: 1000, maxMs: maxBackoffMs });
      let delay = 0;
      for (let i = 0; i < attempts; i++) delay = b.next();
      if (idx >= 0) {
        if (attempts >= maxAttempts) {
          st.outbox!.splice(idx, 1);
          if (cs) cs.dropped = (cs.dropped ?? 0) + 1;
        } else st.outbox![idx] = { ...d, attempts, nextAttemptAt: new Date(now.getTime() + delay).toISOString() };
      }
      if (cs) {
        cs.lastError = attempts >= maxAttempts ? `${err.message} (gave up after ${attempts} attempts)` : err.message;
        cs.lastErrorReason = err.reason;
        cs.lastErrorTime = timestamp(now);
        cs.consecutiveFailures = (cs.consecutiveFailures ?? 0) + 1;
      }
      this.d.log.warn({ policy: rt.key, channel, kind: d.event.kind, reason: err.reason, err: err.message, attempts, retryMs: attempts >= maxAttempts ? undefined : delay }, "notification not delivered");
    }
    if (cs) cs.pending = st.outbox?.filter((x) => x.channel === channel).length ?? 0;
    const p = this.d.policy(...(rt.key.split("/") as [string, string]));
    if (p) st.conditions = policyConditions(st.conditions as Condition[] | undefined, [...rt.channels.values()].map((ch) => ({ ...ch, status: st.channels?.find((c) => c.name === ch.name) })), p.metadata.generation ?? 0, now);
  }

  private scheduleWrite(rt: PolicyRuntime, p: NotificationPolicy): void {
    if (rt.writing) {
      rt.dirty = true;
      return;
    }
    const body = JSON.stringify(rt.status);
    if (body === rt.written) return;
    rt.writing = true;
    const snapshot = JSON.parse(body) as NotificationPolicyStatus;
    void this.d.writeStatus(p, snapshot).then(
      () => {
        rt.written = body;
      },
      (e: unknown) => this.d.log.warn({ policy: rt.key, err: errText(e) }, "could not write notification policy status; will retry"),
    ).finally(() => {
      rt.writing = false;
      if (rt.dirty || JSON.stringify(rt.status) !== rt.written) {
        rt.dirty = false;
        const cur = this.d.policy(...(rt.key.split("/") as [string, string]));
        if (cur) setTimeout(() => this.scheduleWrite(rt, cur), rt.written === body ? 0 : 1000).unref();
      }
    });
  }
}

/**
 * Everything the operator needs for notifications: the NotificationPolicy cache,
 * the controller (acting once `lead()` is called), and the SNMP agent when
 * `snmp.listen` is set (on every replica: it only reads the cache).
 */
export function createNotifications(kc: KubeConfig, o: { namespace?: string; log: Logger; registry?: Registry; pairs: { list(ns?: string): readonly ReplicationPair[]; on(ev: "add" | "update" | "delete", cb: (p: ReplicationPair) => void): void }; snmp?: { listen: string; communities: string[] } }) {
  const log = o.log.child({ controller: "notificationpolicy" });
  const inf = crInformer<NotificationPolicy>(kc, NOTIFICATION_POLICIES, o.namespace, log);
  const api = kc.makeApiClient(CustomObjectsApi);
  const ctl = new NotificationController({
    policy: (ns, name) => inf.get(name, ns),
    policies: () => inf.list(),
    pairs: (ns) => o.pairs.list(ns),
    secrets: new KubeSecretReader(kc),
    allPairs: () => o.pairs.list(),
    ...(o.registry ? { problemGauge: new Gauge({ name: "understudy_pair_problem", help: "1 while a pair shows a problem NotificationPolicies report (kind: FailoverStarted, FailoverRefused, PairDegraded, NotKnownGood, ...); set by the leader", labelNames: ["namespace", "name", "kind", "subject"] as const, registers: [o.registry] }) } : {}),
    writeStatus: async (p, status) => {
      await api.patchNamespacedCustomObjectStatus({ group: GROUP, version: VERSION, namespace: p.metadata.namespace!, plural: NOTIFICATION_POLICIES, name: p.metadata.name!, body: { status } }, merge);
    },
    log,
  });
  for (const ev of ["add", "update", "delete"] as const) {
    o.pairs.on(ev, (p) => ctl.touchNamespace(p.metadata.namespace));
    inf.on(ev, (p) => ctl.touch(key(p)));
  }
  let agent: PairTableAgent | undefined;
  return {
    controller: ctl,
    /**
     * Starts the cache without waiting for it: an operator upgraded without its new CRD (helm
     * does not upgrade CRDs) must still reconcile pairs; the cache retries until the CRD is there.
     */
    async start(): Promise<void> {
      void inf.start().catch(() => undefined);
      if (o.snmp?.listen) {
        const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(o.snmp.listen);
        if (!m) throw new Error(`--snmp-listen must be host:port, not ${o.snmp.listen}`);
        agent = new PairTableAgent({ address: m[1] ?? m[2] ?? "0.0.0.0", port: Number(m[3]), communities: o.snmp.communities, pairs: () => o.pairs.list(), log });
        await agent.start();
      }
    },
    lead(): void {
      ctl.start();
    },
    async stop(): Promise<void> {
      ctl.stop();
      await agent?.stop();
      await inf.stop().catch(() => undefined);
    },
  };
}
