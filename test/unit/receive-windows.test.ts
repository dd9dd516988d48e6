// The target raises the HTTP/2 receive windows of a replication connection by
// reaching the session through grpc-js's call objects (grpc-js has no server
// option for it). This checks, against the grpc-js in node_modules, that the
// session is found and the windows are raised, so an upgrade that changes
// those internals fails here instead of quietly making replication slower.
import { test } from "node:test";
import assert from "node:assert/strict";
import type { Http2Session } from "node:http2";
import * as grpc from "@grpc/grpc-js";
import { CONNECTION_WINDOW, STREAM_WINDOW, raiseReceiveWindows } from "../../agent/target/receiver.ts";

const identity = (b: Buffer) => b;
const SERVICE = { stream: { path: "/t.T/S", requestStream: true, responseStream: true, requestSerialize: identity, requestDeserialize: identity, responseSerialize: identity, responseDeserialize: identity, originalName: "s" } } satisfies grpc.ServiceDefinition;

test("a server call's HTTP/2 receive windows are raised (stream and connection)", async () => {
  const server = new grpc.Server();
  const seen = new Promise<{ raised: boolean; session?: Http2Session }>((resolve) => {
    server.addService(SERVICE, {
      stream: (call: grpc.ServerDuplexStream<Buffer, Buffer>) => {
        const raised = raiseReceiveWindows(call);
        let c = (call as unknown as { call?: { stream?: { session?: Http2Session }; nextCall?: unknown } }).call;
        let session: Http2Session | undefined;
        for (let i = 0; i < 8 && c && !session; i++) {
          session = c.stream?.session;
          c = c.nextCall as typeof c;
        }
        // Once the peer acknowledged the new SETTINGS, they are the session's local settings.
        session?.once("localSettings", () => resolve({ raised, session }));
        if (!session) resolve({ raised });
        call.on("data", () => undefined);
        call.on("end", () => call.end());
      },
    });
  });
  const port = await new Promise<number>((resolve, reject) => server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  const Client = grpc.makeGenericClientConstructor(SERVICE, "T");
  const client = new Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  const call = (client as unknown as { stream(): grpc.ClientDuplexStream<Buffer, Buffer> }).stream();
  call.on("error", () => undefined);
  call.write(Buffer.from("x"));
  try {
    let timer: NodeJS.Timeout | undefined;
    const { raised, session } = await Promise.race([seen, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error("the client never acknowledged new SETTINGS: the windows were not raised")), 10_000)))]);
    clearTimeout(timer);
    assert.ok(raised, "raiseReceiveWindows found the call's HTTP/2 session");
    assert.ok(session, "the session is reachable through the call");
    assert.equal(session.localSettings.initialWindowSize, STREAM_WINDOW);
    assert.ok((session.state.localWindowSize ?? 0) >= CONNECTION_WINDOW / 2, `connection window ${session.state.localWindowSize}`);
  } finally {
    call.end();
    client.close();
    server.forceShutdown();
  }
});
