// What the transport alone costs, without understudy's code: one grpc-js
// bidi stream over mTLS (the agents' own credentials and the receive windows
// the target raises, or grpc-js's defaults), against raw node:tls with the
// same certificates. The receiver runs in a child process, so each side's CPU
// is its own. A tool for finding what bounds benchmark 3, not part of
// `npm run bench`. Usage:
//   node test/bench/grpc-stream.ts [--size MiB] [--message KiB]
// prints MB/s and CPU-s per GiB on each side for: grpc (default windows),
// grpc (raised windows), raw tls.
import * as grpc from "@grpc/grpc-js";
import { fork } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import tls from "node:tls";
import { clientCredentials, dialOptions, serverCredentials } from "../../common/tls.ts";
import { raiseReceiveWindows } from "../../agent/target/receiver.ts";
import { makeCerts } from "./agents.ts";

type Mode = "grpc-default" | "grpc-raised" | "tls";
type Certs = { ca: string; cert: string; key: string };
interface Job {
  mode: Mode;
  total: number;
  certs: Certs;
}
type FromChild = { port: number } | { cpu: number };

const identity = (b: Buffer) => b;
const SERVICE = { stream: { path: "/bench.Stream/Send", requestStream: true, responseStream: true, requestSerialize: identity, requestDeserialize: identity, responseSerialize: identity, responseDeserialize: identity, originalName: "send" } } satisfies grpc.ServiceDefinition;

const cpuSeconds = () => {
  const c = process.cpuUsage();
  return (c.user + c.system) / 1e6;
};

/** The receiving side (child process): counts bytes, answers "ok" at the end, reports its CPU. */
function receive(job: Job): void {
  const send = (m: FromChild) => process.send!(m);
  const key = { ca: readFileSync(job.certs.ca), cert: readFileSync(job.certs.cert), key: readFileSync(job.certs.key) };
  if (job.mode === "tls") {
    const srv = tls.createServer({ ...key, requestCert: true, rejectUnauthorized: true }, (s) => {
      let n = 0;
      const c0 = cpuSeconds();
      s.on("data", (b: Buffer) => {
        n += b.length;
        if (n >= job.total) {
          s.end("ok");
          send({ cpu: cpuSeconds() - c0 });
        }
      });
    });
    srv.listen(0, "127.0.0.1", () => send({ port: (srv.address() as { port: number }).port }));
    return;
  }
  const server = new grpc.Server({ "grpc.max_receive_message_length": 64 << 20 });
  server.addService(SERVICE, {
    stream: (call: grpc.ServerDuplexStream<Buffer, Buffer>) => {
      if (job.mode === "grpc-raised" && !raiseReceiveWindows(call)) throw new Error("could not raise the receive windows");
      let n = 0;
      const c0 = cpuSeconds();
      call.on("data", (b: Buffer) => {
        n += b.length;
        if (n >= job.total) {
          call.write(Buffer.from("ok"));
          call.end();
          send({ cpu: cpuSeconds() - c0 });
        }
      });
    },
  });
  server.bindAsync("127.0.0.1:0", serverCredentials(job.certs), (e, port) => {
    if (e) throw e;
    send({ port });
  });
}

async function run(job: Job, messageBytes: number): Promise<string> {
  const child = fork(new URL(import.meta.url).pathname, [], { env: { ...process.env, GRPC_STREAM_BENCH_JOB: JSON.stringify(job) } });
  const inbox: FromChild[] = [];
  let wake: (() => void) | undefined;
  child.on("message", (m: FromChild) => {
    inbox.push(m);
    wake?.();
  });
  const next = async () => {
    while (!inbox.length) await new Promise<void>((r) => (wake = r));
    return inbox.shift()!;
  };
  try {
    const hello = await next();
    if (!("port" in hello)) throw new Error("receiver did not say its port");
    const address = `127.0.0.1:${hello.port}`;
    const buf = Buffer.alloc(messageBytes, 7);
    let c0: number;
    let t0: number;
    if (job.mode === "tls") {
      const s = tls.connect({ host: "127.0.0.1", port: hello.port, ca: readFileSync(job.certs.ca), cert: readFileSync(job.certs.cert), key: readFileSync(job.certs.key), checkServerIdentity: () => undefined });
      await new Promise((r) => s.once("secureConnect", r));
      const done = new Promise((r) => s.once("data", r));
      c0 = cpuSeconds();
      t0 = performance.now();
      for (let sent = 0; sent < job.total; sent += messageBytes) if (!s.write(buf)) await new Promise((r) => s.once("drain", r));
      await done;
      s.destroy();
    } else {
      const Client = grpc.makeGenericClientConstructor(SERVICE, "Stream");
      const client = new Client(address, clientCredentials(job.certs), { ...dialOptions(address), "grpc.max_send_message_length": 64 << 20 });
      const call = (client as unknown as { stream(): grpc.ClientDuplexStream<Buffer, Buffer> }).stream();
      const done = new Promise((r) => call.once("data", r));
      c0 = cpuSeconds();
      t0 = performance.now();
      for (let sent = 0; sent < job.total; sent += messageBytes) if (!call.write(buf)) await new Promise((r) => call.once("drain", r));
      await done;
      call.end();
      client.close();
    }
    const ms = performance.now() - t0;
    const senderCpu = cpuSeconds() - c0;
    const r = await next();
    if (!("cpu" in r)) throw new Error("receiver did not report its CPU");
    const gib = job.total / 2 ** 30;
    return `${job.mode.padEnd(13)} ${(job.total / 1e6 / (ms / 1000)).toFixed(0).padStart(6)} MB/s   sender ${(senderCpu / gib).toFixed(2)} CPU-s/GiB   receiver ${(r.cpu / gib).toFixed(2)} CPU-s/GiB`;
  } finally {
    child.kill();
  }
}

const jobEnv = process.env.GRPC_STREAM_BENCH_JOB;
if (jobEnv) receive(JSON.parse(jobEnv) as Job);
else {
  const arg = (name: string, dflt: number) => {
    const i = process.argv.indexOf(name);
    return i >= 0 ? Number(process.argv[i + 1]) : dflt;
  };
  const total = arg("--size", 1024) * 2 ** 20;
  const message = arg("--message", 4096) * 1024;
  const dir = await mkdtemp(path.join(os.tmpdir(), "grpc-stream-"));
  try {
    const { source } = await makeCerts(path.join(dir, "certs"));
    if (source.insecure) throw new Error("makeCerts gave no certificates");
    console.log(`${total / 2 ** 20} MiB in messages of ${message / 1024} KiB, loopback, mutual TLS`);
    for (const mode of ["grpc-default", "grpc-raised", "tls"] as const) console.log(await run({ mode, total, certs: source }, message));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
