// --pid-file: a process started in the background (e.g. through npx, whose own
// pid is not the program's) says where it can be signalled. Removed on exit.
import { rmSync, writeFileSync } from "node:fs";
import path from "node:path";

export function writePidFile(file: string): void {
  const f = path.resolve(file);
  writeFileSync(f, `${process.pid}\n`);
  process.once("exit", () => rmSync(f, { force: true }));
}
