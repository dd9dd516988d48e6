// What the test environment's servers (etcd, kube-apiserver, moto) share: run
// under setpriv --pdeathsig so the kernel kills them when the test process dies
// in any way (kill -9 included), and a last-resort 'exit' hook that kills what
// is still running and removes temporary directories. 'exit' handlers must be
// synchronous, hence kill + rmSync.
import type { ChildProcess } from "node:child_process";
import { accessSync, constants as fsConstants, rmSync } from "node:fs";

export const SETPRIV = ["/usr/bin/setpriv", "/bin/setpriv"].find((f) => {
  try {
    accessSync(f, fsConstants.X_OK);
    return true;
  } catch {
    return false;
  }
});

/** Server processes to SIGKILL at exit (delete them once stopped). */
export const live = new Set<ChildProcess>();
/** Directories to remove at exit (delete them once removed or kept on purpose). */
export const removeOnExit = new Set<string>();
let exitHookInstalled = false;

export function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const c of live) c.kill("SIGKILL");
    for (const d of removeOnExit) {
      try {
        rmSync(d, { recursive: true, force: true, maxRetries: 3 });
      } catch {
        // best effort: the process is going away
      }
    }
  });
}
