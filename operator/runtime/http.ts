// /metrics, /healthz and /readyz, as controller-runtime serves them: healthz
// says the process works; readyz says it can do its job (caches synced, and
// leading or ready to take over).
import { createServer, type Server } from "node:http";
import type { Registry } from "prom-client";
import { splitHostPort } from "../../common/config.ts";

export interface Probes {
  healthy: () => boolean;
  ready: () => { ok: boolean; why?: string };
}

export async function serveHttp(bind: string, routes: { registry?: Registry; probes?: Probes }): Promise<Server | undefined> {
  if (bind === "0" || bind === "") return undefined;
  const hp = splitHostPort(bind.startsWith(":") ? `0.0.0.0${bind}` : bind);
  if (!hp) throw new Error(`not a bind address: ${bind} (use host:port or :port)`);
  const server = createServer((req, res) => {
    const url = req.url?.split("?")[0];
    if (url === "/metrics" && routes.registry) {
      routes.registry.metrics().then(
        (text) => res.writeHead(200, { "Content-Type": routes.registry!.contentType }).end(text),
        (e: Error) => res.writeHead(500).end(e.message),
      );
    } else if (url === "/healthz" && routes.probes) {
      const ok = routes.probes.healthy();
      res.writeHead(ok ? 200 : 500, { "Content-Type": "text/plain" }).end(ok ? "ok\n" : "unhealthy\n");
    } else if (url === "/readyz" && routes.probes) {
      const r = routes.probes.ready();
      res.writeHead(r.ok ? 200 : 503, { "Content-Type": "text/plain" }).end(r.ok ? "ok\n" : `not ready: ${r.why ?? ""}\n`);
    } else res.writeHead(404).end();
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(hp.port, hp.host, () => resolve());
  });
  return server;
}
