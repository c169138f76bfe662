// Testing a plugin's tasks natively, under node's test runner, with a test double for the
// host: the config values you give it, and the progress, log lines, sent tasks and HTTP
// requests it records for your asserts. Load it before the plugin, so that the plugin's
// imports of the host (`taskhost:plugin/host`, `wasi:http/...`, `wasi:otel/tracing`) reach the double:
//
//     node --import ./taskhost-testing.js --test
//
//     // app.test.js
//     import { test } from 'node:test';
//     import assert from 'node:assert/strict';
//     import { FakeHost } from './taskhost-testing.js';
//     import './app.js';
//
//     test('add', async () => {
//       assert.equal(await new FakeHost().run('greet.add', [2, 3]), 5);
//     });
//
// `run` calls the task as the worker would (arguments bound by the function's parameters,
// the result through JSON); what the task throws is thrown (a `Retry` for a retry, with its
// `countdown`, autoretries included; a `Reject` for a rejection).

import { register } from 'node:module';

// The double's modules, by the specifiers the SDK imports; they read and write the state the
// FakeHost of the running test holds.
const MODULES = {
  // Natively nothing is traced: the task's span is the invalid one, so a span records nothing.
  tracing: `
    export function outerSpanContext() {
      return {
        traceId: '0'.repeat(32), spanId: '0'.repeat(16), traceFlags: { sampled: false },
        isRemote: false, traceState: [],
      };
    }
    export function onStart() {}
    export function onEnd() {}
  `,
  host: `
    const fake = () => globalThis.__taskhostFake;
    export function config(key) { return fake().config[key]; }
    export function log(level, message) { fake().logs.push([level, message]); }
    export function updateState(state, meta) { fake().progress.push([state, JSON.parse(meta)]); }
    export function send(signature) {
      const sent = JSON.parse(signature);
      fake().sent.push(sent);
      const target = sent.subtask_type === 'chord' ? sent.kwargs.body : sent;
      return target.options?.task_id ?? crypto.randomUUID();
    }
  `,
  types: `
    export class Fields {
      static fromList(list) { const f = new Fields(); f.list = list; return f; }
      entries() { return this.list; }
    }
    export class OutgoingBody {
      constructor() { this.chunks = []; }
      write() { const body = this; return { blockingWriteAndFlush(c) { body.chunks.push(c); } }; }
      static finish() {}
    }
    export class OutgoingRequest {
      constructor(fields) { this.fields = fields; }
      setMethod(m) { this.method = m; }
      setScheme(s) { this.scheme = s; }
      setAuthority(a) { this.authority = a; }
      setPathWithQuery(p) { this.path = p; }
      body() { this.outgoing = new OutgoingBody(); return this.outgoing; }
    }
  `,
  handler: `
    const fake = () => globalThis.__taskhostFake;
    export function handle(request) {
      const origin = request.scheme.tag.toLowerCase() + '://' + request.authority;
      const url = origin + request.path;
      const method = request.method.tag === 'other' ? request.method.val
        : request.method.tag.toUpperCase();
      const body = request.outgoing ? Buffer.concat(request.outgoing.chunks) : undefined;
      const headers = Object.fromEntries(request.fields.entries()
        .map(([k, v]) => [k, new TextDecoder().decode(v)]));
      fake().requests.push([method, url, headers, body]);
      if (fake().denied.has(origin)) throw { payload: { tag: 'HTTP-request-denied' } };
      const answer = fake().responses.get(method + ' ' + url);
      const outcome = answer
        ? { tag: 'ok', val: answered(answer) }
        : { tag: 'err', val: { tag: 'connection-refused' } };
      return { subscribe: () => ({ block() {} }), get: () => ({ tag: 'ok', val: outcome }) };
    }
    function answered({ status, headers, body }) {
      return {
        status: () => status,
        headers: () => ({
          entries: () => Object.entries(headers).map(([k, v]) => [k, new TextEncoder().encode(v)]),
        }),
        consume: () => ({
          stream: () => {
            let read = false;
            return {
              blockingRead() {
                if (read) throw { payload: { tag: 'closed' } };
                read = true;
                return body;
              },
            };
          },
        }),
      };
    }
  `,
};

const HOOKS = `
  const modules = ${JSON.stringify(MODULES)};
  const routes = [
    ['taskhost:plugin/host@', 'host'],
    ['wasi:http/types@', 'types'],
    ['wasi:http/outgoing-handler@', 'handler'],
    ['wasi:otel/tracing@', 'tracing'],
  ];
  export async function resolve(specifier, context, next) {
    const route = routes.find(([prefix]) => specifier.startsWith(prefix));
    return route ? { url: 'taskhost-double:' + route[1], shortCircuit: true }
      : next(specifier, context);
  }
  export async function load(url, context, next) {
    if (url.startsWith('taskhost-double:')) {
      return { format: 'module', source: modules[url.slice(16)], shortCircuit: true };
    }
    return next(url, context);
  }
`;

register(`data:text/javascript,${encodeURIComponent(HOOKS)}`);

/** The host, for one test: starts afresh (nothing recorded) each time one is made. */
export class FakeHost {
  constructor({
    config = {}, retries = 0, taskId = 'test-task', hostname = 'test@localhost',
  } = {}) {
    globalThis.__taskhostFake = {
      config: { ...config },
      logs: [],
      progress: [],
      sent: [],
      requests: [],
      responses: new Map(),
      denied: new Set(),
    };
    Object.assign(this, { retries, taskId, hostname });
  }

  /** Each log line so far: [level, message]. */
  get logs() {
    return [...globalThis.__taskhostFake.logs];
  }

  /** Each updateState so far: [state, meta]. */
  get progress() {
    return [...globalThis.__taskhostFake.progress];
  }

  /** Each signature sent so far, in Celery's shape. */
  get sent() {
    return [...globalThis.__taskhostFake.sent];
  }

  /** Each HTTP request so far: [METHOD, url, headers, body]. */
  get requests() {
    return [...globalThis.__taskhostFake.requests];
  }

  /** The answer to `method url`: `json` (as JSON) or `body`. */
  respond(method, url, { status = 200, json, body = '', headers = {} } = {}) {
    const answer = { status, headers: { ...headers } };
    if (json !== undefined) {
      answer.body = new TextEncoder().encode(JSON.stringify(json));
      answer.headers['content-type'] ??= 'application/json';
    } else {
      answer.body = typeof body === 'string' ? new TextEncoder().encode(body) : body;
    }
    globalThis.__taskhostFake.responses.set(`${method.toUpperCase()} ${url}`, answer);
  }

  /** Refuses every request to `origin` (`scheme://host:port`), as an origin not granted. */
  deny(origin) {
    globalThis.__taskhostFake.denied.add(origin.replace(/\/$/, ''));
  }

  /** Runs the task `name` with `args` and `kwargs`; resolves to its result as a producer
   * reads it, or rejects with what the task threw. */
  async run(name, args = [], kwargs = {}) {
    const { handler } = await import(new URL('./taskhost.js', import.meta.url));
    const record = {
      id: this.taskId,
      name,
      args: JSON.stringify(args),
      kwargs: JSON.stringify(kwargs),
      retries: this.retries,
      rootId: undefined,
      parentId: undefined,
      hostname: this.hostname,
      softDeadlineMs: undefined,
    };
    try {
      return JSON.parse(await handler.run(record));
    } catch (failure) {
      throw failure?.cause ?? failure;
    }
  }
}
