// `understudy demo`: the embedded default. Two agents on loopback in one
// process: "demo-source" replicates <dir>/source to "demo-target", whose image
// is <dir>/replica/demo-source/www. A small writer keeps changing files so the
// live status has something to show.
import { appendFile, mkdir, writeFile, rm, rename } from "node:fs/promises";
import path from "node:path";
import { parseAgentConfig } from "../common/config.ts";
import { createLogger } from "../common/log.ts";
import { Agent } from "./agent.ts";
import { formatStatus } from "./status-format.ts";

export async function runDemo(o: { dir: string; durationMs?: number; dashboard?: string }): Promise<void> {
  const dir = path.resolve(o.dir);
  const src = path.join(dir, "source");
  await mkdir(path.join(src, "site", "css"), { recursive: true });
  await writeFile(path.join(src, "site", "index.html"), "<h1>understudy demo</h1>\n");
  await writeFile(path.join(src, "site", "css", "main.css"), "body { font-family: sans-serif }\n");
  await writeFile(path.join(src, "big.bin"), Buffer.alloc(8 * 1024 * 1024, 7));
  const log = createLogger("demo", process.env.UNDERSTUDY_LOG_LEVEL ?? "warn");
  const target = new Agent(parseAgentConfig({ name: "demo-target", listen: "127.0.0.1:0", dataDir: "state/target", tls: { insecure: true }, target: { root: "replica" } }, dir), log);
  await target.start();
  const source = new Agent(
    parseAgentConfig({ name: "demo-source", listen: "127.0.0.1:0", dataDir: "state/source", tls: { insecure: true }, source: { sets: [{ name: "www", path: "source", exclude: ["**/*.tmp"], targets: [`127.0.0.1:${target.port}`] }] } }, dir),
    log,
  );
  await source.start();
  // The operator's dashboard on the demo's agents (no Kubernetes): loopback only, plain HTTP.
  const { startDemoDashboard } = await import("../operator/dashboard/demo.ts");
  const dash = o.dashboard === "0" ? undefined : await startDemoDashboard({ source, target, set: "www", path: src, address: o.dashboard, log });
  let n = 0;
  const writer = setInterval(() => {
    n++;
    void (async () => {
      await appendFile(path.join(src, "site", "access.log"), `${new Date().toISOString()} GET /index.html 200\n`);
      if (n % 5 === 0) await writeFile(path.join(src, "site", "index.html"), `<h1>understudy demo</h1>\n<p>edit ${n}</p>\n`);
      if (n % 7 === 0) {
        await writeFile(path.join(src, "draft.tmp"), "excluded\n");
        await rename(path.join(src, "draft.tmp"), path.join(src, `page-${n}.html`));
      }
      if (n % 11 === 0) await rm(path.join(src, `page-${n - 4}.html`), { force: true });
    })().catch(() => undefined);
  }, 200);
  const show = () => {
    process.stdout.write(`${process.stdout.isTTY ? "\x1b[H\x1b[2J" : "\n"}understudy demo — source ${src}\n                 replica ${path.join(dir, "replica", "demo-source", "www")}\n\n${formatStatus(source.status())}\n${formatStatus(target.status())}\n\n${dash ? `dashboard: ${dash.url}\n` : ""}\n(Ctrl-C to stop)\n`);
  };
  const ticker = setInterval(show, 1000);
  let done!: () => void;
  const finished = new Promise<void>((r) => (done = r));
  process.once("SIGINT", () => done());
  process.once("SIGTERM", () => done());
  if (o.durationMs) setTimeout(done, o.durationMs);
  await finished;
  clearInterval(writer);
  clearInterval(ticker);
  // Let the last changes land, then show the final state.
  const deadline = Date.now() + 5000;
  await new Promise((r) => setTimeout(r, 300));
  while (!source.sets.every((s) => s.inSync) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  show();
  await dash?.stop();
  await source.stop();
  await target.stop();
}
