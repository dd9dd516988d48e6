// The dashboard of `understudy demo`: the same server and page as the
// operator's, on the demo's agents (DemoSource), on loopback over plain HTTP
// (no tokens travel: the demo acts as whoever sits at this machine).
import type { Agent } from "../../agent/agent.ts";
import type { Logger } from "../../common/log.ts";
import { DemoAuthorizer, DemoSource } from "./demo-source.ts";
import { PairHistory } from "./history.ts";
import { DashboardServer } from "./server.ts";

export const DEMO_DASHBOARD_ADDRESS = "127.0.0.1:7780";

export async function startDemoDashboard(o: { source: Agent; target: Agent; set: string; path: string; address?: string; log: Logger }): Promise<{ url: string; stop: () => Promise<void> }> {
  const source = new DemoSource({ source: o.source, target: o.target, set: o.set, path: o.path });
  // 5 s buckets (720 for the hour): a newcomer sees the chart move within seconds.
  const history = new PairHistory({ bucketMs: 5000, points: 720 });
  const make = (address: string) => new DashboardServer({ address, source, auth: new DemoAuthorizer(), log: o.log, history });
  let server = make(o.address ?? DEMO_DASHBOARD_ADDRESS);
  try {
    await server.start();
  } catch (e) {
    // Another demo (or anything) holds the default port: any free one will do.
    if (o.address || (e as NodeJS.ErrnoException).code !== "EADDRINUSE") throw e;
    server = make("127.0.0.1:0");
    await server.start();
  }
  return { url: server.url, stop: async () => { await server.stop(); await source.close(); } };
}
