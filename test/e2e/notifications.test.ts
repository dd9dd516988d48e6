// NotificationPolicy end to end: a real API server with the chart (and only its
// RBAC), the operator, agents on hosts of their own, and real receivers (an
// SMTP server with STARTTLS and AUTH, an HTTP endpoint, two snmptrapd: v2c and
// v3). A killed source must produce exactly one "failover started", one
// "completed" and, when the old source returns, one "resolved" per channel,
// also across an operator restart; bad channels (unreachable SMTP host, wrong
// password, malformed webhook URL, wrong SNMP v3 key, missing Secret) each
// give a clear condition and the failover happens all the same.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { REPO, waitFor } from "./harness.ts";
import { condition, kubectlOk } from "./k8s-harness.ts";
import { FailoverWorld } from "./failover-fixture.ts";
import { MIBS, freeUdpPort, mibComplaints, runTool, startSmtp, startTrapd, startWebhook, type Trap } from "./receivers.ts";
import type { NotificationPolicy } from "../../operator/api/v1alpha1/index.ts";

const NS = "alerts";
const ENGINE = "800007e580aabbccddeeff0011";

describe("notifications end to end", { timeout: 900_000 }, () => {
  let w: FailoverWorld;
  let smtp: Awaited<ReturnType<typeof startSmtp>>;
  let hook: Awaited<ReturnType<typeof startWebhook>>;
  let trap2: Awaited<ReturnType<typeof startTrapd>>;
  let trap3: Awaited<ReturnType<typeof startTrapd>>;
  let snmpPort = 0;
  let srcDir: string;

  const policy = async (name: string): Promise<NotificationPolicy> => JSON.parse(await kubectlOk(w.cluster, ["get", "notificationpolicy", name, "-n", NS, "-o", "json"])) as NotificationPolicy;
  const cond = (p: NotificationPolicy, type: string) => p.status?.conditions?.find((c) => c.type === type);
  async function waitPolicy(name: string, what: string, pred: (p: NotificationPolicy) => boolean, timeoutMs = 60_000): Promise<NotificationPolicy> {
    let last: NotificationPolicy | undefined;
    try {
      return await waitFor(what, async () => ((last = await policy(name)) && pred(last) ? last : undefined), timeoutMs, 250);
    } catch (e) {
      throw new Error(`${(e as Error).message}\nstatus: ${JSON.stringify(last?.status, null, 1)?.slice(0, 5000)}\noperator log tail:\n${(await w.op.log()).split("\n").filter((l) => l.includes("notif")).slice(-20).join("\n")}`);
    }
  }
  /** What each channel of policy oncall received, as "Kind/state" counts. */
  async function received(): Promise<Record<string, Record<string, number>>> {
    const count = (xs: string[]) => xs.reduce<Record<string, number>>((m, x) => ((m[x] = (m[x] ?? 0) + 1), m), {});
    const traps = (ts: Trap[]) => ts.filter((t) => t.pair === `${NS}/db`).map((t) => `${t.kind}/${t.state}`);
    return {
      mail: count(smtp.mails.filter((m) => m.header("X-Understudy-Pair") === `${NS}/db`).map((m) => `${m.header("X-Understudy-Event-Kind")}/${m.header("X-Understudy-Event-State")}`)),
      hook: count(hook.posts.filter((p) => p.body.pair === "db").map((p) => `${p.body.kind}/${p.body.state}`)),
      trap2c: count(traps(await trap2.traps())),
      trap3: count(traps(await trap3.traps())),
    };
  }
  const secret = (name: string, data: Record<string, string>) => w.apply({ apiVersion: "v1", kind: "Secret", metadata: { name, namespace: NS }, stringData: data });

  before(async () => {
    snmpPort = await freeUdpPort();
    process.env.UNDERSTUDY_SNMP_COMMUNITY = "ro-c0mmunity";
    w = await FailoverWorld.create(NS, [{ name: "src" }, { name: "a", target: true }], {
      helmSet: [`notifications.secretNamespaces={${NS}}`],
      beforeOperator: async () => ["--snmp-listen", `127.0.0.1:${snmpPort}`],
    });
    const tls = await w.pki.tlsFor("smtp");
    smtp = await startSmtp({ key: await readFile(tls.key, "utf8"), cert: await readFile(tls.cert, "utf8"), users: { alerts: "s3cret-pass" } });
    hook = await startWebhook();
    trap2 = await startTrapd(path.join(w.dir, "trapd-v2c"), { community: "trap-c0mmunity" });
    trap3 = await startTrapd(path.join(w.dir, "trapd-v3"), { users: [{ user: "understudy", auth: "authpass123", priv: "privpass123", engineID: ENGINE }, { user: "informer", auth: "authpass123", priv: "privpass123" }] });
    await secret("smtp-login", { username: "alerts", password: "s3cret-pass" });
    await secret("smtp-ca", { "ca.crt": await readFile(tls.ca, "utf8") });
    await secret("hook", { url: hook.url });
    await secret("hook-headers", { Authorization: "Bearer hook-t0ken" });
    await secret("trap-community", { community: "trap-c0mmunity" });
    await secret("trap-v3", { authKey: "authpass123", privKey: "privpass123" });
    await secret("smtp-wrong", { username: "alerts", password: "not-the-password" });
    await secret("hook-malformed", { url: "http//hooks.example.com/no-scheme" });
    await secret("trap-v3-wrong", { authKey: "wrongpass123", privKey: "privpass123" });
    srcDir = await w.sourceTree("data", 20);
  });
  after(async () => {
    await smtp?.stop();
    await hook?.stop();
    await trap2?.stop();
    await trap3?.stop();
    await w?.dispose();
  });

  test("the API server checks NotificationPolicies and names the field", async () => {
    const bad = (spec: object) => kubectlOk(w.cluster, ["apply", "-f", "-"], YAML.stringify({ apiVersion: "understudy.dev/v1alpha1", kind: "NotificationPolicy", metadata: { name: "bad", namespace: NS }, spec })).then(() => "accepted", (e: Error) => e.message);
    assert.match(await bad({ selector: { matchLabels: { a: "b" } }, channels: [{ name: "x", webhook: { url: "ftp://x" } }] }), /spec\.channels\[0\]\.webhook\.url: Invalid value.*must be an http:\/\/ or https:\/\/ URL/);
    assert.match(await bad({ selector: { matchLabels: { a: "b" } }, channels: [{ name: "x", webhook: { url: "http://x" }, email: { host: "h", from: "a@b.c", to: ["o@b.c"] } }] }), /spec\.channels\[0\]: Invalid value.*exactly one of email, webhook or snmp/);
    assert.match(await bad({ selector: { matchLabels: { a: "b" } }, channels: [{ name: "x", snmp: { host: "h", version: "v3", communitySecretRef: { name: "c" } } }] }), /spec\.channels\[0\]\.snmp: Invalid value.*v3 needs v3/);
    assert.match(await bad({ selector: {}, channels: [{ name: "x", webhook: { url: "http://x" } }] }), /spec\.selector.*needs matchLabels or matchExpressions/);
    assert.match(await bad({ selector: { matchLabels: { a: "b" } }, thresholds: { lag: "soon" }, channels: [{ name: "x", webhook: { url: "http://x" } }] }), /spec\.thresholds\.lag.*must be a duration/);
  });

  test("a pair under a FailoverPolicy and two NotificationPolicies: good channels are Ready, bad ones say what is wrong before anything is sent", async () => {
    await w.policy("db-ha", { selector: { matchLabels: { tier: "db" } }, approval: "automatic", knownGood: { requireVerify: true, maxVerifyAge: "1h", maxLag: "30s" } });
    await w.pair("db", { source: "src", targets: ["a"], path: srcDir, labels: { tier: "db" } });
    const np = (name: string, channels: object[]) => w.apply({ apiVersion: "understudy.dev/v1alpha1", kind: "NotificationPolicy", metadata: { name, namespace: NS }, spec: { selector: { matchLabels: { tier: "db" } }, thresholds: { gracePeriod: "30s" }, retry: { maxBackoff: "2s" }, channels } });
    await np("oncall", [
      { name: "mail", email: { host: "127.0.0.1", port: smtp.port, security: "starttls", caSecretRef: { name: "smtp-ca" }, authSecretRef: { name: "smtp-login" }, from: "understudy@example.com", to: ["ops@example.com"], recipients: [{ to: ["dba@example.com"], pairs: ["db"] }, { to: ["dr-site@example.com"], servers: ["a"] }, { to: ["web-team@example.com"], pairs: ["web"] }] } },
      { name: "hook", webhook: { urlSecretRef: { name: "hook" }, headersSecretRef: { name: "hook-headers" } } },
      { name: "trap2c", snmp: { host: "127.0.0.1", port: trap2.port, version: "v2c", notification: "trap", communitySecretRef: { name: "trap-community" } } },
      { name: "trap3", snmp: { host: "127.0.0.1", port: trap3.port, version: "v3", notification: "trap", v3: { user: "understudy", level: "authPriv", authProtocol: "sha", privProtocol: "aes", engineID: ENGINE, credentialsSecretRef: { name: "trap-v3" } } } },
    ]);
    await np("broken", [
      { name: "mail-unreachable", timeout: "3s", email: { host: "127.0.0.1", port: 1, from: "understudy@example.com", to: ["ops@example.com"] } },
      { name: "mail-wrong-password", email: { host: "127.0.0.1", port: smtp.port, caSecretRef: { name: "smtp-ca" }, authSecretRef: { name: "smtp-wrong" }, from: "understudy@example.com", to: ["ops@example.com"] } },
      { name: "hook-malformed", webhook: { urlSecretRef: { name: "hook-malformed" } } },
      { name: "hook-no-secret", webhook: { urlSecretRef: { name: "does-not-exist" } } },
      { name: "trap3-wrong-key", timeout: "3s", snmp: { host: "127.0.0.1", port: trap3.port, version: "v3", notification: "inform", v3: { user: "informer", level: "authPriv", credentialsSecretRef: { name: "trap-v3-wrong" } } } },
    ]);
    await w.waitPair("db", "Ready", (p) => condition(p, "Ready").status === "True", 90_000);
    const ok = await waitPolicy("oncall", "oncall Ready", (p) => cond(p, "Ready")?.status === "True" && p.status?.matchedPairs === 1);
    assert.equal(ok.status?.channels?.find((c) => c.name === "trap3")?.engineID, ENGINE);
    const bad = await waitPolicy("broken", "broken: config and login problems shown", (p) => cond(p, "ConfigValid")?.status === "False" && /mail-unreachable/.test(cond(p, "Delivering")?.message ?? "") && /mail-wrong-password/.test(cond(p, "Delivering")?.message ?? ""));
    const cv = cond(bad, "ConfigValid")!;
    assert.equal(cv.reason, "InvalidWebhookURL");
    assert.match(cv.message, /channel hook-malformed \(webhook\): not a URL/);
    assert.doesNotMatch(cv.message, /no-scheme/, "the URL (a secret) is not repeated in full");
    assert.match(cv.message, /channel hook-no-secret \(webhook\): Secret does-not-exist not found in namespace alerts/);
    const dc = cond(bad, "Delivering")!;
    assert.match(dc.message, new RegExp(`channel mail-wrong-password \\(email\\): SMTP server 127\\.0\\.0\\.1:${smtp.port} refused the login`));
    assert.match(dc.message, /channel mail-unreachable \(email\): cannot reach SMTP server 127\.0\.0\.1:1/);
    assert.equal(cond(bad, "Ready")?.status, "False");
    assert.equal(cond(bad, "Ready")?.observedGeneration, 1);
    assert.equal(bad.status?.channels?.find((c) => c.name === "mail-wrong-password")?.lastErrorReason, "SMTPAuthFailed");
    assert.ok(!JSON.stringify(bad.status).includes("not-the-password") && !(await w.op.log()).includes("not-the-password"), "no password in status or log");
  });

  test("the operator's SNMP agent answers snmpwalk with what kubectl shows", async () => {
    await waitFor("snmpwalk shows the pair's phase and active side as kubectl does", async () => {
      const rp = await w.get("db");
      const r = await runTool("snmpwalk", ["-v2c", "-c", "ro-c0mmunity", "-m", "+UNDERSTUDY-MIB", "-M", `+${MIBS}`, `127.0.0.1:${snmpPort}`, "UNDERSTUDY-MIB::understudyPairTable"]);
      assert.deepEqual(mibComplaints(r.stderr), []);
      return r.stdout.includes(`understudyPairName.1 = STRING: ${NS}/db`) && r.stdout.includes(`understudyPairPhase.1 = STRING: ${rp?.status?.phase}`) && r.stdout.includes("understudyPairActiveSide.1 = STRING: source");
    }, 30_000, 500);
  });

  test("source killed: exactly one failover started and one completed per channel (also across an operator restart); bad channels never block the failover", async () => {
    const v = await w.plugin(["verify", "db"]);
    assert.equal(v.code, 0, v.out);
    await w.waitPair("db", "a known good", (x) => !!x.status?.knownGood?.every((k) => k.ok));
    for (let i = 0; i < 10; i++) await (await import("node:fs/promises")).writeFile(path.join(srcDir, `late-${i}.dat`), `late ${i}\n`);
    await w.agents.src!.kill9();
    const p = await w.waitPair("db", "failed over to a", (x) => x.status?.activeSide === "a" && x.status.phase === "FailedOver", 90_000);
    const rec = p.status?.failover?.recoverySeconds;
    await waitFor("every channel got started and completed", async () => {
      const r = await received();
      return Object.values(r).every((c) => c["FailoverStarted/firing"] === 1 && c["FailoverCompleted/info"] === 1) ? r : undefined;
    }, 60_000, 250).catch(async (e: Error) => assert.fail(`${e.message}: ${JSON.stringify(await received())}`));
    const completed = hook.posts.find((x) => x.body.kind === "FailoverCompleted")!;
    assert.match(String(completed.body.summary), new RegExp(`recovery time ${rec}s`));
    assert.equal((completed.body.data as Record<string, string>).recoverySeconds, String(rec));
    assert.equal(hook.posts[0]!.headers.authorization, "Bearer hook-t0ken");
    const mail = smtp.mails.find((m) => m.header("X-Understudy-Event-Kind") === "FailoverStarted")!;
    assert.deepEqual(mail.to.sort(), ["dba@example.com", "dr-site@example.com", "ops@example.com"], "recipients per pair and per server");
    assert.match(mail.header("Subject") ?? "", /\[FIRING\] failover of alerts\/db started/);
    // The bad policy saw the same events: its v3 inform was refused, and it says so.
    const bad = await waitPolicy("broken", "broken: the v3 inform refused", (x) => /trap3-wrong-key \(snmp\): SNMP receiver 127\.0\.0\.1:\d+ refused the v3 credentials of user informer/.test(cond(x, "Delivering")?.message ?? ""));
    assert.ok((bad.status?.channels?.find((c) => c.name === "mail-unreachable")?.pending ?? 0) >= 2, "undelivered events wait (retried with backoff)");
    // Restart the operator: what was sent is in the policy's status, so nothing is sent again.
    const before = JSON.stringify(await received());
    await w.op.stop();
    await w.op.start();
    await waitFor("the new operator leads and sees the failover problem", async () => /understudy_pair_problem\{[^}]*kind="FailoverStarted"[^}]*\} 1/.test(await w.op.metrics()), 60_000, 250);
    await waitPolicy("oncall", "nothing pending", (x) => (x.status?.channels ?? []).every((c) => (c.pending ?? 0) === 0));
    assert.equal(JSON.stringify(await received()), before, "nothing was sent again after the restart");
  });

  test("the old source returns: exactly one resolved per channel, and no other failover message", async () => {
    await w.agents.src!.start(w.tls);
    await w.waitPair("db", "old source reachable (reverse replication)", (x) => !!x.status?.reverse?.state && x.status.reverse.state !== "source unreachable", 90_000);
    await waitFor("every channel got the resolved", async () => Object.values(await received()).every((c) => c["FailoverStarted/resolved"] === 1), 60_000, 250).catch(async (e: Error) => assert.fail(`${e.message}: ${JSON.stringify(await received())}`));
    const np = await waitPolicy("oncall", "delivered and nothing pending", (x) => (x.status?.channels ?? []).every((c) => (c.pending ?? 0) === 0 && !!c.lastSentTime) && !(x.status?.alerts ?? []).some((a) => a.kind === "FailoverStarted"));
    for (const [ch, c] of Object.entries(await received())) {
      assert.equal(c["FailoverStarted/firing"], 1, `${ch}: ${JSON.stringify(c)}`);
      assert.equal(c["FailoverCompleted/info"], 1, `${ch}: ${JSON.stringify(c)}`);
      assert.equal(c["FailoverStarted/resolved"], 1, `${ch}: ${JSON.stringify(c)}`);
      for (const [k, n] of Object.entries(c)) assert.equal(n, 1, `${ch}: ${k} sent ${n} times`);
    }
    assert.equal(cond(np, "Ready")?.status, "True");
    process.stderr.write(`# received per channel: ${JSON.stringify(await received())}\n`);
    const r = hook.posts.find((x) => x.body.state === "resolved" && x.body.kind === "FailoverStarted")!;
    assert.match(String(r.body.detail), /old source is reachable again/);
  });

  test("the chart renders the PrometheusRule and the Grafana dashboard only when asked", async () => {
    const render = async (sets: string[], api: string[] = []) => {
      const h = await w.cluster.helm(["template", "u", path.join(REPO, "charts/understudy"), "--set", "agentTLS.secretName=x", ...api.flatMap((a) => ["--api-versions", a]), ...sets.flatMap((s) => ["--set", s])]);
      assert.equal(h.code, 0, h.stderr);
      return YAML.parseAllDocuments(h.stdout).map((d) => d.toJS() as { kind: string; metadata: { labels?: Record<string, string> }; spec?: { groups: { rules: { alert: string; expr: string }[] }[] }; data?: Record<string, string> }).filter(Boolean);
    };
    const plain = await render([], ["monitoring.coreos.com/v1/PrometheusRule"]);
    assert.ok(!plain.some((d) => d.kind === "PrometheusRule" || d.metadata?.labels?.grafana_dashboard), "both off by default");
    const on = await render(["notifications.prometheusRule.enabled=true", "notifications.grafanaDashboard.enabled=true"], ["monitoring.coreos.com/v1/PrometheusRule"]);
    const rule = on.find((d) => d.kind === "PrometheusRule")!;
    const alerts = rule.spec!.groups.flatMap((g) => g.rules.map((r) => r.alert));
    for (const a of ["UnderstudyFailoverInProgress", "UnderstudyFailoverRefused", "UnderstudyPairDegraded", "UnderstudyTargetNotKnownGood", "UnderstudyVerifyFoundDifferences", "UnderstudyAgentVersionMismatch", "UnderstudyLagHigh", "UnderstudyQueueHigh"]) assert.ok(alerts.includes(a), `${a} in ${alerts}`);
    const dash = on.find((d) => d.kind === "ConfigMap" && d.metadata.labels?.grafana_dashboard === "1")!;
    const json = JSON.parse(dash.data!["understudy.json"]!) as { panels: { targets?: { expr: string }[] }[] };
    assert.ok(json.panels.some((p) => p.targets?.some((t) => t.expr.includes("understudy_pair_problem"))));
    // The metric the rules and the dashboard use is what the operator exports.
    assert.match(await w.op.metrics(), /# TYPE understudy_pair_problem gauge/);
  });
});
