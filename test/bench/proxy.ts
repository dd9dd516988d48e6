// A tiny TCP proxy that counts the bytes crossing it in each direction. Put
// between a source and a target agent it measures what understudy really
// puts on the wire (gRPC, HTTP/2 framing, acks, keepalives included), which
// the agents' own counters cannot tell.
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { nowMs, pollUntil } from "./util.ts";

export interface WireBytes {
  /** client → upstream (source → target) */
  up: number;
  /** upstream → client (target → source) */
  down: number;
}

export class CountingProxy {
  readonly counts: WireBytes = { up: 0, down: 0 };
  connections = 0;
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();
  port = 0;

  private constructor(server: Server) {
    this.server = server;
  }

  /** Listen on a free loopback port and forward every connection to 127.0.0.1:upstreamPort. */
  static async start(upstreamPort: number): Promise<CountingProxy> {
    const server = createServer();
    const proxy = new CountingProxy(server);
    server.on("connection", (client: Socket) => proxy.forward(client, upstreamPort));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve());
    });
    const a = server.address();
    if (typeof a !== "object" || !a) throw new Error("proxy has no port");
    proxy.port = a.port;
    return proxy;
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  snapshot(): WireBytes {
    return { ...this.counts };
  }

  private forward(client: Socket, upstreamPort: number): void {
    this.connections++;
    const upstream = createConnection({ host: "127.0.0.1", port: upstreamPort });
    for (const s of [client, upstream]) {
      s.setNoDelay(true);
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
    }
    client.on("data", (d: Buffer) => (this.counts.up += d.length));
    upstream.on("data", (d: Buffer) => (this.counts.down += d.length));
    client.pipe(upstream);
    upstream.pipe(client);
    client.on("error", () => upstream.destroy());
    upstream.on("error", () => client.destroy());
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

/**
 * Wait until the wire is quiet: less than `idleBytes` moved in the last
 * `quietMs`. Not "nothing at all": agents ping idle connections every second
 * (gRPC keepalive, so a cut link is noticed within seconds), a few dozen bytes.
 */
export async function quiet(proxy: CountingProxy, quietMs: number, timeoutMs: number, idleBytes = 1024): Promise<void> {
  const samples: { at: number; total: number }[] = [];
  const start = nowMs();
  await pollUntil("the wire to go quiet", async () => {
    const s = proxy.snapshot();
    const now = nowMs();
    samples.push({ at: now, total: s.up + s.down });
    while (samples.length > 1 && samples[1]!.at <= now - quietMs) samples.shift();
    return now - start >= quietMs && samples[0]!.at <= now - quietMs + 100 && samples.at(-1)!.total - samples[0]!.total < idleBytes;
  }, timeoutMs, 100);
}

