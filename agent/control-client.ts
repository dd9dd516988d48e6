// Client side of an agent's Control service (used by the CLI, tests and the operator).
// Every call has a deadline: a caller (the operator's reconcile loop above all)
// must never wait on an agent without a bound.
import * as grpc from "@grpc/grpc-js";
import type { TlsConfig } from "../common/config.ts";
import { clientCredentials, dialOptions } from "../common/tls.ts";
import { ControlClient, type SetSpec, type StatusResponse, type VerifyReport } from "./wire.ts";

type Method = "status" | "mirror" | "verify" | "configureSet" | "removeSet" | "promote" | "mapImage" | "runCommand" | "drain";

/**
 * gRPC's UNAVAILABLE text ("No connection established. Last error: Error:
 * connect ECONNREFUSED 1.2.3.4:7702. Resolution note: ") → "connect ECONNREFUSED 1.2.3.4:7702".
 */
export function tidyGrpcMessage(msg: string): string {
  const m = /Last error: (?:Error: )?(.*?)\.?\s*(?:Resolution note:.*)?$/s.exec(msg);
  return (m ? m[1]! : msg).trim();
}

/** A failed control call; `code` is the gRPC status (e.g. UNAVAILABLE when the agent is down). */
export class AgentCallError extends Error {
  readonly code: grpc.status;
  readonly address: string;
  constructor(address: string, err: grpc.ServiceError) {
    super(`agent ${address}: ${tidyGrpcMessage(err.details || err.message)}`);
    this.code = err.code;
    this.address = address;
  }
}

function call<Q, R>(address: string, tls: TlsConfig, method: Method, req: Q, timeoutMs: number, client?: ControlClient): Promise<R> {
  const c = client ?? new ControlClient(address, clientCredentials(tls), dialOptions(address));
  const fn = c[method] as unknown as (q: Q, md: grpc.Metadata, o: Partial<grpc.CallOptions>, cb: (e: grpc.ServiceError | null, r?: R) => void) => void;
  return new Promise<R>((resolve, reject) =>
    fn.call(c, req, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => {
      if (!client) c.close();
      if (err) reject(new AgentCallError(address, err));
      else resolve(res!);
    }),
  );
}

export function startMirror(address: string, tls: TlsConfig, req: { set: string; target: string; mode: string; blockSize: number }): Promise<{ started: string[] }> {
  return call(address, tls, "mirror", req, 10_000);
}

export function runVerify(address: string, tls: TlsConfig, req: { set: string; target: string; repair: boolean }, timeoutMs = 3_600_000): Promise<VerifyReport> {
  return call(address, tls, "verify", { ...req, background: false }, timeoutMs);
}

export function fetchStatus(address: string, tls: TlsConfig = { insecure: true }, timeoutMs = 5000): Promise<StatusResponse> {
  return call(address, tls, "status", {}, timeoutMs);
}

/**
 * A long-lived connection to one agent, for callers that talk to it often
 * (the operator): one HTTP/2 channel instead of a TLS handshake per call.
 */
export class AgentConnection {
  readonly address: string;
  private readonly tls: TlsConfig;
  private readonly client: ControlClient;
  constructor(address: string, tls: TlsConfig) {
    this.address = address;
    this.tls = tls;
    this.client = new ControlClient(address, clientCredentials(tls), { ...dialOptions(address), "grpc.max_receive_message_length": 64 * 1024 * 1024 });
  }
  status(timeoutMs = 5000): Promise<StatusResponse> {
    return call(this.address, this.tls, "status", {}, timeoutMs, this.client);
  }
  configureSet(spec: SetSpec, timeoutMs = 15_000): Promise<{ result: string; specHash: string }> {
    return call(this.address, this.tls, "configureSet", { spec }, timeoutMs, this.client);
  }
  removeSet(name: string, purge: boolean, timeoutMs = 30_000): Promise<{ existed: boolean }> {
    return call(this.address, this.tls, "removeSet", { name, purge }, timeoutMs, this.client);
  }
  mirror(req: { set: string; target: string; mode: string }, timeoutMs = 10_000): Promise<{ started: string[] }> {
    return call(this.address, this.tls, "mirror", { ...req, blockSize: 0 }, timeoutMs, this.client);
  }
  /** Starts a verify and returns; its result shows in status (target.lastVerify). */
  startVerify(req: { set: string; target: string; repair: boolean }, timeoutMs = 10_000): Promise<VerifyReport> {
    return call(this.address, this.tls, "verify", { ...req, background: true }, timeoutMs, this.client);
  }
  promote(req: { source: string; set: string; epoch: number }, timeoutMs = 30_000): Promise<{ appliedSeq: number; durableSeq: number; path: string; epoch: number }> {
    return call(this.address, this.tls, "promote", req, timeoutMs, this.client);
  }
  mapImage(req: { source: string; set: string; path: string; remove: boolean }, timeoutMs = 15_000): Promise<{ path: string }> {
    return call(this.address, this.tls, "mapImage", req, timeoutMs, this.client);
  }
  runCommand(command: string[], timeoutMs: number): Promise<{ exitCode: number; output: string }> {
    return call(this.address, this.tls, "runCommand", { command, timeoutMs }, timeoutMs + 5000, this.client);
  }
  drain(set: string, timeoutMs = 30_000): Promise<{ lastSeq: number }> {
    return call(this.address, this.tls, "drain", { set }, timeoutMs, this.client);
  }
  close(): void {
    this.client.close();
  }
}
