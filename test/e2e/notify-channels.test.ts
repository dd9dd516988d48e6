// Notification channels against real receivers started here: an SMTP server
// with STARTTLS/implicit TLS and AUTH, an HTTP endpoint, net-snmp's snmptrapd
// (v2c and v3 traps, v3 informs), snmpwalk against the operator's SNMP agent,
// and snmptranslate loading mibs/UNDERSTUDY-MIB.txt. Bad input fails with a
// reason a person can act on, within the channel's deadline.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFile, rm } from "node:fs/promises";
import path from "node:path";
import { tmpDir } from "./harness.ts";
import { Pki } from "./k8s-harness.ts";
import { MIBS, mibComplaints, runTool, startSmtp, startTrapd, startWebhook } from "./receivers.ts";
import { EmailSender } from "../../operator/notify/email.ts";
import { WebhookSender } from "../../operator/notify/webhook.ts";
import { PairTableAgent, SnmpSender } from "../../operator/notify/snmp.ts";
import { DeliveryError } from "../../operator/notify/channel.ts";
import { createLogger } from "../../common/log.ts";
import type { NotificationEvent, ReplicationPair } from "../../operator/api/v1alpha1/index.ts";

const ev = (over: Partial<NotificationEvent> = {}): NotificationEvent => ({ id: "e1", kind: "FailoverStarted", state: "firing", severity: "critical", namespace: "shop", pair: "db", summary: "failover of shop/db started: source 10.0.0.5:7702 is down, a takes over", detail: "details", at: "2026-12-08T01:00:00Z", servers: ["src", "a"], ...over });
const rejectsWith = async (p: Promise<unknown>, reason: string, msg: RegExp) => {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof DeliveryError, `a DeliveryError, not ${e}`);
    assert.equal(e.reason, reason, e.message);
    assert.match(e.message, msg);
    return true;
  });
};

describe("notification channels against real receivers", { timeout: 180_000 }, () => {
  let dir: string;
  let pki: Pki;
  let tls: { ca: string; cert: string; key: string };
  let ca: string;
  before(async () => {
    dir = await tmpDir("understudy-notify-");
    pki = await Pki.create(path.join(dir, "pki"));
    tls = await pki.tlsFor("smtp");
    ca = await readFile(tls.ca, "utf8");
  });
  after(async () => {
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });

  test("email: STARTTLS and AUTH, recipients per pair and per server; implicit TLS; wrong password, unreachable host and untrusted certificate each say so", async () => {
    const key = await readFile(tls.key, "utf8");
    const cert = await readFile(tls.cert, "utf8");
    const smtp = await startSmtp({ key, cert, users: { alerts: "s3cret-pass" } });
    const smtps = await startSmtp({ key, cert, users: { alerts: "s3cret-pass" }, implicitTls: true });
    try {
      const good = new EmailSender({ host: "127.0.0.1", port: smtp.port, security: "starttls", ca, auth: { user: "alerts", pass: "s3cret-pass" }, from: "understudy@example.com", to: ["ops@example.com"], recipients: [{ to: ["dba@example.com"], pairs: ["db"] }, { to: ["other@example.com"], pairs: ["web"] }, { to: ["dc2@example.com"], servers: ["a"] }] });
      await good.verify(5000);
      await good.send(ev(), 5000);
      assert.equal(smtp.mails.length, 1);
      const m = smtp.mails[0]!;
      assert.equal(m.secure, true, "the message went over TLS (STARTTLS)");
      assert.equal(m.user, "alerts");
      assert.deepEqual(m.to.sort(), ["dba@example.com", "dc2@example.com", "ops@example.com"]);
      assert.match(m.header("Subject") ?? "", /\[understudy\] \[FIRING\] failover of shop\/db started/);
      assert.equal(m.header("X-Understudy-Event-Kind"), "FailoverStarted");

      await new EmailSender({ host: "127.0.0.1", port: smtps.port, security: "tls", ca, auth: { user: "alerts", pass: "s3cret-pass" }, from: "understudy@example.com", to: ["ops@example.com"] }).send(ev({ state: "resolved", severity: "info", summary: "resolved: x" }), 5000);
      assert.equal(smtps.mails.length, 1);
      assert.equal(smtps.mails[0]!.secure, true);

      const wrong = new EmailSender({ host: "127.0.0.1", port: smtp.port, security: "starttls", ca, auth: { user: "alerts", pass: "not-the-password" }, from: "understudy@example.com", to: ["ops@example.com"] });
      await rejectsWith(wrong.verify(5000), "SMTPAuthFailed", /refused the login/);
      await rejectsWith(wrong.send(ev(), 5000), "SMTPAuthFailed", /127\.0\.0\.1:\d+/);
      assert.ok(!JSON.stringify(smtp.mails).includes("not-the-password"));
      await rejectsWith(new EmailSender({ host: "127.0.0.1", port: 1, security: "starttls", from: "u@example.com", to: ["o@example.com"] }).send(ev(), 3000), "SMTPUnreachable", /cannot reach SMTP server 127\.0\.0\.1:1/);
      await rejectsWith(new EmailSender({ host: "127.0.0.1", port: smtp.port, security: "starttls", auth: { user: "alerts", pass: "s3cret-pass" }, from: "u@example.com", to: ["o@example.com"] }).send(ev(), 5000), "SMTPTLSFailed", /certificate/);
      assert.equal(smtp.mails.length, 1, "nothing else arrived");
    } finally {
      await smtp.stop();
      await smtps.stop();
    }
  });

  test("webhook: understudy JSON and the Slack shape, headers from a Secret; a failing endpoint says its HTTP status; a malformed URL is refused before sending", async () => {
    const hook = await startWebhook();
    const down = await startWebhook({ status: 503 });
    try {
      await new WebhookSender({ url: hook.url, format: "json", headers: { authorization: "Bearer tok" } }).send(ev(), 5000);
      await new WebhookSender({ url: hook.url, format: "slack", headers: {} }).send(ev({ state: "resolved", severity: "info", summary: "resolved: failover of shop/db" }), 5000);
      assert.equal(hook.posts.length, 2);
      assert.equal(hook.posts[0]!.body.kind, "FailoverStarted");
      assert.equal(hook.posts[0]!.body.state, "firing");
      assert.equal(hook.posts[0]!.headers.authorization, "Bearer tok");
      assert.match(String(hook.posts[1]!.body.text), /RESOLVED/);
      assert.ok(Array.isArray(hook.posts[1]!.body.blocks));
      await rejectsWith(new WebhookSender({ url: down.url, format: "json", headers: {} }).send(ev(), 5000), "WebhookRejected", /HTTP 503/);
      assert.throws(() => new WebhookSender({ url: "http//nohost", format: "json", headers: {} }), (e: DeliveryError) => e.reason === "InvalidWebhookURL");
      await rejectsWith(new WebhookSender({ url: "http://127.0.0.1:1/x/SECRET", format: "json", headers: {} }).send(ev(), 3000), "WebhookUnreachable", /^POST http:\/\/127\.0\.0\.1:1\/…: .*ECONNREFUSED/);
    } finally {
      await hook.stop();
      await down.stop();
    }
  });

  test("SNMP: v2c and v3 traps and v3 informs reach snmptrapd, decoded with UNDERSTUDY-MIB; wrong v3 keys are refused and said so", async () => {
    const engineID = "800007e5801122334455667788";
    const trapd = await startTrapd(path.join(dir, "trapd"), { community: "c0mmunity", users: [{ user: "traps", auth: "authpass123", priv: "privpass123", engineID }, { user: "informs", auth: "authpass123", priv: "privpass123" }] });
    try {
      const base = { host: "127.0.0.1", port: trapd.port };
      await new SnmpSender({ ...base, version: "v2c", notification: "trap", community: "c0mmunity" }).send(ev({ id: "v2c-trap" }), 5000);
      await new SnmpSender({ ...base, version: "v2c", notification: "inform", community: "c0mmunity" }).send(ev({ id: "v2c-inform" }), 5000);
      const v3 = (user: string, authKey: string) => ({ user, level: "authPriv" as const, authProtocol: "sha", privProtocol: "aes", authKey, privKey: "privpass123", engineID });
      await new SnmpSender({ ...base, version: "v3", notification: "trap", v3: v3("traps", "authpass123") }).send(ev({ id: "v3-trap" }), 5000);
      await new SnmpSender({ ...base, version: "v3", notification: "inform", v3: v3("informs", "authpass123") }).send(ev({ id: "v3-inform", state: "resolved", severity: "info" }), 5000);
      await rejectsWith(new SnmpSender({ ...base, version: "v3", notification: "inform", v3: v3("informs", "wrongpass123") }).send(ev({ id: "bad" }), 5000), "SNMPAuthFailed", /refused the v3 credentials of user informs/);
      let traps: Awaited<ReturnType<typeof trapd.traps>> = [];
      for (let i = 0; i < 100 && traps.length < 4; i++) {
        traps = await trapd.traps();
        if (traps.length < 4) await new Promise((r) => setTimeout(r, 50));
      }
      assert.deepEqual(traps.map((t) => t.id).sort(), ["v2c-inform", "v2c-trap", "v3-inform", "v3-trap"]);
      const t = traps.find((x) => x.id === "v3-inform")!;
      assert.equal(t.kind, "FailoverStarted");
      assert.equal(t.state, "resolved");
      assert.equal(t.pair, "shop/db");
      assert.match(t.line, /UNDERSTUDY-MIB::understudyEvent\b/, "snmptrapd names the notification from the MIB");
      assert.throws(() => new SnmpSender({ ...base, version: "v3", notification: "inform", v3: v3("informs", "short") }), /authKey must be at least 8/);
    } finally {
      await trapd.stop();
    }
  });

  test("SNMP agent: snmpwalk reads the pair table; a wrong community gets nothing; snmptranslate loads the MIB", async () => {
    const pairs = [
      { metadata: { namespace: "shop", name: "db" }, spec: {}, status: { phase: "FailedOver", activeSide: "a", lagSeconds: 0.25, queuedBytes: 8192, lastVerify: { target: "a", result: "Passed", finishedAt: "2026-12-08T01:00:00Z", differences: 0 } } },
      { metadata: { namespace: "shop", name: "web" }, spec: {}, status: { phase: "Replicating" } },
    ] as unknown as ReplicationPair[];
    const { freeUdpPort } = await import("./receivers.ts");
    const port = await freeUdpPort();
    const agent = new PairTableAgent({ address: "127.0.0.1", port, communities: ["pub1ic-ro"], pairs: () => pairs, log: createLogger("test", "warn"), refreshMs: 100 });
    await agent.start();
    try {
      const walk = await runTool("snmpwalk", ["-v2c", "-c", "pub1ic-ro", "-m", "+UNDERSTUDY-MIB", "-M", `+${MIBS}`, `127.0.0.1:${port}`, "UNDERSTUDY-MIB::understudyPairTable"]);
      assert.equal(walk.code, 0, walk.stderr);
      assert.deepEqual(mibComplaints(walk.stderr), []);
      for (const line of ["understudyPairName.1 = STRING: shop/db", "understudyPairPhase.1 = STRING: FailedOver", "understudyPairActiveSide.1 = STRING: a", "understudyPairLagMillis.1 = Gauge32: 250", "understudyPairQueuedBytes.1 = Gauge32: 8192", "understudyPairLastVerify.1 = STRING: Passed a 2026-12-08T01:00:00Z 0", "understudyPairName.2 = STRING: shop/web", "understudyPairPhase.2 = STRING: Replicating"]) assert.ok(walk.stdout.includes(line), `${line} in\n${walk.stdout}`);
      // GET of one cell, numerically (what a poller without the MIB does)
      const get = await runTool("snmpget", ["-v2c", "-c", "pub1ic-ro", "-On", `127.0.0.1:${port}`, "1.3.6.1.3.7701.1.1.1.3.2"]);
      assert.match(get.stdout, /\.1\.3\.6\.1\.3\.7701\.1\.1\.1\.3\.2 = STRING: "?Replicating/);
      // the table follows the cache
      (pairs[1]!.status as { phase: string }).phase = "Degraded";
      agent.refresh();
      assert.match((await runTool("snmpget", ["-v2c", "-c", "pub1ic-ro", "-On", `127.0.0.1:${port}`, "1.3.6.1.3.7701.1.1.1.3.2"])).stdout, /Degraded/);
      const denied = await runTool("snmpwalk", ["-v2c", "-c", "guess", "-t", "1", "-r", "0", `127.0.0.1:${port}`, "1.3.6.1.3.7701"]);
      assert.doesNotMatch(denied.stdout, /shop\/db/);
      const tr = await runTool("snmptranslate", ["-m", "+UNDERSTUDY-MIB", "-M", `+${MIBS}`, "-On", "UNDERSTUDY-MIB::understudyEvent", "UNDERSTUDY-MIB::understudyPairLastVerify"]);
      assert.equal(tr.code, 0, tr.stderr);
      assert.deepEqual(tr.stdout.trim().split(/\s+/), [".1.3.6.1.3.7701.2.1", ".1.3.6.1.3.7701.1.1.1.7"]);
      assert.deepEqual(mibComplaints(tr.stderr), [], "snmptranslate parses UNDERSTUDY-MIB without complaint");
      const tree = await runTool("snmptranslate", ["-m", "+UNDERSTUDY-MIB", "-M", `+${MIBS}`, "-Tp", "UNDERSTUDY-MIB::understudyMIB"]);
      assert.match(tree.stdout, /understudyPairQueuedBytes\(6\)/);
    } finally {
      await agent.stop();
    }
  });
});
