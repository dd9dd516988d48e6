// `understudy demo` shows the dashboard on its own agents, without Kubernetes:
// a real Chromium opens the URL the demo prints and sees the pair replicate,
// runs a verify from the page, and is told why failover needs the operator.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { rm } from "node:fs/promises";
import path from "node:path";
import { CLI, freePort, tmpDir, waitFor } from "./harness.ts";
import { launchChromium } from "./browser.ts";

let demo: ChildProcess;
let out = "";
let dir: string;
let browser: Awaited<ReturnType<typeof launchChromium>>;

before(async () => {
  dir = await tmpDir("understudy-demo-dash-");
  const port = await freePort();
  demo = spawn(process.execPath, [CLI, "demo", "--dir", path.join(dir, "demo"), "--dashboard", `127.0.0.1:${port}`, "--duration", "300"], { stdio: ["ignore", "pipe", "pipe"] });
  demo.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  demo.stderr!.setEncoding("utf8").on("data", (d: string) => (out += d));
  browser = await launchChromium();
});

after(async () => {
  await browser?.dispose();
  // SIGTERM ends the demo; a demo spawned with piped output does not always exit on it (also before
  // the dashboard), so it gets SIGKILL after a grace period: this test is about the page.
  demo?.kill("SIGTERM");
  const killer = setTimeout(() => demo.kill("SIGKILL"), 15_000);
  await new Promise((r) => (demo.exitCode !== null || demo.signalCode !== null ? r(undefined) : demo.once("exit", r)));
  clearTimeout(killer);
  await rm(dir, { recursive: true, force: true });
});

test("understudy demo prints the dashboard's URL, and the page shows its pair live, runs a verify, and says why failover needs the operator", async () => {
  const url = await waitFor("the demo to print the dashboard URL", () => /dashboard: (http:\/\/127\.0\.0\.1:\d+\/)/.exec(out)?.[1], 60_000, 100).catch((e: Error) => assert.fail(`${e.message}\noutput:\n${out.slice(-2000)}`));
  const page = await browser.newPage();
  await page.goto(url);
  await page.waitForSelector('tr[data-pair="demo/www"] [data-phase=Replicating]', { timeout: 60_000 });
  assert.match((await page.textContent("header .who")) ?? "", /demo \(no Kubernetes\)/);
  await page.waitForSelector("#events li[data-reason=MirrorComplete]", { timeout: 60_000 });
  await page.click('a[href="#/pair/demo/www"]');
  await page.waitForSelector("button[data-action=verify]:not([disabled])", { timeout: 30_000 });
  assert.equal(await page.isDisabled("button[data-action=failover]"), true);
  assert.match((await page.textContent("[data-why=failover]")) ?? "", /failover needs the operator on Kubernetes/);
  await page.click("button[data-action=verify]");
  await page.click("[data-confirm=yes]");
  await page.waitForSelector("#progress.ok", { timeout: 60_000 }).catch(async (e: Error) => assert.fail(`${e.message}\n${await page.textContent("#progress")}`));
  assert.match((await page.textContent("#progress")) ?? "", /verify: Passed, \d+ files compared/);
  await page.close();
});
