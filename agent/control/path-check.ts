// Whether a set's path can be replicated right now. A source directory that
// is missing or unreadable scans as an empty tree, which would otherwise look
// like a healthy set with nothing in it (and an empty replica "complete").
import { constants } from "node:fs";
import { access, stat } from "node:fs/promises";

/** "" when `dir` is a directory this process can list and enter; else the path and the error. */
export async function pathProblem(dir: string): Promise<string> {
  try {
    const st = await stat(dir);
    if (!st.isDirectory()) return `source path ${dir} is not a directory`;
    await access(dir, constants.R_OK | constants.X_OK);
    return "";
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    // "ENOENT: no such file or directory, stat '/srv/www'" → without the syscall and path (named already)
    return `source path ${dir} cannot be read: ${err.message.replace(/, \w+ '.*'$/s, "")}`;
  }
}
