// An ssh endpoint, from spec to a running agent: the operator signs the
// agent's certificate with its CA, and installs (or upgrades) the bundle of
// its own version over SSH with the host key checked against the Secret's
// known_hosts (operator/ssh/installer.ts). An install takes seconds to
// minutes (the bundle is uploaded), longer than a reconcile may take, so it
// runs in the background: reconcile starts it, reports Installing, and picks
// up the result on a later pass. Both sides of a pair get the operator's
// version, so an operator upgrade moves them in step.
import { createHash, X509Certificate } from "node:crypto";
import { isIP } from "node:net";
import YAML from "yaml";
import { joinHostPort } from "../../common/config.ts";
import type { Logger } from "../../common/log.ts";
import { signLeaf, type CaSigner } from "../../common/tls.ts";
import type { EndpointStatus, ReplicationPair, SshEndpoint } from "../api/v1alpha1/index.ts";
import type { EndpointProvisioner, FinalizeResult, ProvisionEvent, ProvisionResult } from "../controllers/endpoints.ts";
import { SshError } from "./errors.ts";
import { installAgent, type InstallResult } from "./installer.ts";

export interface SshProvisionerOptions {
  bundle: { path: string; version: string };
  ca: CaSigner & { certPem: string };
  /** CNs that may change installed agents (the operator's client certificate CN) */
  admins: string[];
  readSecret(namespace: string, name: string): Promise<Record<string, string> | undefined>;
  log: Logger;
  now?: () => Date;
}

type Outcome = { ok: true; result: InstallResult; agentName: string } | { ok: false; error: Error };

/** The parts of an ssh endpoint that make up the one agent on its host: pairs sharing a host must agree on them. */
const LAYOUT_DEFAULTS = { agentPort: 7702, prefix: "/opt/understudy", etcDir: "/etc/understudy", dataDir: "/var/lib/understudy", targetRoot: "/var/lib/understudy/replicas", start: "auto" } as const;
type Layout = { -readonly [K in keyof typeof LAYOUT_DEFAULTS]: string | number };
function layoutOf(s: SshEndpoint): Layout {
  return { agentPort: s.agentPort ?? LAYOUT_DEFAULTS.agentPort, prefix: s.prefix ?? LAYOUT_DEFAULTS.prefix, etcDir: s.etcDir ?? LAYOUT_DEFAULTS.etcDir, dataDir: s.dataDir ?? LAYOUT_DEFAULTS.dataDir, targetRoot: s.targetRoot ?? LAYOUT_DEFAULTS.targetRoot, start: s.start ?? LAYOUT_DEFAULTS.start };
}
/** A certificate on a host with fewer days left than this is replaced at the next install. */
const CERT_RENEW_DAYS = 30;
/**
 * Whether the certificate on a host can stay: issued by this CA, CN the agent
 * name, the host as the operator dials it among its SANs, and more than
 * CERT_RENEW_DAYS left. A restarted operator signs a new certificate for the
 * same identity; replacing a good one would restart the agent for nothing.
 */
export function certStillGood(pem: string, caPem: string, host: string, agentName: string, now: Date): boolean {
  const cert = new X509Certificate(pem);
  const ca = new X509Certificate(caPem);
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) return false;
  if (cert.subject.split("\n").find((l) => l.startsWith("CN="))?.slice(3) !== agentName) return false;
  if ((isIP(host) ? cert.checkIP(host) : cert.checkHost(host)) === undefined) return false;
  return cert.validFromDate.getTime() <= now.getTime() && cert.validToDate.getTime() - now.getTime() > CERT_RENEW_DAYS * 86_400_000;
}

/** A claim on a host's layout not refreshed for this long is dropped (its pair went away, or stopped using ssh, while this operator ran). */
const CLAIM_TTL_MS = 10 * 60_000;

/** The agent name for a host: ssh-<host>, made an agent name (lowercase, at most 63). */
export function sshAgentName(host: string): string {
  const base = `ssh-${host.toLowerCase().replace(/[^a-z0-9.-]+/g, "-")}`.replace(/[.-]+$/, "");
  return base.length <= 63 ? base : `${base.slice(0, 54)}-${createHash("sha256").update(host).digest("hex").slice(0, 8)}`;
}


export class SshProvisioner implements EndpointProvisioner {
  readonly kind = "ssh" as const;
  private readonly o: SshProvisionerOptions;
  private readonly running = new Map<string, Promise<void>>();
  private readonly done = new Map<string, Outcome>();
  /**
   * Config and certificate per host agent: pairs that share a host get the same
   * files, so installing for one pair does not restart the agent under another.
   */
  private readonly issued = new Map<string, Promise<Record<string, { content: string; mode: number }>>>();
  /**
   * Which endpoint's layout each host's agent has, by host. One host runs one
   * agent with one agent.yaml: a second pair asking for another target root
   * or port would silently move the first pair's replicas (the last install
   * wins), so it is refused instead, naming the pair that has the host.
   */
  private readonly claims = new Map<string, { owner: string; layout: Layout; at: number }>();

  constructor(o: SshProvisionerOptions) {
    this.o = o;
  }

  private spec(pair: ReplicationPair, name: string): SshEndpoint {
    const s = name === "source" ? pair.spec.source.ssh : pair.spec.targets.find((t) => t.name === name)?.ssh;
    if (!s) throw new Error(`${name} is not an ssh endpoint`);
    return s;
  }

  private async target(pair: ReplicationPair, s: SshEndpoint) {
    const ns = pair.metadata.namespace ?? "default";
    const data = await this.o.readSecret(ns, s.secretName);
    if (!data) throw new SshError("Invalid", `Secret ${ns}/${s.secretName} (spec ssh.secretName) does not exist`);
    const privateKey = data["ssh-privatekey"];
    const knownHosts = data["known_hosts"];
    if (!privateKey) throw new SshError("Invalid", `Secret ${ns}/${s.secretName} has no key ssh-privatekey (the login key)`);
    if (!knownHosts?.trim()) throw new SshError("HostKey", `Secret ${ns}/${s.secretName} has no known_hosts: the operator never trusts a host key on first use; add the host's key (ssh-keyscan -p ${s.port ?? 22} ${s.host})`);
    return { host: s.host, port: s.port ?? 22, user: s.user ?? "root", privateKey, knownHosts };
  }

  private key(pair: ReplicationPair, name: string): string {
    return `${pair.metadata.namespace}/${pair.metadata.name}/${name}`;
  }

  async reconcile(pair: ReplicationPair, name: string, prev: EndpointStatus | undefined, _serves: boolean): Promise<ProvisionResult> {
    const s = this.spec(pair, name);
    const st: EndpointStatus = { ...(prev ?? {}), name, kind: "ssh" };
    const events: ProvisionEvent[] = [];
    const key = this.key(pair, name);
    const version = this.o.bundle.version;
    const agentName = sshAgentName(s.host);

    const conflict = this.claim(s, key);
    if (conflict) {
      const attempt = st.lastError?.code === "SshLayoutConflict" ? (st.lastError.attempt ?? 1) + 1 : 1;
      st.lastError = { code: "SshLayoutConflict", message: conflict, at: new Date().toISOString(), attempt };
      st.phase = "Failed";
      st.message = conflict;
      return { status: st, requeueAfterMs: 60_000, events: attempt === 1 ? [{ type: "Warning", reason: "SshLayoutConflict", message: conflict }] : [] };
    }

    const outcome = this.done.get(key);
    if (outcome) {
      this.done.delete(key);
      if (outcome.ok) {
        const r = outcome.result;
        st.agentName = outcome.agentName;
        st.agentVersion = r.installedVersion;
        st.agentAddress = joinHostPort(s.host, s.agentPort ?? 7702);
        st.phase = "Ready";
        st.message = `understudy ${r.installedVersion} on ${s.user ?? "root"}@${s.host} (${r.startMode})`;
        delete st.lastError;
        if (r.installed) events.push({ type: "Normal", reason: r.previousVersion && r.previousVersion !== r.installedVersion ? "AgentUpgraded" : "AgentInstalled", message: `understudy ${r.installedVersion} installed on ${s.host}${r.previousVersion && r.previousVersion !== r.installedVersion ? ` (was ${r.previousVersion})` : ""}` });
        return { status: st, requeueAfterMs: 0, events };
      }
      const e = outcome.error;
      const code = e instanceof SshError ? e.code : "Error";
      const attempt = st.lastError?.code === code ? (st.lastError.attempt ?? 1) + 1 : 1;
      st.lastError = { code: code === "HostKey" ? "HostKeyMismatch" : `Ssh${code}`, message: e.message, at: new Date().toISOString(), attempt };
      st.phase = "Failed";
      st.message = e.message;
      if (attempt === 1) events.push({ type: "Warning", reason: st.lastError.code!, message: e.message });
      const retryable = e instanceof SshError && e.retryable;
      // a wrong host key or key is for a person to fix; network trouble passes
      return { status: st, requeueAfterMs: retryable ? Math.min(300_000, 5000 * 2 ** Math.min(attempt, 6)) : 60_000, events };
    }
    if (this.running.has(key)) {
      st.phase = "Installing";
      return { status: st, requeueAfterMs: 2000 };
    }
    // Installed, this version, at this address: nothing to do (the pair's status checks the agent itself).
    if (st.phase === "Ready" && st.agentVersion === version && st.agentAddress === joinHostPort(s.host, s.agentPort ?? 7702) && st.agentName === agentName) {
      return { status: st, requeueAfterMs: 60_000 };
    }
    if (st.phase === "Failed" && st.lastError && prev?.lastError?.at && Date.now() - Date.parse(prev.lastError.at) < 30_000 * Math.min(st.lastError.attempt ?? 1, 10)) {
      return { status: st, requeueAfterMs: 10_000 };
    }
    st.phase = "Installing";
    st.message = `installing understudy ${version} on ${s.user ?? "root"}@${s.host}:${s.port ?? 22}${st.agentVersion && st.agentVersion !== version ? ` (upgrade from ${st.agentVersion})` : ""}`;
    const job = (async () => {
      try {
        const target = await this.target(pair, s);
        const fkey = JSON.stringify([s.host, s.agentPort ?? 7702, s.etcDir, s.dataDir, s.targetRoot, agentName]);
        let files = this.issued.get(fkey);
        if (!files) {
          this.issued.set(fkey, (files = this.agentFiles(s, agentName)));
          files.catch(() => this.issued.delete(fkey));
        }
        const keepCertificate = { cert: "tls/agent.crt", key: "tls/agent.key", accept: (pem: string) => certStillGood(pem, this.o.ca.certPem, s.host, agentName, this.o.now?.() ?? new Date()) };
        const result = await installAgent({ ...target, bundlePath: this.o.bundle.path, version, prefix: s.prefix ?? "/opt/understudy", etcDir: s.etcDir ?? "/etc/understudy", files: await files, keepCertificate, start: s.start ?? "auto", log: this.o.log.child({ endpoint: key }) });
        this.done.set(key, { ok: true, result, agentName });
      } catch (e) {
        this.done.set(key, { ok: false, error: e as Error });
      } finally {
        this.running.delete(key);
      }
    })();
    this.running.set(key, job);
    return { status: st, requeueAfterMs: 1000 };
  }

  /** Claim the host's layout for key; a message when another live endpoint has it with a different layout. */
  private claim(s: SshEndpoint, key: string): string | undefined {
    const now = (this.o.now?.() ?? new Date()).getTime();
    const layout = layoutOf(s);
    const host = s.host.toLowerCase();
    const c = this.claims.get(host);
    if (c && c.owner !== key && now - c.at < CLAIM_TTL_MS) {
      const diff = (Object.keys(layout) as (keyof Layout)[]).filter((k) => layout[k] !== c.layout[k]);
      if (diff.length > 0) {
        const [ns, pair, endpoint] = c.owner.split("/");
        return `host ${s.host} already runs the agent installed for pair ${ns}/${pair} (endpoint ${endpoint}) with ${diff.map((k) => `${k} ${c.layout[k]}`).join(", ")}; this endpoint asks for ${diff.map((k) => `${k} ${layout[k]}`).join(", ")}. One host runs one agent: give every pair on it the same ssh ${diff.join(", ")}`;
      }
      c.at = now; // same layout: the host is shared, and still in use
      return undefined;
    }
    this.claims.set(host, { owner: key, layout, at: now });
    return undefined;
  }

  /** agent.yaml and its certificate (CN = agent name, SAN = the host as the operator dials it). */
  private async agentFiles(s: SshEndpoint, agentName: string) {
    const etc = s.etcDir ?? "/etc/understudy";
    const leaf = await signLeaf(this.o.ca, { commonName: agentName, usage: "both", sans: [{ type: isIP(s.host) ? "ip" : "dns", value: s.host }], days: 825 });
    const config = {
      name: agentName,
      listen: joinHostPort(isIP(s.host) === 6 ? "::" : "0.0.0.0", s.agentPort ?? 7702),
      dataDir: s.dataDir ?? "/var/lib/understudy",
      tls: { ca: `${etc}/tls/ca.crt`, cert: `${etc}/tls/agent.crt`, key: `${etc}/tls/agent.key` },
      control: { admins: this.o.admins },
      // every host can receive: a source becomes the target of reverse replication after a failover
      target: { root: s.targetRoot ?? "/var/lib/understudy/replicas" },
    };
    return {
      "agent.yaml": { content: `# written by the understudy operator; changes are replaced at the next install\n${YAML.stringify(config)}`, mode: 0o600 },
      "tls/ca.crt": { content: this.o.ca.certPem, mode: 0o644 },
      "tls/agent.crt": { content: leaf.certPem, mode: 0o644 },
      "tls/agent.key": { content: leaf.keyPem, mode: 0o600 },
    };
  }

  async finalize(pair: ReplicationPair, name: string, prev: EndpointStatus | undefined): Promise<FinalizeResult> {
    // The agent stays installed and running: it may serve other pairs, and the replicas it keeps are the user's.
    const key = this.key(pair, name);
    for (const [host, c] of this.claims) if (c.owner === key) this.claims.delete(host);
    return { done: true, status: { ...(prev ?? {}), name, kind: "ssh" } };
  }
}
