// `understudy operator`: the command-line face of the operator (flags named as
// controller-runtime's managers name them).
import { Command, Option } from "commander";
import path from "node:path";
import { existsSync, readFileSync } from "node:fs";
import { parseDuration, type TlsConfig } from "../common/config.ts";
import { createLogger } from "../common/log.ts";
import { writePidFile } from "../common/pid-file.ts";
// The manager (Kubernetes client, AWS SDK, ssh2) loads only when the operator runs:
// every agent process starts through the same CLI and must not carry them.
import type { Operator } from "./manager.ts";

/** Where Kubernetes mounts a pod's ServiceAccount namespace. */
const SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/** Ports unlikely to be taken on a workstation (8080/8081 nearly always are); the chart sets its own. */
export const DEFAULT_METRICS_BIND = "127.0.0.1:7780";
export const DEFAULT_HEALTH_BIND = "127.0.0.1:7781";

const TLS_DIR_LAYOUTS = "ca.crt, tls.crt and tls.key (a kubernetes.io/tls Secret with ca.crt), or ca.crt, understudy-operator.crt and understudy-operator.key (`understudy certs issue --name understudy-operator`)";

/**
 * The operator's client certificate in --agent-tls-dir: the layout of a
 * kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt), or what `understudy
 * certs issue --dir DIR --name understudy-operator` writes into its CA dir.
 * A message naming what is missing otherwise.
 */
export function agentTlsFiles(dir: string): { ca: string; cert: string; key: string } | string {
  const file = (n: string) => path.resolve(dir, n);
  if (!existsSync(dir)) return `--agent-tls-dir ${dir} does not exist; it must hold ${TLS_DIR_LAYOUTS}`;
  for (const [cert, key] of [["tls.crt", "tls.key"], ["understudy-operator.crt", "understudy-operator.key"]] as const) {
    if (existsSync(file(cert)) || existsSync(file(key))) {
      const missing = ["ca.crt", cert, key].filter((n) => !existsSync(file(n)));
      if (missing.length) return `--agent-tls-dir ${dir} has no ${missing.join(" and no ")}; it must hold ${TLS_DIR_LAYOUTS}`;
      return { ca: file("ca.crt"), cert: file(cert), key: file(key) };
    }
  }
  return `--agent-tls-dir ${dir} holds no client certificate; it must hold ${TLS_DIR_LAYOUTS}`;
}

/** The Lease's namespace: the flag, else $POD_NAMESPACE (the chart sets it), else the pod's own namespace. */
export function leaderElectionNamespace(flag: string | undefined, env: NodeJS.ProcessEnv = process.env, saFile = SA_NAMESPACE_FILE): string | undefined {
  if (flag) return flag;
  if (env.POD_NAMESPACE) return env.POD_NAMESPACE;
  try {
    return readFileSync(saFile, "utf8").trim() || undefined;
  } catch {
    return undefined;
  }
}

interface Flags {
  kubeconfig?: string;
  namespace?: string;
  leaderElect: boolean;
  leaderElectionNamespace?: string;
  leaderElectionId: string;
  leaseDuration: string;
  renewDeadline: string;
  retryPeriod: string;
  metricsBindAddress: string;
  healthProbeBindAddress: string;
  agentTlsDir?: string;
  agentInsecure?: boolean;
  workers: string;
  statusInterval: string;
  logLevel: string;
  caDir?: string;
  agentBundle?: string;
  enrollListen: string;
  enrollUrl?: string;
  snmpListen?: string;
  dashboardAddress: string;
  dashboardTlsDir?: string;
  pidFile?: string;
}

export function operatorCommand(fail: (msg: string) => never): Command {
  return new Command("operator")
    .description("run the Kubernetes operator (reconciles ReplicationPairs)")
    .option("--kubeconfig <file>", "kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster)")
    .option("--namespace <ns>", "watch only this namespace (default: all)")
    .option("--no-leader-elect", "act without holding the Lease (only one replica may run)")
    .option("--leader-election-namespace <ns>", `namespace of the Lease (default: $POD_NAMESPACE, else the pod's own namespace from ${SA_NAMESPACE_FILE}; the chart's RBAC allows its release namespace)`)
    .option("--leader-election-id <name>", "name of the Lease", "understudy-operator")
    .option("--lease-duration <d>", "how long a Lease not renewed stays held", "15s")
    .option("--renew-deadline <d>", "the leader gives up if it cannot renew within this", "10s")
    .option("--retry-period <d>", "how often to try to acquire or renew", "2s")
    .option("--metrics-bind-address <addr>", "where /metrics is served (0 disables)", DEFAULT_METRICS_BIND)
    .option("--health-probe-bind-address <addr>", "where /healthz and /readyz are served (0 disables)", DEFAULT_HEALTH_BIND)
    .option("--agent-tls-dir <dir>", "mTLS client certificate for agents: ca.crt, tls.crt, tls.key (CN understudy-operator), or ca.crt, understudy-operator.crt, understudy-operator.key as `certs issue --name understudy-operator` writes them")
    .addOption(new Option("--agent-insecure", "talk to agents without TLS (loopback agents only, for local tries)").conflicts("agentTlsDir"))
    .option("--workers <n>", "pairs reconciled concurrently", "4")
    .option("--status-interval <d>", "how often a healthy pair's status is refreshed", "10s")
    .option("--ca-dir <dir>", "the agents' CA (ca.crt, ca.key): signs the certificates of agents the operator launches or installs")
    .option("--agent-bundle <file>", "the agent bundle (npm run bundle) that ec2 and ssh endpoints get")
    .option("--enroll-url <url>", "https URL at which new agents (EC2 instances) reach the enrollment endpoint, e.g. https://10.0.0.10:7443")
    .option("--enroll-listen <addr>", "where the enrollment endpoint listens", "0.0.0.0:7443")
    .option("--snmp-listen <addr>", "answer SNMP GET/WALK on the pair table (mibs/UNDERSTUDY-MIB.txt) here, e.g. 0.0.0.0:1161; v2c communities from $UNDERSTUDY_SNMP_COMMUNITY (comma-separated)")
    .option("--dashboard-address <addr>", "serve the dashboard at host:port (HTTPS; plain HTTP only on loopback); 0 disables", "0")
    .option("--dashboard-tls-dir <dir>", "the dashboard's serving certificate: tls.crt, tls.key (default: self-signed, made at start)")
    .option("--log-level <level>", "trace, debug, info, warn, error", process.env.UNDERSTUDY_LOG_LEVEL ?? "info")
    .option("--pid-file <file>", "write the operator's process id here (removed on exit)")
    .action(async (f: Flags) => {
      let tls: TlsConfig;
      if (f.agentInsecure) tls = { insecure: true };
      else if (f.agentTlsDir) {
        const found = agentTlsFiles(f.agentTlsDir);
        if (typeof found === "string") fail(found);
        tls = found;
      } else fail(`give --agent-tls-dir DIR: the operator's mTLS client certificate for agents, a directory with ${TLS_DIR_LAYOUTS} (or, for loopback agents only, --agent-insecure)`);
      let leaseNamespace = "";
      if (f.leaderElect) {
        const ns = leaderElectionNamespace(f.leaderElectionNamespace);
        if (!ns) fail(`leader election needs the namespace of its Lease: give --leader-election-namespace NS (the namespace the operator was installed in, e.g. understudy-system: the chart's RBAC allows the Lease there), or --no-leader-elect for a single replica`);
        leaseNamespace = ns;
      }
      const workers = Number(f.workers);
      if (!Number.isInteger(workers) || workers < 1 || workers > 64) fail(`--workers must be 1-64, not ${f.workers}`);
      let durations: number[];
      try {
        durations = [f.leaseDuration, f.renewDeadline, f.retryPeriod, f.statusInterval].map(parseDuration);
      } catch (e) {
        fail((e as Error).message);
      }
      const [leaseDurationMs, renewDeadlineMs, retryPeriodMs, statusIntervalMs] = durations as [number, number, number, number];
      let provisioning: { caDir: string; bundlePath: string; enrollListen: string; enrollUrl?: string } | undefined;
      if (f.caDir || f.agentBundle || f.enrollUrl) {
        if (!f.caDir || !f.agentBundle) fail("provisioning agents (ssh and ec2 endpoints) needs --ca-dir and --agent-bundle (and for ec2, --enroll-url)");
      }
      if (f.enrollUrl) {
        let u: URL;
        try {
          u = new URL(f.enrollUrl!);
        } catch {
          fail(`--enroll-url ${f.enrollUrl} is not a URL`);
        }
        if (u.protocol !== "https:") fail(`--enroll-url must be https:// (agents verify the endpoint with the CA), not ${f.enrollUrl}`);
        if (!/^.+:\d{1,5}$/.test(f.enrollListen)) fail(`--enroll-listen must be host:port, not ${f.enrollListen}`);
      }
      if (f.caDir && f.agentBundle) provisioning = { caDir: path.resolve(f.caDir), bundlePath: path.resolve(f.agentBundle), enrollListen: f.enrollListen, ...(f.enrollUrl ? { enrollUrl: f.enrollUrl } : {}) };
      if (f.pidFile) writePidFile(f.pidFile);
      const log = createLogger("understudy-operator", f.logLevel);
      const { Operator: OperatorImpl } = await import("./manager.ts");
      let op: Operator;
      try {
        op = new OperatorImpl({
        kubeconfig: f.kubeconfig,
        namespace: f.namespace,
        leaderElect: f.leaderElect,
        leaderElectionNamespace: leaseNamespace,
        leaderElectionId: f.leaderElectionId,
        leaseDurationMs,
        renewDeadlineMs,
        retryPeriodMs,
        metricsBind: f.metricsBindAddress,
        healthBind: f.healthProbeBindAddress,
        agentTls: tls,
        workers,
        statusIntervalMs,
        log,
        ...(provisioning ? { provisioning } : {}),
        ...(f.snmpListen ? { snmp: { listen: f.snmpListen, communities: (process.env.UNDERSTUDY_SNMP_COMMUNITY ?? "").split(",").filter(Boolean) } } : {}),
        ...(f.dashboardAddress !== "0" && f.dashboardAddress !== "" ? { dashboard: { address: f.dashboardAddress, ...(f.dashboardTlsDir ? { tlsDir: path.resolve(f.dashboardTlsDir) } : {}) } } : {}),
      });
      } catch (e) {
        fail((e as Error).message);
      }
      let stopping = false;
      const stop = (sig: string) => {
        if (stopping) return;
        stopping = true;
        log.info({ signal: sig }, "stopping");
        void op.stop().finally(() => process.exit(0));
      };
      process.on("SIGTERM", () => stop("SIGTERM"));
      process.on("SIGINT", () => stop("SIGINT"));
      try {
        await op.start();
      } catch (e) {
        log.fatal({ err: (e as Error).message }, "operator failed to start");
        process.exit(1);
      }
    });
}
