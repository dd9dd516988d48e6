// A real headless Chromium (Debian's `chromium`, installed by .ci/run) driven
// by playwright-core, for the dashboard's browser tests: no browser download,
// a fresh profile per launch, nothing that phones home.
import { existsSync } from "node:fs";
import { chromium, type Browser } from "playwright-core";

export const CHROMIUM = process.env.UNDERSTUDY_CHROMIUM ?? "/usr/bin/chromium";

/**
 * `trustSpki`: base64 SHA-256 of a server key's SubjectPublicKeyInfo that
 * Chromium accepts without a CA (the dashboard's own certificate), instead of
 * ignoring every certificate error.
 */
export async function launchChromium(o: { trustSpki?: string[] } = {}): Promise<Browser & { dispose: () => Promise<unknown> }> {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: apt-get install -y chromium (bash .ci/run installs it)`);
  // playwright-core gives every launch a fresh --user-data-dir of its own (and refuses one in args), removed on close.
  const b = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", ...(o.trustSpki?.length ? [`--ignore-certificate-errors-spki-list=${o.trustSpki.join(",")}`] : [])],
  });
  return Object.assign(b, { dispose: () => b.close().catch(() => undefined) });
}
