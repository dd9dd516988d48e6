// `kubectl understudy …` (bin/kubectl-understudy): failover, failback, cutover,
// verify and status of a ReplicationPair, for a person who has not read the
// CRD. Each command only changes the pair declaratively (spec.activeSide or an
// annotation); the operator does the work and the status tells how it went.
import { Command } from "commander";
import { CoreV1Api, CustomObjectsApi, KubeConfig, PatchStrategy, setHeaderOptions } from "@kubernetes/client-node";
import { enrollSecretName } from "./enroll/provisioner.ts";
import { GROUP, REPLICATION_PAIRS, VERIFY_ANNOTATION, VERIFY_REPAIR_ANNOTATION, VERSION, type ReplicationPair } from "./api/v1alpha1/index.ts";
import { errText } from "./runtime/leader-election.ts";

interface Common {
  namespace?: string;
  kubeconfig?: string;
  wait?: boolean;
  timeout: string;
}

function client(o: Common): { api: CustomObjectsApi; ns: string; core: CoreV1Api } {
  const kc = new KubeConfig();
  if (o.kubeconfig) kc.loadFromFile(o.kubeconfig);
  else kc.loadFromDefault();
  const ns = o.namespace ?? kc.getContextObject(kc.getCurrentContext())?.namespace ?? "default";
  return { api: kc.makeApiClient(CustomObjectsApi), ns, core: kc.makeApiClient(CoreV1Api) };
}

/** Single-quote for sh. */
function shq(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

async function get(api: CustomObjectsApi, ns: string, name: string): Promise<ReplicationPair> {
  return (await api.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: ns, plural: REPLICATION_PAIRS, name })) as ReplicationPair;
}

async function patch(api: CustomObjectsApi, ns: string, name: string, body: object): Promise<void> {
  await api.patchNamespacedCustomObject({ group: GROUP, version: VERSION, namespace: ns, plural: REPLICATION_PAIRS, name, body }, setHeaderOptions("Content-Type", PatchStrategy.MergePatch));
}

function out(s: string): void {
  process.stdout.write(s + "\n");
}

/** Wait until the operator reports the pair served by `side` (or a refusal), printing what changes. */
async function waitFor(api: CustomObjectsApi, ns: string, name: string, side: string, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  while (Date.now() < deadline) {
    const p = await get(api, ns, name);
    const fo = p.status?.conditions?.find((c) => c.type === "FailedOver");
    const line = `${p.status?.phase ?? "?"}: ${fo ? `${fo.reason}: ${fo.message}` : ""}`;
    if (line !== last) out(`  ${line}`);
    last = line;
    if ((p.status?.activeSide ?? "source") === side && p.status?.observedGeneration === p.metadata.generation && p.status?.phase !== "FailingBack" && p.status?.phase !== "FailingOver") return true;
    if (fo?.reason === "FailoverRefused") return false;
    await new Promise((r) => setTimeout(r, 500));
  }
  out(`  still not done after ${timeoutMs / 1000}s; see kubectl describe rp ${name} -n ${ns}`);
  return false;
}

function statusText(p: ReplicationPair): string {
  const s = p.status ?? {};
  const lines = [
    `${p.metadata.namespace}/${p.metadata.name}: ${s.phase ?? "Pending"}, active side ${s.activeSide ?? "source"} (epoch ${s.epoch ?? 0})`,
    `  source  ${(p.spec.source.agent?.address ?? `ssh ${p.spec.source.ssh?.host}`)} → ${p.spec.replicationSet.path}`,
    ...(s.targets ?? []).map((t) => `  target  ${t.name} ${t.address}: ${t.state ?? "?"}, acked ${t.lastAckedSeq ?? 0}, applied ${t.appliedSeq ?? 0}, lag ${t.lagSeconds ?? 0}s${t.lastError ? `, error: ${t.lastError}` : ""}`),
    `  lag ${s.lag ?? "?"}, queued ${s.queued ?? "?"}, mirror ${s.mirror ?? "?"}, last verify ${s.lastVerify?.result ?? "never"}${s.lastVerify?.finishedAt ? ` at ${s.lastVerify.finishedAt}` : ""}`,
    ...(s.knownGood ?? []).map((k) => `  known good: ${k.target} ${k.ok ? "yes" : `no — ${(k.failed ?? []).join("; ")}`}`),
    ...(s.health ? [`  health: source ${s.health.sourceReachable ? "reachable" : `unreachable (${s.health.missedBeats} missed)`}${s.health.sourceDown ? ", DOWN" : ""} (policy ${s.health.policy})`] : []),
    ...(s.failover?.finishedAt ? [`  last failover: to ${s.failover.target} (${s.failover.reason}) at ${s.failover.finishedAt}, recovery ${s.failover.recoverySeconds}s`] : []),
    ...(s.reverse ? [`  reverse replication: ${s.reverse.state}${s.reverse.mirrored ? ", source up to date" : ""}`] : []),
    "  conditions:",
    ...(s.conditions ?? []).map((c) => `    ${c.type.padEnd(16)} ${c.status.padEnd(7)} ${c.reason}: ${c.message}`),
  ];
  return lines.join("\n");
}

export function pluginCommand(fail: (msg: string) => never): Command {
  const cmd = new Command("kubectl").description("kubectl plugin commands (run as `kubectl understudy …`)");
  const common = (c: Command) =>
    c.option("-n, --namespace <ns>", "namespace of the pair (default: the context's)").option("--kubeconfig <file>", "kubeconfig (default: $KUBECONFIG or ~/.kube/config)").option("--no-wait", "return once the request is made").option("--timeout <seconds>", "how long to wait", "120");
  const run = (fn: (api: CustomObjectsApi, ns: string, o: Common) => Promise<void>) => async (...args: unknown[]) => {
    const o = args.at(-2) as Common;
    try {
      const { api, ns } = client(o);
      await fn(api, ns, o);
    } catch (e) {
      fail(errText(e));
    }
  };

  common(cmd.command("status <pair>").description("the pair's state: active side, targets, known-good gate, conditions")).action(
    (name: string, ...rest: unknown[]) => run(async (api, ns) => out(statusText(await get(api, ns, name))))(...rest),
  );
  common(cmd.command("failover <pair>").description("make a target serve (only one whose copy is known to be good)").option("--to <target>", "target name (default: the best known-good one)")).action((name: string, ...rest: unknown[]) =>
    run(async (api, ns, o) => {
      const p = await get(api, ns, name);
      const to = (o as Common & { to?: string }).to ?? p.status?.knownGood?.find((k) => k.ok)?.target;
      if (!to) fail(`no target of ${name} is known good:\n${(p.status?.knownGood ?? []).map((k) => `  ${k.target}: ${(k.failed ?? []).join("; ")}`).join("\n") || "  (no gate status yet: is a FailoverPolicy selecting this pair?)"}`);
      if (!p.spec.targets.some((t) => t.name === to)) fail(`${name} has no target ${to} (targets: ${p.spec.targets.map((t) => t.name).join(", ")})`);
      await patch(api, ns, name, { spec: { activeSide: to } });
      out(`failover of ${ns}/${name} to ${to} requested`);
      if (o.wait !== false && !(await waitFor(api, ns, name, to, Number(o.timeout) * 1000))) process.exit(1);
    })(...rest),
  );
  common(cmd.command("cutover <pair>").description("planned move to a target (migration): final sync, then the target serves").requiredOption("--to <target>", "target name")).action((name: string, ...rest: unknown[]) =>
    run(async (api, ns, o) => {
      const to = (o as Common & { to: string }).to;
      await patch(api, ns, name, { spec: { activeSide: to } });
      out(`cutover of ${ns}/${name} to ${to} requested`);
      if (o.wait !== false && !(await waitFor(api, ns, name, to, Number(o.timeout) * 1000))) process.exit(1);
    })(...rest),
  );
  common(cmd.command("failback <pair>").description("bring the original source back: changes made meanwhile travel back, then it serves again")).action((name: string, ...rest: unknown[]) =>
    run(async (api, ns, o) => {
      await patch(api, ns, name, { spec: { activeSide: "source" } });
      out(`failback of ${ns}/${name} requested`);
      if (o.wait !== false && !(await waitFor(api, ns, name, "source", Number(o.timeout) * 1000))) process.exit(1);
    })(...rest),
  );
  common(cmd.command("verify <pair>").description("compare every target with the source now").option("--repair", "repair what differs")).action((name: string, ...rest: unknown[]) =>
    run(async (api, ns, o) => {
      const token = String(Date.now());
      await patch(api, ns, name, { metadata: { annotations: { [VERIFY_ANNOTATION]: token, [VERIFY_REPAIR_ANNOTATION]: (o as Common & { repair?: boolean }).repair ? "true" : "false" } } });
      out(`verify of ${ns}/${name} requested (${token})`);
      if (o.wait === false) return;
      const deadline = Date.now() + Number(o.timeout) * 1000;
      while (Date.now() < deadline) {
        const p = await get(api, ns, name);
        const v = p.status?.lastVerify;
        if (p.status?.lastHandledVerifyRequest === token && v && v.result !== "Running" && v.finishedAt && Date.parse(v.finishedAt) >= Number(token) - 1000) {
          out(`  ${v.result}: ${v.filesCompared ?? 0} files compared, ${v.differences ?? 0} difference(s)${v.repaired ? `, ${v.repaired} repaired` : ""}${(v.sample ?? []).map((d) => `\n    ${d}`).join("")}`);
          if (v.result !== "Passed") process.exit(1);
          return;
        }
        await new Promise((r) => setTimeout(r, 500));
      }
      fail("verify did not finish in time");
    })(...rest),
  );
  common(
    cmd
      .command("enroll-command <pair>")
      .description("print the command that enrolls the agent of an enroll endpoint (a host the operator cannot reach); its token works once")
      .option("--endpoint <name>", "source or a target's name (default: the pair's only enroll endpoint)")
      .option("--bin <path>", "the understudy program on that host", "/opt/understudy/bin/understudy")
      .option("--config-dir <dir>", "where the agent's config goes on that host", "/etc/understudy")
      .option("--data-dir <dir>", "the agent's state directory on that host", "/var/lib/understudy"),
  ).action((name: string, ...rest: unknown[]) =>
    run(async (api, ns, o) => {
      const f = o as Common & { endpoint?: string; bin: string; configDir: string; dataDir: string };
      const p = await get(api, ns, name);
      const enrollable = [...(p.spec.source.enroll ? ["source"] : []), ...p.spec.targets.filter((t) => t.enroll).map((t) => t.name)];
      if (enrollable.length === 0) fail(`${ns}/${name} has no enroll endpoint (spec.source.enroll or spec.targets[].enroll)`);
      const ep = f.endpoint ?? (enrollable.length === 1 ? enrollable[0]! : fail(`${ns}/${name} has several enroll endpoints: give --endpoint (${enrollable.join(", ")})`));
      if (!enrollable.includes(ep)) fail(`${ep} is not an enroll endpoint of ${ns}/${name} (enroll endpoints: ${enrollable.join(", ")})`);
      const st = p.status?.endpoints?.find((e) => e.name === ep);
      if (st?.agentAddress) fail(`${ep} has enrolled already (agent ${st.agentName} at ${st.agentAddress}); its token is spent`);
      const { core } = client(o);
      const secret = enrollSecretName(name, ep);
      let data: Record<string, string>;
      try {
        const s = await core.readNamespacedSecret({ namespace: ns, name: secret });
        data = Object.fromEntries(Object.entries(s.data ?? {}).map(([k, v]) => [k, Buffer.from(v, "base64").toString("utf8")]));
      } catch (e) {
        fail(`cannot read Secret ${ns}/${secret} (${errText(e)}): is the operator running with provisioning (--enroll-url), and may you read Secrets in ${ns}?`);
      }
      const bin = shq(f.bin);
      out(`# on the host of ${ep} (${ns}/${name}), as root, with the agent bundle installed (install.sh); the token works once, until ${data.expiresAt}`);
      out(`UNDERSTUDY_ENROLL_TOKEN=${shq(data.token ?? "")} ${bin} enroll --url ${shq(data.url ?? "")} --ca-pem ${shq((data.caPem ?? "").trim().replaceAll("\n", "\\n"))} --dir ${shq(f.configDir)} --listen ${shq(`0.0.0.0:${data.agentPort}`)} --data-dir ${shq(f.dataDir)} --target-root ${shq(data.targetRoot ?? "")} --force && \\`);
      out(`  { systemctl enable --now understudy-agent 2>/dev/null || ${bin} agent --config ${shq(`${f.configDir}/agent.yaml`)}; }`);
    })(...rest),
  );
  return cmd;
}
