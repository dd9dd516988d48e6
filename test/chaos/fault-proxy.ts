// A small fault-injecting TCP proxy (toxiproxy's catalogue, in-process), put
// between a source agent and its target: added latency with jitter, a
// bandwidth cap, data cut into tiny segments, connection resets, and a black
// hole (nothing delivered, nothing reported, connections left open). The same shape as
// test/bench/proxy.ts's CountingProxy, with a fault that can change at any
// moment; every chunk passes through one queue per direction, so order is
// kept whatever the fault.
import { createConnection, createServer, type Server, type Socket } from "node:net";

export type Fault =
  | { kind: "none" }
  | { kind: "latency"; ms: number; jitterMs: number }
  | { kind: "bandwidth"; bytesPerSecond: number }
  | { kind: "tiny-segments"; bytes: number }
  | { kind: "blackhole" }
  | { kind: "reset" };

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class FaultProxy {
  private readonly server: Server;
  private readonly pairs = new Set<[Socket, Socket]>();
  private fault: Fault = { kind: "none" };
  private readonly rnd: () => number;
  port = 0;
  connections = 0;

  private constructor(server: Server, rnd: () => number) {
    this.server = server;
    this.rnd = rnd;
  }

  /** Listen on a free loopback port and forward to 127.0.0.1:upstreamPort; `rnd` drives the jitter (seeded). */
  static async start(upstreamPort: number, rnd: () => number): Promise<FaultProxy> {
    const server = createServer();
    const p = new FaultProxy(server, rnd);
    server.on("connection", (c: Socket) => p.forward(c, upstreamPort));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve());
    });
    const a = server.address();
    if (typeof a !== "object" || !a) throw new Error("proxy has no port");
    p.port = a.port;
    return p;
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Apply a fault from now on ("reset" resets every open connection once, then passes). */
  set(f: Fault): void {
    if (f.kind === "reset") {
      for (const [a, b] of this.pairs) {
        a.resetAndDestroy();
        b.resetAndDestroy();
      }
      this.fault = { kind: "none" };
      return;
    }
    this.fault = f;
  }

  private forward(client: Socket, upstreamPort: number): void {
    this.connections++;
    const upstream = createConnection({ host: "127.0.0.1", port: upstreamPort });
    const pair: [Socket, Socket] = [client, upstream];
    this.pairs.add(pair);
    const close = () => {
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    for (const s of pair) {
      s.setNoDelay(true);
      s.on("error", close);
      s.on("close", close);
    }
    this.pipe(client, upstream);
    this.pipe(upstream, client);
  }

  /** from → to through the fault, in order (one chunk at a time, with back-pressure). */
  private pipe(from: Socket, to: Socket): void {
    const queue: Buffer[] = [];
    let busy = false;
    const drain = async () => {
      if (busy) return;
      busy = true;
      try {
        while (queue.length) {
          const chunk = queue.shift()!;
          const f = this.fault;
          // A black hole: nothing gets through and nothing says so. TCP would keep
          // retransmitting, so the bytes are held (not dropped: that would corrupt the
          // stream, which no network does to TCP) until the hole closes or the
          // connection is given up (the agents' keepalive notices and closes it).
          while (this.fault.kind === "blackhole" && !to.destroyed) await sleep(50);
          if (f.kind === "latency") await sleep(f.ms + this.rnd() * f.jitterMs);
          if (f.kind === "tiny-segments") {
            for (let i = 0; i < chunk.length; i += f.bytes) {
              if (to.destroyed) return;
              to.write(chunk.subarray(i, i + f.bytes));
              await sleep(0);
            }
            continue;
          }
          if (f.kind === "bandwidth") await sleep((chunk.length / f.bytesPerSecond) * 1000);
          if (to.destroyed) return;
          if (!to.write(chunk)) await new Promise((r) => to.once("drain", r));
        }
      } finally {
        busy = false;
        if (from.isPaused() && queue.length === 0) from.resume();
      }
    };
    from.on("data", (d: Buffer) => {
      queue.push(d);
      if (queue.length > 64) from.pause();
      void drain();
    });
  }

  async close(): Promise<void> {
    for (const [a, b] of this.pairs) {
      a.destroy();
      b.destroy();
    }
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
