// The one structured logger of understudy (pino, JSON lines on stderr).
// Secrets never go through here: certificates, keys and tokens are logged by
// path or fingerprint only.
import { pino, type Logger } from "pino";

export type { Logger };

export function createLogger(name: string, level = process.env.UNDERSTUDY_LOG_LEVEL ?? "info"): Logger {
  return pino({ name, level, base: { pid: process.pid } }, pino.destination(2));
}
