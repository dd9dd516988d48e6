// `understudy operator`: the command-line face of the operator (flags named as
// controller-runtime's managers name them).
import { Command, Option } from "commander";
import path from "node:path";
import { existsSync } from "node:fs";
import { parseDuration, type TlsConfig } from "../common/config.ts";
import { createLogger } from "../common/log.ts";
import { Operator } from "./manager.ts";

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
}

export function operatorCommand(fail: (msg: string) => never): Command {
  return new Command("operator")
    .description("run the Kubernetes operator (reconciles ReplicationPairs)")
    .option("--kubeconfig <file>", "kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster)")
    .option("--namespace <ns>", "watch only this namespace (default: all)")
    .option("--no-leader-elect", "act without holding the Lease (only one replica may run)")
    .option("--leader-election-namespace <ns>", "namespace of the Lease (default: $POD_NAMESPACE, else default)")
    .option("--leader-election-id <name>", "name of the Lease", "understudy-operator")
    .option("--lease-duration <d>", "how long a Lease not renewed stays held", "15s")
    .option("--renew-deadline <d>", "the leader gives up if it cannot renew within this", "10s")
    .option("--retry-period <d>", "how often to try to acquire or renew", "2s")
    .option("--metrics-bind-address <addr>", "where /metrics is served (0 disables)", "0.0.0.0:8080")
    .option("--health-probe-bind-address <addr>", "where /healthz and /readyz are served (0 disables)", "0.0.0.0:8081")
    .option("--agent-tls-dir <dir>", "mTLS client certificate for agents: ca.crt, tls.crt, tls.key (CN understudy-operator)")
    .addOption(new Option("--agent-insecure", "talk to agents without TLS (loopback agents only, for local tries)").conflicts("agentTlsDir"))
    .option("--workers <n>", "pairs reconciled concurrently", "4")
    .option("--status-interval <d>", "how often a healthy pair's status is refreshed", "10s")
    .option("--log-level <level>", "trace, debug, info, warn, error", process.env.UNDERSTUDY_LOG_LEVEL ?? "info")
    .action(async (f: Flags) => {
      let tls: TlsConfig;
      if (f.agentInsecure) tls = { insecure: true };
      else if (f.agentTlsDir) {
        const file = (n: string) => path.resolve(f.agentTlsDir!, n);
        for (const n of ["ca.crt", "tls.crt", "tls.key"]) if (!existsSync(file(n))) fail(`--agent-tls-dir ${f.agentTlsDir} has no ${n}`);
        tls = { ca: file("ca.crt"), cert: file("tls.crt"), key: file("tls.key") };
      } else fail("give --agent-tls-dir (the operator's mTLS client certificate for agents) or, for loopback agents only, --agent-insecure");
      const workers = Number(f.workers);
      if (!Number.isInteger(workers) || workers < 1 || workers > 64) fail(`--workers must be 1-64, not ${f.workers}`);
      let durations: number[];
      try {
        durations = [f.leaseDuration, f.renewDeadline, f.retryPeriod, f.statusInterval].map(parseDuration);
      } catch (e) {
        fail((e as Error).message);
      }
      const [leaseDurationMs, renewDeadlineMs, retryPeriodMs, statusIntervalMs] = durations as [number, number, number, number];
      const log = createLogger("understudy-operator", f.logLevel);
      let op: Operator;
      try {
        op = new Operator({
        kubeconfig: f.kubeconfig,
        namespace: f.namespace,
        leaderElect: f.leaderElect,
        leaderElectionNamespace: f.leaderElectionNamespace ?? process.env.POD_NAMESPACE ?? "default",
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
