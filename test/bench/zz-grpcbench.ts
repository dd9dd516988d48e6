import * as grpc from "@grpc/grpc-js";
import tls from "node:tls";
import { readFileSync } from "node:fs";
import { fork } from "node:child_process";
import { clientCredentials, serverCredentials, dialOptions } from "../../common/tls.ts";
const pki = "/tmp/ps/pki";
const tlsA = { ca: `${pki}/ca.crt`, cert: `${pki}/a.crt`, key: `${pki}/a.key` };
const tlsB = { ca: `${pki}/ca.crt`, cert: `${pki}/b.crt`, key: `${pki}/b.key` };
const MSG = Number(process.env.MSG ?? 1 << 20);
const TOTAL = Number(process.env.TOTAL ?? 1 << 30);
const SWIN = Number(process.env.SWIN ?? 0), CWIN = Number(process.env.CWIN ?? 0);
const RAW = process.env.RAW === "1";
const svc = { stream: { path: "/t.T/S", requestStream: true, responseStream: true, requestSerialize: (b: Buffer) => b, requestDeserialize: (b: Buffer) => b, responseSerialize: (b: Buffer) => b, responseDeserialize: (b: Buffer) => b } };
const cpu = () => { const c = process.cpuUsage(); return (c.user + c.system) / 1e6; };
if (process.env.ROLE === "server") {
  if (RAW) {
    const srv = tls.createServer({ ca: readFileSync(tlsB.ca), cert: readFileSync(tlsB.cert), key: readFileSync(tlsB.key), requestCert: true, rejectUnauthorized: true }, (s) => {
      let n = 0; const c0 = cpu(); s.on("data", (b: Buffer) => { n += b.length; if (n >= TOTAL) { s.end("ok"); process.send!({ cpu: cpu() - c0 }); } });
    });
    srv.listen(0, "127.0.0.1", () => process.send!({ port: (srv.address() as any).port }));
  } else {
    const server = new grpc.Server({ "grpc.max_receive_message_length": 64 << 20 });
    const sc = serverCredentials(tlsB as any) as any;
    if (SWIN) { const base = sc._getConstructorOptions(); sc._getConstructorOptions = () => ({ ...base, settings: { initialWindowSize: SWIN } }); }
    server.addService(svc as any, { stream: (call: any) => {
      const s = call.call?.stream?.session ?? call.call?.nextCall?.stream?.session; if (!s) console.log("no session");
      if (CWIN) s.setLocalWindowSize(CWIN);
      if (process.env.SET) s.settings({ initialWindowSize: Number(process.env.SET), ...(process.env.MFS ? { maxFrameSize: Number(process.env.MFS) } : {}) });
      let n = 0; const c0 = cpu(); call.on("data", (b: Buffer) => { n += b.length; if (n >= TOTAL) { call.write(Buffer.from("ok")); call.end(); process.send!({ cpu: cpu() - c0 }); } }); } });
    server.bindAsync("127.0.0.1:0", sc, (e, p) => process.send!({ port: p }));
  }
} else {
  const child = fork(new URL(import.meta.url).pathname, { env: { ...process.env, ROLE: "server" } });
  const msgs: any[] = []; let wake: any; child.on("message", (m) => { msgs.push(m); wake?.(); });
  const next = async () => { while (!msgs.length) await new Promise((r) => (wake = r)); return msgs.shift(); };
  const { port } = await next();
  const buf = Buffer.alloc(MSG, 7);
  let t0 = 0, c0 = 0;
  if (RAW) {
    const s = tls.connect({ host: "127.0.0.1", port, ca: readFileSync(tlsA.ca), cert: readFileSync(tlsA.cert), key: readFileSync(tlsA.key), checkServerIdentity: () => undefined });
    await new Promise((r) => s.once("secureConnect", r));
    const done = new Promise((r) => s.on("data", r));
    c0 = cpu(); t0 = performance.now();
    for (let sent = 0; sent < TOTAL; sent += MSG) { if (!s.write(buf)) await new Promise((r) => s.once("drain", r)); }
    await done; s.destroy();
  } else {
    const Client = grpc.makeGenericClientConstructor(svc as any, "T");
    const opts: any = { ...dialOptions(`127.0.0.1:${port}`), "grpc.max_send_message_length": 64 << 20 };
    if (process.env.CLIWIN) opts["grpc-node.flow_control_window"] = Number(process.env.CLIWIN);
    const client: any = new Client(`127.0.0.1:${port}`, clientCredentials(tlsA as any), opts);
    const call = client.stream();
    const done = new Promise((r) => call.on("data", r));
    c0 = cpu(); t0 = performance.now();
    for (let sent = 0; sent < TOTAL; sent += MSG) { if (!call.write(buf)) await new Promise((r) => call.once("drain", r)); }
    await done; call.end(); client.close();
  }
  const ms = performance.now() - t0; const cc = cpu() - c0;
  const srv = await next();
  console.log(`${RAW ? "raw tls" : "grpc"} MSG=${MSG} SWIN=${SWIN} CWIN=${CWIN}: ${(TOTAL / 1e6 / (ms / 1000)).toFixed(0)} MB/s, cpu client ${cc.toFixed(2)} s server ${srv.cpu.toFixed(2)} s`);
  child.kill();
}
