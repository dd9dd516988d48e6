// Making special files on the target: FIFOs, character and block devices,
// and unix sockets. Node has no mknod(2). The choice:
// - FIFOs and devices: coreutils' mknod(1), present on every Linux host (it is
//   in coreutils / busybox, never an extra package), spawned without a shell
//   with `--` before an absolute path the caller confined under the image root
//   (ConfinedRoot.resolve: every directory on the way is a real directory), so
//   no name can be read as an option or escape the image. Special files are
//   rare outside /dev (excluded from whole-server sets), so a process per node
//   costs nothing that matters. A native addon would mean a compiler at
//   `npm ci` time; python3 or perl are not on every target.
// - Sockets: mknod(1) cannot make them. Binding a unix socket with node:net
//   creates the socket inode; it is bound under a short temporary name through
//   /proc/self/fd/<dir fd>/ (sun_path holds only 108 bytes, image paths can be
//   longer), renamed into place while still bound (Node unlinks the bound path
//   when the server closes, and that name is then gone), then closed. The
//   result is what a replica of a socket can be: the inode, with mode, owner
//   and times, that no process listens on until the service starts there.
// Special files are never opened (opening a device runs its driver: a tape
// rewinds, a watchdog arms); their attributes are set through an O_PATH
// descriptor (see Applier.setAttrSpecial).
import { execFile, execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { constants as C } from "node:fs";
import { open, rename, unlink } from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import { promisify } from "node:util";
import type { SpecialKind } from "./stat.ts";

const execFileP = promisify(execFile);

/** open(2)'s O_PATH on Linux (Node does not export it). */
export const O_PATH = 0o10000000;

/** Largest device numbers Linux's dev_t holds (12+20 bits in the classic encoding, 32 each in the kernel's). */
export const MAX_MAJOR = 0xffffffff;
export const MAX_MINOR = 0xffffffff;

/** Make a special file at abs (which must not exist); mode 0600 until the caller sets its attributes. */
export async function makeSpecial(abs: string, type: SpecialKind, major: number, minor: number): Promise<void> {
  if (!path.isAbsolute(abs)) throw new Error(`makeSpecial: ${abs} is not absolute`);
  if (type === "s") return bindSocket(abs);
  const args = ["-m", "600", "--", abs, type];
  if (type === "c" || type === "b") args.push(String(major), String(minor));
  try {
    await execFileP("mknod", args, { timeout: 30_000 });
  } catch (e) {
    const err = e as { stderr?: string; code?: string | number; message: string };
    if (err.code === "ENOENT") throw new Error("cannot make special files: mknod (coreutils) is not on this host's PATH");
    const msg = String(err.stderr ?? err.message).trim();
    // EPERM making a device (an agent not running as root, or in a container without CAP_MKNOD): say so plainly.
    throw Object.assign(new Error(`mknod ${type} ${abs}: ${msg}`), { code: /not permitted/i.test(msg) ? "EPERM" : /exists/i.test(msg) ? "EEXIST" : "EIO" });
  }
}

/** makeSpecial for a fifo or device node, synchronously (the applier's; sockets need the event loop: makeSpecial). */
export function makeSpecialSync(abs: string, type: Exclude<SpecialKind, "s">, major: number, minor: number): void {
  if (!path.isAbsolute(abs)) throw new Error(`makeSpecial: ${abs} is not absolute`);
  const args = ["-m", "600", "--", abs, type];
  if (type === "c" || type === "b") args.push(String(major), String(minor));
  try {
    execFileSync("mknod", args, { timeout: 30_000, stdio: ["ignore", "ignore", "pipe"] });
  } catch (e) {
    const err = e as { stderr?: Buffer | string; code?: string | number; message: string };
    if (err.code === "ENOENT") throw new Error("cannot make special files: mknod (coreutils) is not on this host's PATH");
    const msg = String(err.stderr || err.message).trim();
    throw Object.assign(new Error(`mknod ${type} ${abs}: ${msg}`), { code: /not permitted/i.test(msg) ? "EPERM" : /exists/i.test(msg) ? "EEXIST" : "EIO" });
  }
}

async function bindSocket(abs: string): Promise<void> {
  const dir = await open(path.dirname(abs), C.O_RDONLY | C.O_DIRECTORY | C.O_NOFOLLOW);
  const tmpName = `.understudy-sock-${randomBytes(6).toString("hex")}`;
  const server = net.createServer();
  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(`/proc/self/fd/${dir.fd}/${tmpName}`, () => resolve());
    });
    try {
      await rename(path.join(path.dirname(abs), tmpName), abs);
    } catch (e) {
      await unlink(path.join(path.dirname(abs), tmpName)).catch(() => undefined);
      throw e;
    }
  } finally {
    if (server.listening) await new Promise<void>((r) => server.close(() => r()));
    await dir.close();
  }
}
