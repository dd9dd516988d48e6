// The README's Kubernetes walkthrough, run exactly as written: every fenced
// `sh` block marked <!-- readme-test --> is taken from README.md, in order, and
// run by one bash (so `. ./k8s.env` carries over) in a directory that holds
// the repository as a reader has it. README and test cannot drift: change a
// step in the README and this runs the new step.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readdir, readFile, readlink, rm, symlink, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import path from "node:path";
import { REPO, tmpDir, waitFor } from "./harness.ts";

/** The shell blocks the README marks for this test, in order. */
export function readmeBlocks(md: string): string[] {
  const blocks: string[] = [];
  const re = /<!-- readme-test -->\s*\n```sh\n([\s\S]*?)\n```/g;
  for (let m = re.exec(md); m; m = re.exec(md)) blocks.push(m[1]!);
  return blocks;
}

/** Our own processes still running from `dir` (by their working directory), to end them by pid. */
async function leftovers(dir: string): Promise<number[]> {
  const pids: number[] = [];
  for (const e of await readdir("/proc")) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
    const cwd = await readlink(`/proc/${e}/cwd`).catch(() => "");
    if (cwd === dir || cwd.startsWith(`${dir}/`)) pids.push(Number(e));
  }
  return pids;
}

let dir = "";
let passed = false;
const env = (): NodeJS.ProcessEnv => {
  const e: NodeJS.ProcessEnv = { ...process.env, UNDERSTUDY_LOCAL_CLUSTER_DIR: path.join(dir, ".local-cluster") };
  delete e.KUBECONFIG;
  return e;
};

after(async () => {
  if (!dir) return;
  for (const pid of await leftovers(dir)) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // gone meanwhile
    }
  }
  if (existsSync(path.join(dir, ".local-cluster"))) {
    await new Promise((r) => spawn(process.execPath, [path.join(REPO, "test/env/up.ts"), "--stop"], { env: env(), stdio: "ignore" }).on("exit", r));
  }
  // A failed run keeps its directory (readme.sh, the logs) for a look.
  if (passed && !process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  else process.stderr.write(`# kept ${dir}\n`);
});

test("the README's Kubernetes section runs as written on the local API server", { timeout: 900_000 }, async () => {
  const readme = await readFile(path.join(REPO, "README.md"), "utf8");
  const blocks = readmeBlocks(readme);
  assert.ok(blocks.length >= 8, `README.md marks ${blocks.length} blocks with <!-- readme-test -->`);
  dir = await tmpDir("understudy-readme-");
  // The repository as a reader has it (every top-level entry), the reader's own files beside it.
  for (const e of await readdir(REPO)) if (e !== ".git" && !e.startsWith(".")) await symlink(path.join(REPO, e), path.join(dir, e));
  const script = blocks.map((b, i) => `echo "### README block ${i + 1}" >&2\n${b}`).join("\n");
  await writeFile(path.join(dir, "readme.sh"), script);
  let out = "";
  const code = await new Promise<number>((resolve) => {
    const p = spawn("bash", ["-e", "-o", "pipefail", "readme.sh"], { cwd: dir, env: env(), stdio: ["ignore", "pipe", "pipe"] });
    p.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
    p.stderr.setEncoding("utf8").on("data", (d: string) => (out += d));
    // every step has its own timeout (kubectl wait, timeout 60 …); this only ends a hang
    const t = setTimeout(() => p.kill("SIGKILL"), 840_000);
    p.on("exit", (c, sig) => {
      clearTimeout(t);
      resolve(c ?? 128 + (sig ? 9 : 0));
    });
  });
  const logs = async () => (await Promise.all(["operator.log", "web1.log", "dr1.log"].map(async (f) => `--- ${f}:\n${(await readFile(path.join(dir, f), "utf8").catch(() => "(none)")).split("\n").slice(-25).join("\n")}`))).join("\n");
  assert.equal(code, 0, `the README's steps failed (exit ${code}):\n${out.split("\n").slice(-60).join("\n")}\n${await logs()}`);

  // What the reader is told to expect is what they get.
  const header = out.split("\n").find((l) => l.startsWith("NAME ") && l.includes("PHASE"));
  assert.ok(header, `kubectl get rp printed no header:\n${out}`);
  const cols = header.trim().split(/\s{2,}/);
  assert.deepEqual(cols, ["NAME", "PHASE", "ACTIVE", "LAG", "QUEUED", "VERIFIED", "LAST VERIFY", "AGE"]);
  assert.ok(readme.replace(/\s+/g, " ").includes(`shows the columns ${cols.slice(0, -1).join(", ")} and ${cols.at(-1)}`), "the README names the columns kubectl shows");
  assert.match(out, /^www\s+Replicating\s+source\s/m, "the pair replicates");
  assert.match(out, /^hello$/m, "the replica holds the file, where the README says it is");
  assert.match(out, /known good: dr yes/, "the operator verified the copy by itself and the gate opened");
  assert.match(out, /^www\s+FailedOver\s+dr\s/m, "after the source died the target serves");
  assert.match(out, /active side dr \(epoch 1\)/);
  // Step 8 stopped everything it started, and k8s:down removed the API server's directory.
  assert.equal(existsSync(path.join(dir, ".local-cluster")), false, "k8s:down removes its directory");
  await waitFor("every process of the walkthrough to end", async () => (await leftovers(dir)).length === 0, 60_000, 250);
  passed = true;
});
