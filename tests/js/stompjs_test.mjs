// Pegasus over STOMP with @stomp/stompjs 7 under Node: one scenario per run.
//   node stompjs_test.mjs SCENARIO     (env: PEGASUS_WS, PEGASUS_USER, PEGASUS_TOKEN)
// Exits 0 when the scenario holds; prints what went wrong and exits 1 otherwise.
// The queues and topics a scenario uses are created by tests/ws/test_stompjs.py.
import { Client } from "@stomp/stompjs";
import WebSocket from "ws";

Object.assign(globalThis, { WebSocket }); // Node 20 has no WebSocket of its own

const WAIT_MS = 20000;
const url = `${process.env.PEGASUS_WS}/ws/stomp/`;

function connect(extraHeaders = {}) {
  return new Promise((resolve, reject) => {
    const client = new Client({
      brokerURL: url,
      connectHeaders: { login: process.env.PEGASUS_USER, passcode: process.env.PEGASUS_TOKEN, ...extraHeaders },
      reconnectDelay: 0,
      heartbeatIncoming: 10000,
      heartbeatOutgoing: 10000,
    });
    client.onConnect = () => resolve(client);
    client.onStompError = (frame) => reject(new Error(`ERROR frame: ${frame.headers.message} ${frame.body}`));
    client.onWebSocketError = (event) => reject(new Error(`WebSocket error: ${event.message ?? event}`));
    client.activate();
  });
}

// Collects the messages of one subscription; next() waits for the next one.
function inbox(client, destination, headers) {
  const seen = [];
  const waiters = [];
  client.subscribe(destination, (message) => {
    const waiter = waiters.shift();
    if (waiter) waiter(message);
    else seen.push(message);
  }, headers);
  return {
    next() {
      if (seen.length) return Promise.resolve(seen.shift());
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error("no message in time")), WAIT_MS);
        waiters.push((m) => { clearTimeout(timer); resolve(m); });
      });
    },
    async nothingFor(ms) {
      await new Promise((r) => setTimeout(r, ms));
      return seen.length === 0;
    },
  };
}

function receipt(client, id) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no RECEIPT ${id}`)), WAIT_MS);
    client.watchForReceipt(id, () => { clearTimeout(timer); resolve(); });
  });
}

async function sent(client, destination, body, headers = {}) {
  const id = `r-${Math.random().toString(36).slice(2)}`;
  const done = receipt(client, id);
  client.publish({ destination, body, headers: { ...headers, receipt: id } });
  await done;
}

function check(condition, what) {
  if (!condition) throw new Error(`expected: ${what}`);
}

const scenarios = {
  async send_receive_ack() {
    const client = await connect();
    const box = inbox(client, "/queue/js-orders", { ack: "client-individual" });
    await sent(client, "/queue/js-orders", "hello from stompjs", { color: "blue" });
    const m = await box.next();
    check(m.body === "hello from stompjs", "the body");
    check(m.headers.color === "blue", "the header");
    m.ack();
    await client.deactivate();
  },

  async nack_redelivers() {
    const client = await connect();
    const box = inbox(client, "/queue/js-nack", { ack: "client-individual" });
    await sent(client, "/queue/js-nack", "again");
    const first = await box.next();
    first.nack();
    const second = await box.next();
    check(second.body === "again" && second.headers.redelivered === "true", "a redelivery");
    second.ack();
    await client.deactivate();
  },

  async prefetch_respected() {
    const client = await connect();
    for (let i = 0; i < 4; i++) await sent(client, "/queue/js-prefetch", `m${i}`);
    const box = inbox(client, "/queue/js-prefetch", { ack: "client-individual", "prefetch-count": "2" });
    const a = await box.next();
    await box.next();
    check(await box.nothingFor(1000), "nothing beyond prefetch");
    a.ack();
    const c = await box.next();
    check(c.body === "m2", "the third after one ack");
    await client.deactivate();
  },

  async durable_collects_while_away() {
    const headers = { ack: "auto", "durable-subscription-name": "js-sub" };
    let client = await connect({ "client-id": "js-reader" });
    inbox(client, "/topic/js-news", headers);
    await sent(client, "/topic/js-news", "before");
    await client.deactivate();
    const producer = await connect();
    await sent(producer, "/topic/js-news", "while away");
    await producer.deactivate();
    client = await connect({ "client-id": "js-reader" });
    const box = inbox(client, "/topic/js-news", headers);
    const bodies = [(await box.next()).body];
    if (bodies[0] === "before") bodies.push((await box.next()).body);
    check(bodies.includes("while away"), "the message published while away");
    await client.deactivate();
  },

  async transaction_commit_and_abort() {
    const client = await connect();
    const box = inbox(client, "/queue/js-tx", { ack: "client-individual" });
    const dropped = client.begin();
    client.publish({ destination: "/queue/js-tx", body: "dropped", headers: { transaction: dropped.id } });
    dropped.abort();
    const kept = client.begin();
    client.publish({ destination: "/queue/js-tx", body: "kept", headers: { transaction: kept.id } });
    check(await box.nothingFor(500), "nothing before commit");
    kept.commit();
    const m = await box.next();
    check(m.body === "kept", "only the committed message");
    m.ack();
    check(await box.nothingFor(500), "the aborted one never arrives");
    await client.deactivate();
  },
};

const name = process.argv[2];
if (!scenarios[name]) {
  console.error(`unknown scenario ${name}; one of ${Object.keys(scenarios).join(", ")}`);
  process.exit(2);
}
try {
  await scenarios[name]();
  console.log(`ok ${name}`);
  process.exit(0);
} catch (error) {
  console.error(`FAIL ${name}: ${error.stack ?? error}`);
  process.exit(1);
}
