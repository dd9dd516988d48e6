// lsyncd as a baseline: a `default.rsync` sync of one local directory to
// another, run in the foreground as `lsyncd -nodaemon <config>`. `delay`
// undefined leaves lsyncd's own default (15 s for default.rsync) in place.
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, openSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";

export const LSYNCD = "/usr/bin/lsyncd";

export function lsyncdConfig(source: string, target: string, delay?: number): string {
  const lines = ["settings {", "  nodaemon = true,", "}", "sync {", "  default.rsync,", `  source = ${JSON.stringify(source)},`, `  target = ${JSON.stringify(target)},`];
  if (delay !== undefined) lines.push(`  delay = ${delay},`);
  lines.push("}");
  return lines.join("\n") + "\n";
}

export class Lsyncd {
  readonly configPath: string;
  readonly logPath: string;
  private readonly proc: ChildProcess;
  private readonly exited: Promise<void>;

  private constructor(configPath: string, logPath: string, proc: ChildProcess) {
    this.configPath = configPath;
    this.logPath = logPath;
    this.proc = proc;
    this.exited = new Promise((r) => proc.once("exit", () => r()));
  }

  /** Write the config into `dir` and start lsyncd; its initial full rsync starts at once. */
  static async start(dir: string, source: string, target: string, delay?: number): Promise<Lsyncd> {
    const configPath = path.join(dir, delay === undefined ? "lsyncd-default.lua" : `lsyncd-delay${delay}.lua`);
    const logPath = configPath.replace(/\.lua$/, ".log");
    await writeFile(configPath, lsyncdConfig(source.endsWith("/") ? source : source + "/", target.endsWith("/") ? target : target + "/", delay));
    const fd = openSync(logPath, "a");
    const proc = spawn(LSYNCD, ["-nodaemon", configPath], { stdio: ["ignore", fd, fd] });
    closeSync(fd);
    const l = new Lsyncd(configPath, logPath, proc);
    await new Promise<void>((resolve, reject) => {
      proc.once("error", reject);
      proc.once("spawn", () => resolve());
    });
    return l;
  }

  get running(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  async log(): Promise<string> {
    return readFile(this.logPath, "utf8").catch(() => "");
  }

  async stop(): Promise<void> {
    if (!this.running) return;
    this.proc.kill("SIGTERM");
    const t = setTimeout(() => this.proc.kill("SIGKILL"), 10_000);
    await this.exited;
    clearTimeout(t);
  }
}
