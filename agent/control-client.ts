// Client side of an agent's Control service (used by the CLI, tests and, later, the operator).
import * as grpc from "@grpc/grpc-js";
import type { TlsConfig } from "../common/config.ts";
import { clientCredentials } from "../common/tls.ts";
import { ControlClient, type StatusResponse } from "./wire.ts";

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
