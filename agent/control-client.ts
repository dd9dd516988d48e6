// Client side of an agent's Control service (used by the CLI, tests and, later, the operator).
import * as grpc from "@grpc/grpc-js";
import type { TlsConfig } from "../common/config.ts";
import { clientCredentials } from "../common/tls.ts";
import { ControlClient, type StatusResponse, type VerifyReport } from "./wire.ts";

function call<Q, R>(address: string, tls: TlsConfig, method: "status" | "mirror" | "verify", req: Q, timeoutMs: number): Promise<R> {
  const client = new ControlClient(address, clientCredentials(tls));
  const fn = client[method] as unknown as (q: Q, md: grpc.Metadata, o: Partial<grpc.CallOptions>, cb: (e: grpc.ServiceError | null, r?: R) => void) => void;
  return new Promise<R>((resolve, reject) =>
    fn.call(client, req, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => {
      client.close();
      if (err) reject(new Error(`agent ${address}: ${err.details || err.message}`));
      else resolve(res!);
    }),
  );
}

export function startMirror(address: string, tls: TlsConfig, req: { set: string; target: string; mode: string; blockSize: number }): Promise<{ started: string[] }> {
  return call(address, tls, "mirror", req, 10_000);
}

export function runVerify(address: string, tls: TlsConfig, req: { set: string; target: string; repair: boolean }, timeoutMs = 3_600_000): Promise<VerifyReport> {
  return call(address, tls, "verify", req, timeoutMs);
}

export async function fetchStatus(address: string, tls: TlsConfig = { insecure: true }, timeoutMs = 5000): Promise<StatusResponse> {
  const client = new ControlClient(address, clientCredentials(tls));
  try {
    return await new Promise<StatusResponse>((resolve, reject) =>
      client.status({}, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(new Error(`agent ${address}: ${err.details || err.message}`)) : resolve(res!))),
    );
  } finally {
    client.close();
  }
}
