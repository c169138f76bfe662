// Write Celery tasks in JavaScript and run them as a taskhost plugin.
//
// A plugin is a module (app.js) that registers tasks and re-exports `handler`, built into a
// WebAssembly component by `taskhost build` (componentize-js, the StarlingMonkey engine):
//
//     import { task } from './taskhost.js';
//     export { handler } from './taskhost.js';
//
//     task('tasks.add', { params: ['x', 'y'] }, function (x, y) {
//       return x + y;
//     });
//
// As in Celery, a task gets the producer's args by position, and its kwargs by the names in
// `params` (a mismatch is a TypeError); what it returns (or resolves to) is its JSON result;
// what it throws is its failure, with the error's `name` as the exception type Python raises
// on `.get()`, its message, and its stack. In a `function` (not an arrow), `this` is the
// running task: `this.request`, `this.retry(...)`, `this.updateState(...)`.
//
// `taskhost build` puts this file beside app.js as the host that builds the plugin carries it,
// so a plugin always speaks the contract of the host it was built for.

import * as host from 'taskhost:plugin/host@0.1.1';
import { handle } from 'wasi:http/outgoing-handler@0.2.12';
import { Fields, OutgoingBody, OutgoingRequest, RequestOptions } from 'wasi:http/types@0.2.12';

const registry = new Map();
let pluginVersion = '0.0.0';

/** Thrown by `this.retry()`: the task runs again after `countdown` seconds (none: its backoff). */
export class Retry extends Error {
  constructor(exc, countdown) {
    super(countdown === undefined ? 'Retry' : `Retry in ${countdown}s`);
    this.name = 'Retry';
    this.exc = exc;
    this.countdown = countdown;
  }
}

/** Throw to refuse the message: it is dead-lettered with `reason`, never retried. */
export class Reject extends Error {
  constructor(reason = 'rejected') {
    super(String(reason));
    this.name = 'Reject';
  }
}

/** Something the operator did not grant: an HTTP origin, say. */
export class CapabilityDenied extends Error {
  constructor(message) {
    super(message);
    this.name = 'CapabilityDenied';
  }
}

/** A failed connection, as Python's ConnectionError. */
export class ConnectionError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ConnectionError';
  }
}

/** Sets the plugin's own version, shown beside the content hash the host computes. */
export function setVersion(version) {
  pluginVersion = String(version);
}

/** One of this plugin's config values, as the operator set them in taskhost.toml. */
export function config(key, fallback = undefined) {
  const value = host.config(key);
  return value === undefined ? fallback : value;
}

function line(level) {
  return (...parts) => host.log(level, parts.map(String).join(' '), []);
}

/** Lines in the worker's log, tagged there with the plugin, task and task id. */
export const log = {
  debug: line('debug'),
  info: line('info'),
  warn: line('warn'),
  error: line('error'),
};

/** Sends a task, as Celery's send_task; it goes out when this task settles. Returns its id. */
export function sendTask(name, args = [], kwargs = {}, options = {}) {
  try {
    return host.send(JSON.stringify({ task: name, args, kwargs, options }));
  } catch (e) {
    throw new Error(`cannot send ${name}: ${e.payload ?? e.message}`);
  }
}

/**
 * Registers `fn` as the task `name`. Options, as Celery's: `params` (the names kwargs bind
 * to), `maxRetries`, `retryBackoff`, `retryBackoffMax`, `retryJitter`, `autoretryFor` (error
 * names), `softTimeLimit`, `timeLimit`, `rateLimit`, `queue`.
 */
export function task(name, options, fn) {
  if (typeof options === 'function') {
    [options, fn] = [{}, options];
  }
  if (registry.has(name)) {
    throw new Error(`task ${name} is registered twice`);
  }
  registry.set(name, { fn, options });
  return fn;
}

/** The arguments in parameter order, or a TypeError saying what does not fit. */
function bind(name, params, args, kwargs) {
  const keys = Object.keys(kwargs);
  if (!params) {
    if (keys.length) {
      throw new TypeError(`${name}() takes no keyword arguments (declare params to name them)`);
    }
    return args;
  }
  if (args.length > params.length) {
    throw new TypeError(
      `${name}() takes ${params.length} positional arguments but ${args.length} were given`);
  }
  const bound = [...args];
  for (const key of keys) {
    const at = params.indexOf(key);
    if (at < 0) {
      throw new TypeError(`${name}() got an unexpected keyword argument '${key}'`);
    }
    if (at < args.length) {
      throw new TypeError(`${name}() got multiple values for argument '${key}'`);
    }
    bound[at] = kwargs[key];
  }
  return bound;
}

function error(e) {
  if (e instanceof Error) {
    const kind = e.name && e.name !== 'Error' ? e.name : e.constructor?.name || 'Error';
    const stack = e.stack ? `${kind}: ${e.message}\n${e.stack}` : undefined;
    return { kind, message: e.message, traceback: stack };
  }
  return { kind: 'Error', message: String(e), traceback: undefined };
}

function context(record, args, kwargs) {
  const request = {
    id: record.id,
    task: record.name,
    args,
    kwargs,
    retries: record.retries,
    rootId: record.rootId,
    parentId: record.parentId,
    hostname: record.hostname,
    softDeadline:
      record.softDeadlineMs === undefined ? undefined : Number(record.softDeadlineMs) / 1000,
  };
  return {
    name: record.name,
    request,
    retry({ exc, countdown } = {}) {
      if (countdown !== undefined && !(countdown >= 0)) {
        throw new RangeError(`countdown must be a number of seconds >= 0, got ${countdown}`);
      }
      throw new Retry(exc, countdown);
    },
    updateState(state = 'PROGRESS', meta = null) {
      try {
        host.updateState(state, JSON.stringify(meta));
      } catch (e) {
        throw new Error(`updateState refused: ${e.payload ?? e.message}`);
      }
    },
    softTimeLeft() {
      return request.softDeadline === undefined
        ? undefined
        : Math.max(0, request.softDeadline - Date.now() / 1000);
    },
  };
}

function failure(e) {
  if (e instanceof Retry) {
    const reason = error(e.exc ?? e);
    return { tag: 'retry', val: { countdown: e.countdown, reason } };
  }
  if (e instanceof Reject) {
    return { tag: 'reject', val: e.message };
  }
  return { tag: 'error', val: error(e) };
}

function defaults(o) {
  return {
    queue: o.queue,
    maxRetries: o.maxRetries,
    retryBackoff: o.retryBackoff === true ? 1 : o.retryBackoff || undefined,
    retryBackoffMax: o.retryBackoffMax,
    retryJitter: o.retryJitter,
    softTimeLimit: o.softTimeLimit,
    timeLimit: o.timeLimit,
    rateLimit: o.rateLimit,
    autoretryFor: o.autoretryFor,
  };
}

/** The component's export: the host asks it for the tasks, then runs them. */
export const handler = {
  version() {
    return pluginVersion;
  },
  tasks() {
    return [...registry].map(([name, { options }]) => ({ name, defaults: defaults(options) }));
  },
  async run(record) {
    const registered = registry.get(record.name);
    if (!registered) {
      throw { tag: 'error', val: { kind: 'NotRegistered', message: record.name } };
    }
    const short = record.name.split('.').pop();
    try {
      const args = JSON.parse(record.args);
      const kwargs = JSON.parse(record.kwargs);
      const bound = bind(short, registered.options.params, args, kwargs);
      const result = await registered.fn.apply(context(record, args, kwargs), bound);
      return JSON.stringify(result === undefined ? null : result);
    } catch (e) {
      throw failure(e);
    }
  },
};

// HTTP, straight over wasi:http, so a denied origin is told apart from a failed connection.

const encoder = new TextEncoder();
const decoder = new TextDecoder();
// The most one write may hand the host (wasi:io's blocking-write-and-flush limit).
const CHUNK = 4096;

/** A whole answer: `status`, `headers` (lower-case names), `body` (bytes), `text()`, `json()`. */
export class Response {
  constructor(url, status, headers, body) {
    this.url = url;
    this.status = status;
    this.ok = status < 400;
    this.headers = headers;
    this.body = body;
  }

  text() {
    return decoder.decode(this.body);
  }

  json() {
    const text = this.text();
    return text.trim() ? JSON.parse(text) : null;
  }
}

function denial(code, url) {
  const tag = code?.tag ?? 'unknown';
  if (tag === 'HTTP-request-denied') {
    return new CapabilityDenied(`${url}: this plugin is not allowed to reach that origin`);
  }
  return new ConnectionError(`${url}: ${tag}`);
}

function dispose(resource) {
  resource[Symbol.dispose]?.();
}

function readAll(response) {
  const incoming = response.consume();
  const stream = incoming.stream();
  const chunks = [];
  for (;;) {
    try {
      chunks.push(stream.blockingRead(65536n));
    } catch (e) {
      if (e.payload?.tag === 'closed') break;
      throw new ConnectionError('reading the answer failed');
    }
  }
  dispose(stream);
  const body = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const chunk of chunks) {
    body.set(chunk, at);
    at += chunk.length;
  }
  return body;
}

/**
 * Sends one request and reads the whole answer, synchronously. `json` is sent as JSON,
 * `body` as a string or bytes, with Content-Length; `timeout` in seconds bounds the
 * connection and each wait for the answer.
 */
export function request(method, url, { json, body, headers = {}, timeout = 30 } = {}) {
  const parsed = new URL(url);
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new TypeError(`not an http(s) URL: ${url}`);
  }
  let payload;
  const fields = Object.entries(headers).map(([k, v]) => [k.toLowerCase(), encoder.encode(String(v))]);
  if (json !== undefined) {
    payload = encoder.encode(JSON.stringify(json));
    if (!fields.some(([k]) => k === 'content-type')) {
      fields.push(['content-type', encoder.encode('application/json')]);
    }
  } else if (body !== undefined) {
    payload = typeof body === 'string' ? encoder.encode(body) : body;
  }
  if (payload) fields.push(['content-length', encoder.encode(String(payload.length))]);
  const req = new OutgoingRequest(Fields.fromList(fields));
  req.setMethod({ tag: method.toLowerCase() });
  req.setScheme({ tag: parsed.protocol === 'https:' ? 'HTTPS' : 'HTTP' });
  req.setAuthority(parsed.host);
  req.setPathWithQuery(parsed.pathname + parsed.search);
  const options = new RequestOptions();
  const nanos = BigInt(Math.round(timeout * 1e9));
  for (const set of ['setConnectTimeout', 'setFirstByteTimeout', 'setBetweenBytesTimeout']) {
    try {
      options[set](nanos);
    } catch {
      // the host keeps its own ceiling
    }
  }
  // The body is taken before the request goes, and written after: the host reads it as it
  // is written.
  const outgoing = payload ? req.body() : undefined;
  let future;
  try {
    future = handle(req, options);
  } catch (e) {
    throw denial(e.payload, url);
  }
  if (outgoing) {
    const stream = outgoing.write();
    for (let at = 0; at < payload.length; at += CHUNK) {
      stream.blockingWriteAndFlush(payload.subarray(at, at + CHUNK));
    }
    dispose(stream);
    OutgoingBody.finish(outgoing, undefined);
  }
  const ready = future.subscribe();
  ready.block();
  dispose(ready);
  const outcome = future.get();
  dispose(future);
  if (!outcome || outcome.tag !== 'ok') throw new ConnectionError(`${url}: no answer`);
  if (outcome.val.tag !== 'ok') throw denial(outcome.val.val, url);
  const response = outcome.val.val;
  const answerFields = response.headers();
  const answerHeaders = Object.fromEntries(
    answerFields.entries().map(([k, v]) => [k.toLowerCase(), decoder.decode(v)]));
  dispose(answerFields);
  const status = response.status();
  const answer = readAll(response);
  dispose(response);
  return new Response(url, status, answerHeaders, answer);
}

/** The HTTP client: `http.get(url)`, `http.post(url, { json })`, ... */
export const http = {
  request,
  get: (url, o) => request('GET', url, o),
  post: (url, o) => request('POST', url, o),
  put: (url, o) => request('PUT', url, o),
  patch: (url, o) => request('PATCH', url, o),
  delete: (url, o) => request('DELETE', url, o),
};
