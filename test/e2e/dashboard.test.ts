// The dashboard in a real browser (Debian's headless Chromium, driven by
// playwright-core) against the real thing: a kube-apiserver with the chart
// installed (dashboard on), the operator with only the chart's ServiceAccount
// token, agents replicating over mTLS, and people signing in with their own
// ServiceAccount tokens: "ops" may change pairs, "viewer" may only read.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, createPublicKey } from "node:crypto";
import { copyFile, mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { request } from "node:https";
import path from "node:path";
import YAML from "yaml";
import { KubeConfig, Watch } from "@kubernetes/client-node";
import type { Page } from "playwright-core";
import { startCluster, type Cluster } from "../env/cluster.ts";
import { REPO, freePort, tmpDir, waitFor, type AgentProc } from "./harness.ts";
import { OperatorProc, Pki, getPair, kubectlOk, pairYaml, tlsAgent, waitCondition } from "./k8s-harness.ts";
import { launchChromium } from "./browser.ts";
import type { TlsConfig } from "../../common/config.ts";
import type { ReplicationPair } from "../../operator/api/v1alpha1/index.ts";

const NS = "apps";
const SYS = "understudy-system";
/** UNDERSTUDY_SCREENSHOTS=1 puts the screenshots where the README shows them (docs/); else into the test's dir. */
const shotsDir = (dir: string) => (process.env.UNDERSTUDY_SCREENSHOTS === "1" ? path.join(REPO, "docs") : dir);

describe("dashboard in a real browser", { timeout: 900_000 }, () => {
  let cluster: Cluster;
  let dir: string;
  let pki: Pki;
  let source: AgentProc;
  let target: AgentProc;
  let sourceTls: TlsConfig;
  let op: OperatorProc;
  let url: string;
  let caPem: string;
  let browser: Awaited<ReturnType<typeof launchChromium>>;
  const tokens: Record<"ops" | "viewer", string> = { ops: "", viewer: "" };

  /** HTTPS GET/POST to the dashboard from the test, trusting only the test CA. */
  function call(p: string, o: { token?: string; method?: string; body?: string } = {}): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const req = request(new URL(p, url), { method: o.method ?? "GET", ca: caPem, headers: o.token ? { Authorization: `Bearer ${o.token}` } : {} }, (res) => {
        let body = "";
        res.setEncoding("utf8").on("data", (d: string) => (body += d)).on("end", () => resolve({ status: res.statusCode ?? 0, body }));
      });
      req.on("error", reject);
      req.end(o.body);
    });
  }

  async function signIn(page: Page, who: "ops" | "viewer"): Promise<void> {
    await page.goto(url);
    await page.evaluate("sessionStorage.clear()");
    await page.reload();
    await page.waitForSelector("#token", { timeout: 30_000 });
    await page.fill("#token", tokens[who]);
    await page.click("button[type=submit]");
    await page.waitForSelector("#live.on", { timeout: 30_000 });
    await page.waitForFunction(`document.querySelector("header .who")?.textContent?.includes("system:serviceaccount:${NS}:${who}")`, undefined, { timeout: 30_000 });
  }

  before(async () => {
    dir = await tmpDir("understudy-dash-");
    cluster = await startCluster({ dir: path.join(dir, "k8s") });
    pki = await Pki.create(path.join(dir, "pki"));
    for (const name of ["web", "shop"]) {
      const d = path.join(dir, name);
      await mkdir(path.join(d, "sub"), { recursive: true });
      for (let i = 0; i < 20; i++) await writeFile(path.join(d, "sub", `f${i}.txt`), `${name} ${i}\n`.repeat(100 + i));
    }
    ({ agent: target } = await tlsAgent(pki, dir, "dst-agent", { targetRoot: path.join(dir, "dst") }));
    ({ agent: source, tls: sourceTls } = await tlsAgent(pki, dir, "src-agent"));
    await target.start(sourceTls);
    await source.start(sourceTls);

    await kubectlOk(cluster, ["create", "namespace", NS]);
    const h = await cluster.helm(["install", "understudy", path.join(REPO, "charts/understudy"), "-n", SYS, "--create-namespace", "--set", "agentTLS.secretName=agent-tls", "--set", "dashboard.enabled=true"]);
    assert.equal(h.code, 0, h.stderr);
    const sa = (await kubectlOk(cluster, ["get", "serviceaccount", "-n", SYS, "-l", "app.kubernetes.io/instance=understudy", "-o", "jsonpath={.items[0].metadata.name}"])).trim();
    const kubeconfig = await cluster.writeKubeconfigForToken(await cluster.createToken(SYS, sa), path.join(dir, "operator.kubeconfig"));
    const args = JSON.parse(await kubectlOk(cluster, ["get", "deployment", "-n", SYS, "-o", "jsonpath={.items[0].spec.template.spec.containers[0].args}"])) as string[];
    assert.ok(args.includes("--dashboard-address"), `the chart turns the dashboard on: ${args.join(" ")}`);
    assert.equal((await kubectlOk(cluster, ["get", "service", "-n", SYS, "-l", "app.kubernetes.io/instance=understudy", "-o", "jsonpath={.items[*].spec.ports[*].name}"])).includes("https"), true, "the chart has a Service for the dashboard");

    // The dashboard's serving certificate, from the test CA; Chromium trusts exactly its key.
    const dt = await pki.tlsFor("understudy-dashboard");
    const tlsDir = path.join(dir, "dashboard-tls");
    await mkdir(tlsDir);
    await copyFile(dt.cert, path.join(tlsDir, "tls.crt"));
    await copyFile(dt.key, path.join(tlsDir, "tls.key"));
    caPem = await readFile(dt.ca, "utf8");
    const spki = createHash("sha256").update(createPublicKey(await readFile(dt.cert)).export({ type: "spki", format: "der" })).digest("base64");
    const port = await freePort();
    url = `https://127.0.0.1:${port}/`;
    op = await OperatorProc.create({ kubeconfig, tlsDir: await pki.operatorTlsDir(), logPath: path.join(dir, "operator.log"), leaseNamespace: SYS, extra: ["--leader-election-id", args[args.indexOf("--leader-election-id") + 1]!, "--dashboard-address", `127.0.0.1:${port}`, "--dashboard-tls-dir", tlsDir] });
    await op.start();

    // People: ops may change pairs in apps, viewer may only read them (and their events).
    const role = (name: string, pairVerbs: string[]) => ({ apiVersion: "rbac.authorization.k8s.io/v1", kind: "Role", metadata: { name, namespace: NS }, rules: [{ apiGroups: ["understudy.dev"], resources: ["replicationpairs"], verbs: pairVerbs }, { apiGroups: [""], resources: ["events"], verbs: ["get", "list", "watch"] }] });
    for (const [who, verbs] of [["ops", ["get", "list", "watch", "patch"]], ["viewer", ["get", "list", "watch"]]] as const) {
      await kubectlOk(cluster, ["create", "serviceaccount", who, "-n", NS]);
      await kubectlOk(cluster, ["apply", "-f", "-"], JSON.stringify(role(who, [...verbs])));
      await kubectlOk(cluster, ["create", "rolebinding", who, "-n", NS, `--role=${who}`, `--serviceaccount=${NS}:${who}`]);
      tokens[who] = await cluster.createToken(NS, who);
    }
    // A manual policy: the known-good gate shows, and nothing fails over on its own.
    await kubectlOk(cluster, ["apply", "-f", "-"], JSON.stringify({ apiVersion: "understudy.dev/v1alpha1", kind: "FailoverPolicy", metadata: { name: "web-ha", namespace: NS }, spec: { selector: { matchLabels: { tier: "web" } }, approval: "manual", healthCheck: { interval: "1s", missedBeats: 3 } } }));
    for (const name of ["web", "shop"]) {
      const doc = JSON.parse(JSON.stringify(YAML.parse(pairYaml({ name, namespace: NS, source: source.address, targets: [{ name: "standby", address: target.address }], path: path.join(dir, name) })))) as ReplicationPair;
      doc.metadata.labels = { tier: "web" };
      await kubectlOk(cluster, ["apply", "-f", "-"], JSON.stringify(doc));
    }
    // A pair in a namespace neither person may read: it must not reach their page.
    await kubectlOk(cluster, ["create", "namespace", "vault"]);
    await kubectlOk(cluster, ["apply", "-f", "-"], pairYaml({ name: "secret", namespace: "vault", source: source.address, targets: [{ name: "standby", address: target.address }], path: path.join(dir, "shop") }));
    for (const name of ["web", "shop"]) await waitCondition(cluster, NS, name, "Ready", "True", 90_000);
    await waitFor("the dashboard to answer", async () => (await call("/").catch(() => undefined))?.status === 200, 30_000, 250);
    browser = await launchChromium({ trustSpki: [spki] });
  });

  after(async () => {
    await browser?.dispose();
    await op?.stop().catch(() => undefined);
    await source?.stop();
    await target?.stop();
    await cluster?.stop();
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });

  test("without a valid token the API refuses and the page asks to sign in", async () => {
    assert.equal((await call("/api/live")).status, 401);
    const bad = await call("/api/live", { token: "not-a-token" });
    assert.equal(bad.status, 401);
    assert.match(bad.body, /does not accept this token/);
    const page = await browser.newPage();
    await page.goto(url);
    await page.waitForSelector("#token");
    assert.match((await page.textContent(".signin")) ?? "", /bearer token/i);
    await page.close();
  });

  test("the dashboard lists the pairs with the same phase and lag as kubectl get rp, and their events", async () => {
    const page = await browser.newPage({ viewport: { width: 1500, height: 800 } });
    await signIn(page, "viewer");
    let last = "";
    await waitFor("page and kubectl to agree", async () => {
      const kc = (await kubectlOk(cluster, ["get", "rp", "-n", NS, "-o", "custom-columns=NAME:.metadata.name,PHASE:.status.phase,LAG:.status.lag", "--no-headers"])).trim().split("\n").map((l) => l.trim().split(/\s+/).join(" ")).sort();
      const rows = await page.$$eval("tr[data-pair]", (trs) => trs.map((tr) => `${tr.getAttribute("data-pair")!.split("/")[1]} ${tr.querySelector("[data-phase]")?.getAttribute("data-phase")} ${tr.querySelector("td.lag .num")?.textContent}`).sort());
      last = `kubectl: ${kc.join(" | ")}\npage:    ${rows.join(" | ")}`;
      return kc.length === 2 && JSON.stringify(kc) === JSON.stringify(rows);
    }, 30_000, 500).catch((e: Error) => assert.fail(`${e.message}\n${last}`));
    assert.equal(await page.$('tr[data-pair="vault/secret"]'), null, "a pair in a namespace the viewer may not read is not shown");
    assert.match((await page.textContent(".pairs .note")) ?? "", /viewer may not list ReplicationPairs in 1 namespace/);
    // The known-good gate per target, with the checks that fail, as status.knownGood has it. (Under
    // this policy the operator verifies a new copy by itself, so the gate moves from "never verified"
    // to known good on its own: compare with the status, read again each time.)
    let kgLast = "";
    await waitFor("the page's known-good gate to match status.knownGood", async () => {
      const kg = JSON.parse((await kubectlOk(cluster, ["get", "rp", "web", "-n", NS, "-o", "jsonpath={.status.knownGood}"])) || "[]") as { target: string; ok: boolean; failed?: string[] }[];
      const want = kg.map((k) => (k.ok ? `✓ ${k.target}` : `✗ ${k.target}: ${(k.failed ?? []).join("; ")}`)).join("");
      const shown = ((await page.textContent(`tr[data-pair="${NS}/web"] ul.kg`)) ?? "").trim();
      kgLast = `status: ${want} | page: ${shown}`;
      return kg.length === 1 && kg[0]!.target === "standby" && shown === want;
    }, 30_000, 250).catch((e: Error) => assert.fail(`${e.message}\n${kgLast}`));
    // Events of the pairs and the policy, filterable by pair.
    await page.waitForSelector("#events li[data-reason=SetCreated]", { timeout: 30_000 });
    await page.selectOption("select[aria-label='filter by pair']", `${NS}/shop`);
    const objs = await page.$$eval("#events li .obj", (els) => els.map((e) => e.textContent ?? ""));
    assert.ok(objs.length > 0 && objs.every((o) => o.endsWith(`${NS}/shop`)), `only shop's events: ${objs.join(", ")}`);
    await page.close();
  });

  test("a pair going Degraded shows on the page within 2 s of its status", async () => {
    const page = await browser.newPage();
    await signIn(page, "viewer");
    await page.waitForSelector(`tr[data-pair="${NS}/web"] [data-phase=Replicating]`);
    // The page notes when it first shows Degraded; the test notes when the API server says so (a watch).
    // (browser-side code as strings: this file is type-checked without the DOM library)
    await page.evaluate(`new MutationObserver(() => {
        if (!window.degradedAt && document.querySelector('tr[data-pair="${NS}/web"] [data-phase=Degraded]')) window.degradedAt = Date.now();
      }).observe(document.body, { subtree: true, childList: true, attributes: true, characterData: true })`);
    const kc = new KubeConfig();
    kc.loadFromFile(cluster.kubeconfig);
    let apiAt = 0;
    const req = await new Watch(kc).watch(`/apis/understudy.dev/v1alpha1/namespaces/${NS}/replicationpairs`, { fieldSelector: "metadata.name=web" }, (_type, obj: ReplicationPair) => {
      if (!apiAt && obj.status?.phase === "Degraded") apiAt = Date.now();
    }, () => undefined);
    try {
      await target.stop();
      await waitFor("the API server to say Degraded", () => apiAt > 0, 60_000, 50);
      const pageAt = await waitFor("the page to show Degraded", async () => (await page.evaluate("window.degradedAt")) as number | undefined, 30_000, 50);
      process.stderr.write(`# Degraded: status → page in ${pageAt - apiAt} ms\n`);
      assert.ok(pageAt - apiAt < 2000, `the page showed Degraded ${pageAt - apiAt} ms after the status said so`);
    } finally {
      req.abort();
      await target.start(sourceTls);
    }
    await waitCondition(cluster, NS, "web", "Ready", "True", 90_000);
    await page.waitForSelector(`tr[data-pair="${NS}/web"] [data-phase=Replicating]`, { timeout: 30_000 });
    await page.close();
  });

  test("a read-only token: the actions say why they are not allowed, and the same request is refused", async () => {
    const page = await browser.newPage();
    await signIn(page, "viewer");
    await page.click(`a[href="#/pair/${NS}/web"]`);
    await page.waitForSelector("button[data-action=failover]");
    await page.waitForSelector("[data-why=failover]", { timeout: 30_000 });
    assert.equal(await page.isDisabled("button[data-action=failover]"), true);
    const why = (await page.textContent("[data-why=failover]")) ?? "";
    assert.match(why, new RegExp(`system:serviceaccount:${NS}:viewer may not patch replicationpairs.understudy.dev "web" in namespace ${NS} \\(what kubectl understudy failover needs\\)`));
    // The click the page would make, made anyway: refused with the same reason, and nothing changed.
    const r = await page.evaluate(async ([u, t]) => {
      const res = await fetch(`${u}api/pairs/apps/web/actions/failover`, { method: "POST", headers: { Authorization: `Bearer ${t}`, "Content-Type": "application/json" }, body: JSON.stringify({ target: "standby" }) });
      return { status: res.status, body: await res.text() };
    }, [url, tokens.viewer] as const);
    assert.equal(r.status, 403);
    assert.match(r.body, /viewer may not patch replicationpairs/);
    assert.equal((await getPair(cluster, NS, "web"))?.spec.activeSide ?? "source", "source", "nothing changed");
    await page.close();
  });

  test("a verify and a failover started from the page with a token that may do them complete", async () => {
    const page = await browser.newPage({ viewport: { width: 1500, height: 900 } });
    await signIn(page, "ops");
    await page.click(`a[href="#/pair/${NS}/web"]`);
    await page.waitForSelector("button[data-action=verify]:not([disabled])", { timeout: 30_000 });
    await page.click("button[data-action=verify]");
    await page.click("[data-confirm=yes]");
    await page.waitForSelector("#progress.ok", { timeout: 90_000 }).catch(async (e: Error) => assert.fail(`${e.message}\n${await page.textContent("#progress")}`));
    assert.equal((await getPair(cluster, NS, "web"))?.status?.lastVerify?.result, "Passed");
    await page.waitForFunction(`document.querySelector("td .ok")?.textContent?.includes("yes")`, undefined, { timeout: 30_000 });

    await page.selectOption("select[aria-label='failover target']", "standby");
    await page.click("button[data-action=failover]");
    assert.match((await page.textContent(".modal")) ?? "", /Fail over apps\/web to standby\?/);
    await page.click("[data-confirm=yes]");
    await page.waitForSelector("#progress.ok", { timeout: 120_000 }).catch(async (e: Error) => assert.fail(`${e.message}\n${await page.textContent("#progress")}\n${(await op.log()).split("\n").slice(-15).join("\n")}`));
    const p = await getPair(cluster, NS, "web");
    assert.equal(p?.spec.activeSide, "standby");
    assert.equal(p?.status?.activeSide, "standby");
    assert.equal(p?.status?.phase, "FailedOver");
    assert.ok(((await page.textContent("#progress")) ?? "").includes("failover of apps/web to standby requested"));
    await page.waitForSelector(`[data-phase=FailedOver]`, { timeout: 30_000 });
    await page.waitForFunction(`/cutover → standby · [\\d.]+ s/.test(document.querySelector("ul.fo")?.textContent ?? "")`, undefined, { timeout: 30_000 });

    // Screenshots for the README: the detail page, then the overview.
    await page.evaluate("window.scrollTo(0, 0)");
    await page.screenshot({ path: path.join(shotsDir(dir), "dashboard-detail.png"), fullPage: true });
    await page.click("a[href='#/']");
    await page.waitForSelector(`tr[data-pair="${NS}/shop"]`);
    await page.screenshot({ path: path.join(shotsDir(dir), "dashboard-overview.png") });
    await page.close();
  });
});
