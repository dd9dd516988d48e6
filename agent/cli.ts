// The `understudy` command line: run an agent, ask one for its status, make
// certificates, enroll with an operator, or run the embedded demo (two agents on loopback).
import { writePidFile } from "../common/pid-file.ts";
import { readFile } from "node:fs/promises";
import { hostname } from "node:os";
import { Command, Option } from "commander";
import { ConfigError, loadAgentConfig, type TlsConfig } from "../common/config.ts";
import { createLogger } from "../common/log.ts";
import { createCA, issueCert } from "../common/tls.ts";
import { Agent } from "./agent.ts";
import type { StatusResponse } from "./wire.ts";
import { fetchStatus, runVerify, startMirror } from "./control-client.ts";
import { parseDuration, parseSize } from "../common/config.ts";
import { ENROLL_TOKEN_ENV, EnrollRefusedError, enroll } from "./enroll.ts";
import { runDemo } from "./demo.ts";
import { bytes, formatStatus, progressLine } from "./status-format.ts";

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
  .option("--pid-file <file>", "write the agent's process id here (removed on exit)")
  .action(async (opts: { config: string; pidFile?: string }) => {
    let cfg;
    try {
      cfg = await loadAgentConfig(opts.config);
    } catch (e) {
      if (e instanceof ConfigError) fail(e.message);
      throw e;
    }
    if (opts.pidFile) writePidFile(opts.pidFile);
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

function tlsOptions(c: Command): Command {
  return c
    .option("--config <file>", "take TLS settings from this agent config")
    .option("--ca <file>", "CA certificate (mTLS)")
    .option("--cert <file>", "client certificate (mTLS)")
    .option("--key <file>", "client key (mTLS)");
}

tlsOptions(
  program
    .command("mirror")
    .description("mirror a replication set to its target(s) now, showing progress")
    .requiredOption("-a, --agent <host:port>", "the source agent")
    .requiredOption("-s, --set <name>", "replication set")
    .addOption(new Option("-m, --mode <mode>", "full: copy everything; checksum: send only blocks that differ").choices(["full", "checksum"]).default("checksum"))
    .option("-b, --block-size <size>", "block size (must equal the set's blockSize)")
    .option("-t, --target <host:port>", "only this target (default: all)")
    .option("--no-wait", "start it and return"),
).action(async (opts: { agent: string; set: string; mode: string; blockSize?: string; target?: string; wait: boolean; config?: string; ca?: string; cert?: string; key?: string }) => {
  const tls = await tlsFrom(opts);
  let started: string[];
  try {
    const bs = opts.blockSize ? parseSize(opts.blockSize) : 0;
    started = (await startMirror(opts.agent, tls, { set: opts.set, target: opts.target ?? "", mode: opts.mode, blockSize: bs })).started;
  } catch (e) {
    fail((e as Error).message);
  }
  process.stdout.write(`${opts.mode} mirror of ${opts.set} started to ${started.join(", ")}\n`);
  if (!opts.wait) return;
  const tty = process.stdout.isTTY;
  let seen = false;
  for (;;) {
    await new Promise((r) => setTimeout(r, 100));
    const st = await fetchStatus(opts.agent, tls).catch((e: Error) => fail(e.message));
    const set = st.sets.find((x) => x.name === opts.set);
    const ts = (set?.targets ?? []).filter((t) => started.includes(t.address));
    const lines = ts.map((t) => `${t.address}  ${progressLine(t.mirror)}`);
    if (tty) process.stdout.write(`\r\x1b[K${lines.join("  |  ")}`);
    const active = ts.some((t) => t.mirror?.active);
    seen ||= active || ts.every((t) => (t.mirror?.startedAt ?? 0) > 0);
    if (seen && !active) {
      if (tty) process.stdout.write("\n");
      for (const t of ts) process.stdout.write(`${t.address}: ${t.mirror?.result || "done"} — ${t.mirror?.filesDone ?? 0} files, ${bytes(t.mirror?.bytesDone ?? 0)} compared, ${bytes(t.mirror?.bytesSent ?? 0)} sent\n`);
      if (ts.some((t) => t.mirror?.result !== "ok")) process.exit(1);
      return;
    }
  }
});

tlsOptions(
  program
    .command("verify")
    .description("compare a target's image with the source and report every difference")
    .requiredOption("-a, --agent <host:port>", "the source agent")
    .requiredOption("-s, --set <name>", "replication set")
    .option("-t, --target <host:port>", "target (default: the set's first)")
    .option("-r, --repair", "fix what differs")
    .option("--json", "machine-readable output"),
).action(async (opts: { agent: string; set: string; target?: string; repair?: boolean; json?: boolean; config?: string; ca?: string; cert?: string; key?: string }) => {
  const tls = await tlsFrom(opts);
  let r;
  try {
    r = await runVerify(opts.agent, tls, { set: opts.set, target: opts.target ?? "", repair: !!opts.repair });
  } catch (e) {
    fail((e as Error).message);
  }
  if (opts.json) process.stdout.write(JSON.stringify(r, null, 2) + "\n");
  else {
    process.stdout.write(`verify ${r.set} → ${r.target}: ${r.error ? `failed: ${r.error}` : r.differences.length === 0 ? "identical" : `${r.differences.length} difference(s)`}; ${r.filesCompared} files, ${bytes(r.bytesCompared)} compared in ${(r.finishedAt - r.startedAt).toFixed(1)}s${r.inFlight ? `; ${r.inFlight} path(s) still changing` : ""}\n`);
    for (const d of r.differences) process.stdout.write(`  ${d.kind.padEnd(8)} ${d.path}  ${d.detail}\n`);
    if (opts.repair && r.differences.length) process.stdout.write(`repaired ${r.repaired} path(s)\n`);
  }
  process.exit(r.error ? 2 : r.ok ? 0 : 1);
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
  .command("enroll")
  .description("join this host to an operator with a one-time token: make a key, get a certificate, write agent.yaml")
  .requiredOption("--url <url>", "the operator's enrollment endpoint, e.g. https://10.0.0.1:7443")
  .option("--token <token>", `the one-time enrollment token (better: the environment variable ${ENROLL_TOKEN_ENV}, which ps does not show)`)
  .option("--ca-file <file>", "the understudy CA certificate; the operator's certificate is verified against it")
  .option("--ca-pem <pem>", "the CA certificate inline (PEM text) instead of --ca-file")
  .option("-d, --dir <dir>", "config directory: agent.yaml and tls/{agent.crt,agent.key,ca.crt}", "/etc/understudy")
  .option("--listen <host:port>", "the agent's listen address (listen in agent.yaml)", "0.0.0.0:7701")
  .option("--data-dir <dir>", "the agent's dataDir", "/var/lib/understudy")
  .option("--target-root <dir>", "make the agent a target, keeping images under this directory (target.root)")
  .option("--hostname <name>", "this host's name, as told to the operator", hostname())
  .option("--timeout <duration>", "keep trying to reach the operator this long (network errors only)", "2m")
  .option("--force", "replace an existing agent.yaml (and tls/agent.*)")
  .addHelpText(
    "after",
    `
The private key is made on this host and never leaves it. The operator chooses
the agent's name, its certificate's addresses and its admins. A token works once.
Pass the token in ${ENROLL_TOKEN_ENV} rather than --token: command lines are
visible to every user of the host (ps, /proc).

Exit status: 0 enrolled; 2 the operator refused (the message says why, e.g. the
token was used already); 1 anything else (unreachable, TLS verification failed,
agent.yaml exists without --force, ...).

  ${ENROLL_TOKEN_ENV}=ust1.... understudy enroll --url https://10.0.0.1:7443 \\
      --ca-file ca.crt --target-root /var/lib/understudy/replicas
  systemctl enable --now understudy-agent`,
  )
  .action(async (opts: { url: string; token?: string; caFile?: string; caPem?: string; dir: string; listen: string; dataDir: string; targetRoot?: string; hostname: string; timeout: string; force?: boolean }) => {
    const die = (code: number, msg: string): never => {
      process.stderr.write(`understudy: enroll: ${msg}\n`);
      process.exit(code);
    };
    const token = opts.token ?? process.env[ENROLL_TOKEN_ENV];
    if (!token) die(1, `no enrollment token: set ${ENROLL_TOKEN_ENV} (or pass --token)`);
    if (opts.caFile && opts.caPem) die(1, "--ca-file and --ca-pem are alternatives: give one");
    if (!opts.caFile && !opts.caPem) die(1, "the CA certificate is needed to verify the operator: --ca-file <ca.crt> or --ca-pem <PEM>");
    let caPem: string;
    if (opts.caFile) {
      try {
        caPem = await readFile(opts.caFile, "utf8");
      } catch (e) {
        die(1, `--ca-file: cannot read ${opts.caFile}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
      }
    } else caPem = opts.caPem!.replace(/\\n/g, "\n");
    let timeoutMs: number;
    try {
      timeoutMs = parseDuration(opts.timeout);
    } catch (e) {
      die(1, `--timeout: ${(e as Error).message}`);
    }
    try {
      const r = await enroll({
        url: opts.url,
        token: token!,
        caPem: caPem!,
        caSource: opts.caFile ?? "--ca-pem",
        dir: opts.dir,
        listen: opts.listen,
        dataDir: opts.dataDir,
        targetRoot: opts.targetRoot,
        hostname: opts.hostname,
        agentVersion: (await import("./wire.ts")).AGENT_VERSION,
        force: opts.force,
        timeoutMs: timeoutMs!,
        progress: (line) => process.stderr.write(`understudy: enroll: ${line}\n`),
      });
      process.stdout.write(
        `enrolled as ${r.agentName} (certificate valid until ${r.validTo.toISOString()}; admins: ${r.admins.join(", ") || "none"})\n` +
          `wrote ${r.configPath}${r.replacedPlaceholder ? " (replacing the unedited example)" : ""}, ${r.certPath}, ${r.keyPath}, ${r.caPath}\n` +
          `start the agent: systemctl enable --now understudy-agent   (or: understudy agent --config ${r.configPath})\n`,
      );
    } catch (e) {
      if (e instanceof EnrollRefusedError) die(2, `the operator refused the enrollment (${e.reason}): ${e.message}`);
      die(1, (e as Error).message);
    }
  });

program
  .command("demo")
  .description("run two agents on loopback replicating a demo folder, with live status")
  .option("--dir <dir>", "working directory for the demo", "./demo")
  .option("--duration <seconds>", "stop after this many seconds (default: run until Ctrl-C)")
  .option("--dashboard <addr>", "loopback host:port of the dashboard (default 127.0.0.1:7780, or a free port if taken; 0: none)")
  .action(async (opts: { dir: string; duration?: string; dashboard?: string }) => {
    await runDemo({ dir: opts.dir, durationMs: opts.duration ? Number(opts.duration) * 1000 : undefined, dashboard: opts.dashboard });
  });

program.addCommand((await import("../operator/main.ts")).operatorCommand(fail));
// The kubectl plugin loads @kubernetes/client-node (~60 MB of heap): an agent,
// running on every protected server, must not pay for it. It is added only
// when it is asked for, or for help (which lists it).
const words = process.argv.slice(2);
if (words.length === 0 || words.some((w) => w === "kubectl" || w === "help" || w === "--help" || w === "-h")) {
  program.addCommand((await import("../operator/plugin.ts")).pluginCommand(fail));
}

await program.parseAsync(process.argv);
