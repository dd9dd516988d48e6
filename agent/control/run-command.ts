// Failover actions: a command the operator asks an agent to run on its host
// (start a service, mount, switch an address). Only with control.allowCommands;
// no shell: the argv is run as given, with a deadline, and the end of its
// output is returned for the pair's events.
import { spawn } from "node:child_process";
import type { Logger } from "../../common/log.ts";

const MAX_OUTPUT = 16 * 1024;

export function runCommand(argv: string[], timeoutMs: number, log: Logger): Promise<{ exitCode: number; output: string }> {
  return new Promise((resolve) => {
    let out = "";
    const keep = (b: Buffer) => {
      out = (out + b.toString("utf8")).slice(-MAX_OUTPUT);
    };
    log.info({ command: argv, timeoutMs }, "running command");
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
    child.stdout.on("data", keep);
    child.stderr.on("data", keep);
    const timer = setTimeout(() => {
      out += `\n(killed after ${timeoutMs} ms)`;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ exitCode: 127, output: `cannot run ${argv[0]}: ${e.message}` });
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      log.info({ command: argv[0], code, signal }, "command finished");
      resolve({ exitCode: code ?? 128 + (signal ? 9 : 0), output: out });
    });
  });
}
