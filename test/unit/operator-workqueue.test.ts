// The operator's work queue keeps client-go's promises: a key is queued once, is
// never processed by two workers at once, comes back once if it changed while
// being processed, and failures back off per key. Timers are mocked, so the
// delays are exact and the tests do not sleep.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { WorkQueue } from "../../operator/runtime/workqueue.ts";

const PENDING = Symbol("pending");

/** Let settled promises run their callbacks. */
const flush = () => new Promise<void>((r) => setImmediate(r));

/** What get() hands out at once (PENDING if it waits), without ever hanging a test. */
async function take(q: WorkQueue): Promise<string | undefined | typeof PENDING> {
  const w = watch(q.get());
  await flush();
  return w.value;
}

/** A get() whose outcome can be looked at without awaiting it. */
function watch(p: Promise<string | undefined>): { value: string | undefined | typeof PENDING } {
  const w: { value: string | undefined | typeof PENDING } = { value: PENDING };
  void p.then((v) => (w.value = v));
  return w;
}

test("a key added twice is handed out once", async () => {
  const q = new WorkQueue();
  q.add("a");
  q.add("a");
  q.add("b");
  assert.equal(q.length, 2);
  assert.equal(await take(q), "a");
  assert.equal(await take(q), "b");
  const third = watch(q.get());
  await flush();
  assert.equal(third.value, PENDING, "a duplicate add must not be handed out again");
  q.shutDown();
  await flush();
  assert.equal(third.value, undefined);
});

test("a key added while processed waits for done() and then comes back exactly once", async () => {
  const q = new WorkQueue();
  q.add("a");
  assert.equal(await take(q), "a");
  q.add("a");
  q.add("a");
  assert.equal(q.length, 0, "a key being processed is not queued");
  const second = watch(q.get());
  await flush();
  assert.equal(second.value, PENDING, "a second worker must not get a key that is being processed");
  q.done("a");
  await flush();
  assert.equal(second.value, "a", "the key added during processing runs again after done()");
  const third = watch(q.get());
  q.done("a");
  await flush();
  assert.equal(third.value, PENDING, "two adds during processing give one more run, not two");
  assert.equal(q.length, 0);
  q.shutDown();
});

test("a waiting worker gets a key as soon as it is added, and other keys are not held back by one being processed", async () => {
  const q = new WorkQueue();
  const w1 = watch(q.get());
  await flush();
  assert.equal(w1.value, PENDING);
  q.add("a");
  await flush();
  assert.equal(w1.value, "a");
  q.add("a"); // while processed
  q.add("b");
  assert.equal(await take(q), "b");
  q.done("b");
  q.done("a");
  assert.equal(await take(q), "a");
  q.shutDown();
});

test("addAfter: the key arrives after its delay, a shorter delay wins over a longer pending one, and a longer one does not postpone a shorter", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const q = new WorkQueue();

  q.addAfter("a", 1000);
  q.addAfter("a", 100);
  t.mock.timers.tick(99);
  assert.equal(q.length, 0);
  t.mock.timers.tick(1);
  assert.equal(q.length, 1, "the shorter delay replaced the longer one");
  assert.equal(await take(q), "a");
  q.done("a");
  t.mock.timers.tick(2000);
  assert.equal(q.length, 0, "the longer timer was cancelled, not left to add the key again");

  q.addAfter("b", 100);
  q.addAfter("b", 1000);
  t.mock.timers.tick(100);
  assert.equal(q.length, 1, "a later addAfter does not postpone an earlier one");
  assert.equal(await take(q), "b");
  q.done("b");
  t.mock.timers.tick(2000);
  assert.equal(q.length, 0);

  q.addAfter("c", 0);
  assert.equal(q.length, 1, "a delay of 0 adds at once");
  q.shutDown();
});

test("addRateLimited backs off exponentially per key up to the maximum, and forget() resets", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const q = new WorkQueue({ baseDelayMs: 10, maxDelayMs: 100 });
  assert.deepEqual([1, 2, 3, 4, 5, 6].map(() => q.addRateLimited("a")), [10, 20, 40, 80, 100, 100]);
  assert.equal(q.numRequeues("a"), 6);
  assert.equal(q.addRateLimited("b"), 10, "backoff is per key");
  q.forget("a");
  assert.equal(q.numRequeues("a"), 0);
  assert.equal(q.addRateLimited("a"), 10, "forget() starts the backoff over");

  // The key really is queued after its delay (and only once for many requeues).
  const q2 = new WorkQueue({ baseDelayMs: 50 });
  assert.equal(q2.addRateLimited("k"), 50);
  t.mock.timers.tick(49);
  assert.equal(q2.length, 0);
  t.mock.timers.tick(1);
  assert.equal(q2.length, 1);
  assert.equal(await take(q2), "k");
  q2.done("k");
  assert.equal(q2.addRateLimited("k"), 100);
  t.mock.timers.tick(99);
  assert.equal(q2.length, 0, "the second failure waits twice as long");
  t.mock.timers.tick(1);
  assert.equal(q2.length, 1);
  q.shutDown();
  q2.shutDown();
});

test("the default backoff starts at 500ms", () => {
  const q = new WorkQueue();
  assert.equal(q.addRateLimited("a"), 500);
  assert.equal(q.addRateLimited("a"), 1000);
  q.shutDown();
});

test("shutDown releases waiting workers with undefined, and nothing is queued afterwards", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const q = new WorkQueue();
  const a = watch(q.get());
  const b = watch(q.get());
  q.addAfter("later", 100);
  await flush();
  assert.equal(a.value, PENDING);
  q.shutDown();
  await flush();
  assert.equal(a.value, undefined);
  assert.equal(b.value, undefined);
  assert.equal(await take(q), undefined, "get() after shutdown returns undefined at once");
  q.add("x");
  q.addAfter("y", 10);
  t.mock.timers.tick(1000);
  assert.equal(q.length, 0, "adds after shutdown and pending delayed adds are dropped");
});

test("onDequeue reports how long a key waited", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const q = new WorkQueue();
  const waits: number[] = [];
  q.onDequeue = (ms) => waits.push(ms);
  q.add("a");
  t.mock.timers.tick(250);
  assert.equal(await take(q), "a");
  assert.deepEqual(waits, [250]);
  q.shutDown();
});

type Cmd = { op: "add"; key: string } | { op: "get"; w: number } | { op: "done"; w: number };

test("property: with several workers, no key is processed twice at once, nothing is handed out without an add, and every add is processed", async () => {
  const keys = ["a", "b", "c", "d"];
  const workers = 3;
  const cmd: fc.Arbitrary<Cmd> = fc.oneof(
    fc.record({ op: fc.constant("add" as const), key: fc.constantFrom(...keys) }),
    fc.record({ op: fc.constant("get" as const), w: fc.nat({ max: workers - 1 }) }),
    fc.record({ op: fc.constant("done" as const), w: fc.nat({ max: workers - 1 }) }),
  );
  await fc.assert(
    fc.asyncProperty(fc.array(cmd, { maxLength: 60 }), async (cmds) => {
      const q = new WorkQueue();
      // Per worker: idle, waiting on get(), or holding a key.
      const state: ({ s: "idle" } | { s: "waiting" } | { s: "holding"; key: string })[] = Array.from({ length: workers }, () => ({ s: "idle" as const }));
      // A key added since it was last handed out (so it is owed one more run).
      const owed = new Set<string>();
      // Found in get() callbacks, asserted after each step (so fast-check sees them and shrinks).
      const violations: string[] = [];
      const handedOut = (w: number, key: string | undefined) => {
        if (key === undefined) return void (state[w] = { s: "idle" });
        for (const [i, st] of state.entries()) if (st.s === "holding" && st.key === key) violations.push(`key ${key} handed to worker ${w} while worker ${i} processes it`);
        if (!owed.has(key)) violations.push(`key ${key} handed out without an add since its last run`);
        owed.delete(key);
        state[w] = { s: "holding", key };
      };
      const step = async (c: Cmd) => {
        if (c.op === "add") {
          owed.add(c.key);
          q.add(c.key);
        } else if (c.op === "get" && state[c.w]!.s === "idle") {
          state[c.w] = { s: "waiting" };
          void q.get().then((k) => handedOut(c.w, k));
        } else if (c.op === "done") {
          const st = state[c.w]!;
          if (st.s !== "holding") return;
          state[c.w] = { s: "idle" };
          q.done(st.key);
        }
        await flush();
        assert.deepEqual(violations, []);
        // No lost wakeup: a worker never waits while a key sits in the queue.
        if (state.some((s) => s.s === "waiting")) assert.equal(q.length, 0, "a worker is waiting while keys are queued");
      };
      for (const c of cmds) await step(c);
      // Drain: every worker finishes what it holds and asks for more, until nothing moves.
      for (let round = 0; round < 100; round++) {
        const busy = state.map((s, w) => [s, w] as const).filter(([s]) => s.s !== "waiting");
        if (busy.length === 0 && q.length === 0) break;
        for (const [s, w] of busy) await step(s.s === "holding" ? { op: "done", w } : { op: "get", w });
      }
      assert.deepEqual([...owed], [], "every key added is processed after its last add");
      assert.equal(q.length, 0);
      q.shutDown();
      await flush();
      assert.ok(state.every((s) => s.s === "idle"), "shutDown releases every waiting worker");
    }),
    { numRuns: 300 },
  );
});

test("urgent keys (a change someone made) are handed out before periodic ones, also when already queued or being processed", async () => {
  const q = new WorkQueue();
  for (let i = 0; i < 1000; i++) q.add(`p${i}`);
  q.add("changed", true);
  q.add("p500", true); // queued as periodic work: moves ahead, and is still handed out once
  assert.equal(q.length, 1000 + 1);
  assert.equal(await take(q), "changed");
  assert.equal(await take(q), "p500");
  assert.equal(await take(q), "p0");
  // A key being processed that changes again comes back ahead of the periodic work.
  q.add("p1", true);
  assert.equal(await take(q), "p1");
  q.add("p1", true);
  q.done("p0");
  q.done("p1");
  assert.equal(await take(q), "p1", "came back urgent after done()");
  assert.equal(await take(q), "p2");
  const seen = new Set<string>(["changed", "p500", "p0", "p1", "p2"]);
  for (let k = await take(q); typeof k === "string"; k = await take(q)) {
    assert.ok(!seen.has(k), `${k} handed out twice`);
    seen.add(k);
    if (seen.size === 1001) break;
  }
  assert.equal(seen.size, 1001);
  q.shutDown();
});
