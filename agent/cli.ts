// The `understudy` command line: run an agent, ask one for its status, make
// certificates, or run the embedded demo (two agents on loopback).
import { Command, Option } from "commander";
import { ConfigError, loadAgentConfig, type TlsConfig } from "../common/config.ts";
import { createLogger } from "../common/log.ts";
import { createCA, issueCert } from "../common/tls.ts";
import { Agent } from "./agent.ts";
import type { StatusResponse } from "./wire.ts";
import { fetchStatus } from "./control-client.ts";
import { runDemo } from "./demo.ts";
import { formatStatus } from "./status-format.ts";

const program = new Command();
program.name("understudy").description("Real-time byte-level file replication between agents").version((await import("./wire.ts")).AGENT_VERSION);

function fail(msg: string): never {
  process.stderr.write(`understudy: ${msg}\n`);
  process.exit(2);
}

program
  .command("agent")
  .description("run an agent (source and/or target role, from its config)")
  .requiredOption("-c, --config <file>", "agent config (YAML)")
  .action(async (opts: { config: string }) => {
    let cfg;
    try {
      cfg = await loadAgentConfig(opts.config);
    } catch (e) {
      if (e instanceof ConfigError) fail(e.message);
      throw e;
    }
    const log = createLogger(`agent:${cfg.name}`);
    const agent = new Agent(cfg, log);
    let stopping = false;
    const stop = async (sig: string) => {
      if (stopping) return;
      stopping = true;
      log.info({ signal: sig }, "stopping");
      await agent.stop();
      process.exit(0);
    };
    process.on("SIGTERM", () => void stop("SIGTERM"));
    process.on("SIGINT", () => void stop("SIGINT"));
    try {
      await agent.start();
    } catch (e) {
      fail((e as Error).message);
    }
  });

async function tlsFrom(opts: { config?: string; ca?: string; cert?: string; key?: string }): Promise<TlsConfig> {
  if (opts.config) return (await loadAgentConfig(opts.config)).tls;
  if (opts.ca || opts.cert || opts.key) {
    if (!opts.ca || !opts.cert || !opts.key) fail("--ca, --cert and --key go together");
    return { ca: opts.ca, cert: opts.cert, key: opts.key };
  }
  return { insecure: true };
}

program
  .command("status")
  .description("show an agent's replication state")
  .requiredOption("-a, --agent <host:port>", "agent control address")
  .option("--json", "machine-readable output")
  .option("--config <file>", "take TLS settings from this agent config")
  .option("--ca <file>", "CA certificate (mTLS)")
  .option("--cert <file>", "client certificate (mTLS)")
  .option("--key <file>", "client key (mTLS)")
  .option("-w, --watch", "refresh every second")
  .action(async (opts: { agent: string; json?: boolean; watch?: boolean; config?: string; ca?: string; cert?: string; key?: string }) => {
    const tls = await tlsFrom(opts);
    for (;;) {
      let s: StatusResponse;
      try {
        s = await fetchStatus(opts.agent, tls);
      } catch (e) {
        fail((e as Error).message);
      }
      if (opts.json) process.stdout.write(JSON.stringify(s, null, 2) + "\n");
      else process.stdout.write((opts.watch ? "\x1b[H\x1b[2J" : "") + formatStatus(s) + "\n");
      if (!opts.watch) return;
      await new Promise((r) => setTimeout(r, 1000));
    }
  });

const certs = program.command("certs").description("make a CA and agent certificates for mTLS");
certs
  .command("init")
  .description("create a certificate authority")
  .requiredOption("-d, --dir <dir>", "directory for ca.crt and ca.key")
  .action(async (opts: { dir: string }) => {
    try {
      const r = await createCA(opts.dir);
      process.stdout.write(`CA written: ${r.certPath} (key ${r.keyPath}, keep it private)\n`);
    } catch (e) {
      fail((e as Error).message);
    }
  });
certs
  .command("issue")
  .description("issue an agent certificate (server and client) signed by the CA")
  .requiredOption("-d, --dir <dir>", "CA directory (from `certs init`)")
  .requiredOption("-n, --name <name>", "agent name (the certificate's common name)")
  .addOption(new Option("-H, --host <host...>", "IP addresses and DNS names the agent is reached at").default(["127.0.0.1", "localhost"]))
  .option("-o, --out <dir>", "output directory (default: the CA directory)")
  .action(async (opts: { dir: string; name: string; host: string[]; out?: string }) => {
    try {
      const r = await issueCert({ caDir: opts.dir, name: opts.name, hosts: opts.host, outDir: opts.out ?? opts.dir });
      process.stdout.write(`certificate for ${opts.name}: ${r.certPath}\nkey: ${r.keyPath}\nCA: ${r.caPath}\nagent config:\n  tls: { ca: ${r.caPath}, cert: ${r.certPath}, key: ${r.keyPath} }\n`);
    } catch (e) {
      fail((e as Error).message);
    }
  });

program
  .command("demo")
  .description("run two agents on loopback replicating a demo folder, with live status")
  .option("--dir <dir>", "working directory for the demo", "./demo")
  .option("--duration <seconds>", "stop after this many seconds (default: run until Ctrl-C)")
  .action(async (opts: { dir: string; duration?: string }) => {
    await runDemo({ dir: opts.dir, durationMs: opts.duration ? Number(opts.duration) * 1000 : undefined });
  });

await program.parseAsync(process.argv);
