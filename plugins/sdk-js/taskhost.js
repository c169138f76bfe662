// Write Celery tasks in JavaScript and run them as a taskhost plugin.
//
// A plugin is a module (app.js) that registers tasks and re-exports `handler`, built into a
// WebAssembly component by `taskhost build` (componentize-js, the StarlingMonkey engine):
//
//     import { task, ValueError } from './taskhost.js';
//     export { handler } from './taskhost.js';
//
//     task('tasks.add', function (x, y) {
//       return x + y;
//     });
//
//     task('tasks.fetch', async function (url) {
//       const answer = await fetch(url);
//       if (!answer.ok) throw new ValueError(`${url} answered ${answer.status}`);
//       return answer.json();
//     });
//
// As in Celery, a task gets the producer's args by position and its kwargs by the names of
// its parameters (a mismatch is a TypeError); what it returns (or resolves to) is its JSON
// result; what it throws is its failure: the error's class name is the exception type Python
// raises on `.get()` (the SDK exports Python's: ValueError, KeyError, ...; `defineError` makes
// more), with its message and its stack. In a `function` (not an arrow), `this` is the running
// task: `this.request`, `this.retry(...)`, `this.updateState(...)`.
//
// `fetch` is the standard one, over the origins the operator granted: a denied origin rejects
// with `CapabilityDenied`, a failed connection with `ConnectionError` (both TypeErrors, as
// fetch's network errors are). `signature`, `chain`, `group` and `chord` send more tasks, as
// Celery's canvas does. `span(name, fn)` adds a span of the plugin's own to the worker's trace. `taskhost-testing.js` runs the tasks natively, under node's test
// runner, with a test double for the host.
//
// `taskhost build` puts this file beside app.js as the host that builds the plugin carries it,
// so a plugin always speaks the contract of the host it was built for.

import * as host from 'taskhost:plugin/host@0.1.1';
import { handle } from 'wasi:http/outgoing-handler@0.2.12';
import { Fields, OutgoingBody, OutgoingRequest } from 'wasi:http/types@0.2.12';
import * as otel from 'wasi:otel/tracing@0.2.0-rc.2';

const registry = new Map();
let pluginVersion = '0.0.0';

/** Celery's `Task.default_retry_delay`: what `this.retry()` waits given no countdown, s. */
export const DEFAULT_RETRY_DELAY = 180;

// Errors, named as Python's so that `.get()` raises the same type.

/**
 * An error class whose name is `name`: what `.get()` raises for it in Python (a builtin of
 * that name, or an exception class Celery makes of it). `base` is the class it extends.
 */
export function defineError(name, base = Error) {
  const made = {
    [name]: class extends base {
      constructor(message) {
        super(message);
        this.name = name;
      }
    },
  }[name];
  return made;
}

export const ValueError = defineError('ValueError');
export const KeyError = defineError('KeyError');
export const IndexError = defineError('IndexError');
export const LookupError = defineError('LookupError');
export const RuntimeError = defineError('RuntimeError');
export const NotImplementedError = defineError('NotImplementedError');
export const PermissionError = defineError('PermissionError');
export const TimeoutError = defineError('TimeoutError');
export const ZeroDivisionError = defineError('ZeroDivisionError');
/** A failed connection, as Python's ConnectionError; a TypeError, as fetch's network errors. */
export const ConnectionError = defineError('ConnectionError', TypeError);
/** Something the operator did not grant: an HTTP origin, say. A TypeError, as fetch's. */
export const CapabilityDenied = defineError('CapabilityDenied', TypeError);

/** Thrown by `this.retry()`: the task runs again after `countdown` seconds (none: its backoff). */
export class Retry extends Error {
  constructor(exc, countdown) {
    super(countdown === undefined ? 'Retry' : `Retry in ${countdown}s`);
    this.name = 'Retry';
    this.exc = exc;
    this.countdown = countdown;
  }
}

/**
 * Throw to refuse the message: it is dead-lettered with `reason`, never retried. Celery's
 * `requeue` is not supported (a requeued message comes straight back): `this.retry()` runs
 * the task again instead.
 */
export class Reject extends Error {
  constructor(reason = 'rejected', { requeue = false } = {}) {
    if (requeue) {
      throw new TypeError('taskhost: Reject with requeue is not supported (the message is ' +
        'dead-lettered); this.retry() runs the task again');
    }
    super(String(reason));
    this.name = 'Reject';
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

// Registering tasks.

/**
 * Registers `fn` as the task `name`. Options, as Celery's: `maxRetries`, `retryBackoff`,
 * `retryBackoffMax`, `retryJitter`, `autoretryFor` (error classes, or names), `dontAutoretryFor`,
 * `defaultRetryDelay` (seconds, 180), `softTimeLimit`, `timeLimit`, `rateLimit`, `queue`; and
 * `params`, the names kwargs bind to, for a function whose parameters cannot be read (they
 * are read from the function itself otherwise).
 */
export function task(name, options, fn) {
  if (typeof options === 'function') {
    [options, fn] = [{}, options];
  }
  if (typeof fn !== 'function') {
    throw new TypeError(`task ${name}: expected a function`);
  }
  if (registry.has(name)) {
    throw new Error(`task ${name} is registered twice`);
  }
  const params = options.params ?? parameterNames(fn);
  const autoretry = (options.autoretryFor ?? []).map(errorMatcher('autoretryFor'));
  const dont = (options.dontAutoretryFor ?? []).map(errorMatcher('dontAutoretryFor'));
  const delay = options.defaultRetryDelay ?? DEFAULT_RETRY_DELAY;
  if (!(delay >= 0)) {
    throw new TypeError(`task ${name}: defaultRetryDelay must be seconds >= 0, got ${delay}`);
  }
  registry.set(name, { fn, options, params, autoretry, dont, delay });
  return Object.assign(fn, {
    s: (...args) => signature(name, args),
    si: (...args) => signature(name, args).set({ immutable: true }),
    delay: (...args) => signature(name, args).delay(),
    applyAsync: (args = [], kwargs = {}, opts = {}) =>
      signature(name, args, kwargs).applyAsync([], {}, opts),
  });
}

/** A predicate for an error class or an error name. */
function errorMatcher(option) {
  return (entry) => {
    if (typeof entry === 'function') return (e) => e instanceof entry;
    if (typeof entry === 'string') return (e) => e?.name === entry;
    throw new TypeError(`${option} takes error classes or names, got ${entry}`);
  };
}

/**
 * The names of `fn`'s parameters, in order, as its source declares them; none that are
 * destructured or rest parameters (those bind by position only). Null if the source cannot
 * be read as a parameter list.
 */
export function parameterNames(fn) {
  const source = Function.prototype.toString.call(fn);
  const open = source.indexOf('(');
  const arrow = source.indexOf('=>');
  // `x => ...`: one parameter, no parentheses.
  if (arrow >= 0 && (open < 0 || open > arrow)) {
    const single = source.slice(0, arrow).replace(/^async\s+/, '').trim();
    return /^[A-Za-z_$][\w$]*$/.test(single) ? [single] : null;
  }
  if (open < 0) return null;
  const names = [];
  let depth = 0;
  let current = '';
  let quote = null;
  for (let i = open + 1; i < source.length; i++) {
    const c = source[i];
    if (quote) {
      if (c === '\\') i++;
      else if (c === quote) quote = null;
      current += c;
      continue;
    }
    if (c === '"' || c === "'" || c === '`') quote = c;
    else if ('([{'.includes(c)) depth++;
    else if (')]}'.includes(c)) {
      if (depth === 0) {
        names.push(current);
        return names.map(paramName).filter((n) => n !== undefined);
      }
      depth--;
    } else if (c === ',' && depth === 0) {
      names.push(current);
      current = '';
      continue;
    }
    current += c;
  }
  return null;
}

/** The name a parameter declaration binds (`y = 2` -> `y`); undefined for `...rest` or a
 * destructuring pattern, and for the empty declaration of `()`. */
function paramName(declaration) {
  const text = declaration.replace(/\/\*[\s\S]*?\*\//g, '').replace(/\/\/.*$/gm, '').trim();
  const name = text.split('=')[0].trim();
  return /^[A-Za-z_$][\w$]*$/.test(name) ? name : undefined;
}

/** The arguments in parameter order, or a TypeError saying what does not fit. */
function bind(name, params, args, kwargs) {
  const keys = Object.keys(kwargs);
  if (!params) {
    if (keys.length) {
      throw new TypeError(`${name}() cannot take keyword arguments: its parameters cannot be ` +
        'read (declare them with the params option)');
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

function context(record, registered, args, kwargs) {
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
    /**
     * Asks for another try (throws; `throw this.retry(...)` reads as Celery code does): after
     * `countdown` seconds, or at `eta` (a Date), or after the task's `defaultRetryDelay`
     * (180 s unless the task sets it), as Celery does. Other options are refused.
     */
    retry({ exc, countdown, eta, ...rest } = {}) {
      const refused = Object.keys(rest);
      if (refused.length) {
        throw new TypeError(`taskhost: retry() does not take ${refused.sort().join(', ')}`);
      }
      if (countdown !== undefined && eta !== undefined) {
        throw new TypeError('taskhost: give retry() a countdown or an eta, not both');
      }
      if (eta !== undefined) {
        if (!(eta instanceof Date)) throw new TypeError(`eta must be a Date, got ${eta}`);
        countdown = Math.max(0, (eta.getTime() - Date.now()) / 1000);
      }
      countdown ??= registered.delay;
      if (!(countdown >= 0)) {
        throw new RangeError(`countdown must be a number of seconds >= 0, got ${countdown}`);
      }
      throw new Retry(exc, countdown);
    },
    /** Publishes progress, as Celery's update_state; only the running task's own. */
    updateState(state = 'PROGRESS', meta = null, { taskId } = {}) {
      if (taskId !== undefined && taskId !== request.id) {
        throw new TypeError(`taskhost: updateState() publishes the running task's own state ` +
          `(${request.id}), not another task's (${taskId})`);
      }
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

function retryFailure(exc, countdown) {
  return { tag: 'retry', val: { countdown, reason: error(exc ?? new Retry(exc, countdown)) } };
}

function failure(registered, e) {
  let outcome;
  let thrown = e;
  if (e instanceof Retry) {
    outcome = retryFailure(e.exc, e.countdown);
  } else if (e instanceof Reject) {
    outcome = { tag: 'reject', val: e.message };
  } else if (registered.autoretry.some((m) => m(e)) && !registered.dont.some((m) => m(e))) {
    // As Celery's autoretry: the task's backoff with retryBackoff, else its delay.
    const countdown = registered.options.retryBackoff ? undefined : registered.delay;
    thrown = new Retry(e, countdown);
    outcome = retryFailure(e, countdown);
  } else {
    outcome = { tag: 'error', val: error(e) };
  }
  // What the task threw, for taskhost-testing.js (the host reads `tag` and `val` only).
  Object.defineProperty(outcome, 'cause', { value: thrown });
  return outcome;
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
    // Matched here (classes and their subclasses), not by the host's exact names.
    autoretryFor: undefined,
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
      const bound = bind(short, registered.params, args, kwargs);
      const self = context(record, registered, args, kwargs);
      const result = await registered.fn.apply(self, bound);
      return JSON.stringify(result === undefined ? null : result);
    } catch (e) {
      throw failure(registered, e);
    }
  },
};

// Sending tasks: Celery's canvas.

/** What was sent: its id. Waiting for it inside a task is refused, as Celery refuses it. */
class SentResult {
  constructor(id) {
    this.id = id;
  }

  get() {
    throw new RuntimeError('Never call result.get() within a task! (link a callback or use a ' +
      'chord instead)');
  }

  toString() {
    return this.id;
  }
}

/** A task with its arguments and options (Celery's signature, in Celery's own shape). */
export class Signature {
  constructor(fields) {
    this.fields = {
      task: fields.task,
      args: [...(fields.args ?? [])],
      kwargs: { ...(fields.kwargs ?? {}) },
      options: { ...(fields.options ?? {}) },
      subtask_type: fields.subtask_type ?? null,
      immutable: Boolean(fields.immutable),
    };
  }

  /** Sets options (`queue`, `countdown`, `priority`, ...; `immutable`); returns it. */
  set({ immutable, ...options } = {}) {
    if (immutable !== undefined) this.fields.immutable = Boolean(immutable);
    Object.assign(this.fields.options, options);
    return this;
  }

  /** Calls `callback` with this task's result when it succeeds; returns `callback`. */
  link(callback) {
    (this.fields.options.link ??= []).push(callback.toJSON());
    return callback;
  }

  /** Calls `errback` with this task's id when it fails; returns `errback`. */
  linkError(errback) {
    (this.fields.options.link_error ??= []).push(errback.toJSON());
    return errback;
  }

  /** A copy with `args` first and `kwargs` merged in (not an immutable one's), and `options`. */
  clone(args = [], kwargs = {}, options = {}) {
    const copy = new this.constructor(JSON.parse(JSON.stringify(this.fields)));
    copy.prepend(args, kwargs);
    Object.assign(copy.fields.options, options);
    return copy;
  }

  prepend(args, kwargs) {
    if (this.fields.immutable) return;
    this.fields.args = [...args, ...this.fields.args];
    Object.assign(this.fields.kwargs, kwargs);
  }

  /** Sends it; it goes out when the running task settles. Returns `{ id }`. */
  applyAsync(args = [], kwargs = {}, options = {}) {
    const sent = this.clone(args, kwargs, options);
    try {
      return new SentResult(host.send(JSON.stringify(sent.toJSON())));
    } catch (e) {
      throw new Error(`cannot send ${this.fields.task}: ${e.payload ?? e.message}`);
    }
  }

  /** `applyAsync(args)`. */
  delay(...args) {
    return this.applyAsync(args);
  }

  /** A chain of this and `next`. */
  pipe(next) {
    return chain(this, next);
  }

  toJSON() {
    return this.fields;
  }
}

/** A signature of the task `name`, or of a signature object a producer sent. */
export function signature(name, args = [], kwargs = {}, options = {}) {
  if (typeof name === 'object' && name !== null) {
    const fields = name instanceof Signature ? name.toJSON() : name;
    const kind = { chain: Chain, group: Group, chord: Chord }[fields.subtask_type] ?? Signature;
    return new kind(fields);
  }
  if (typeof name !== 'string' || !name) throw new TypeError(`a signature names a task`);
  return new Signature({ task: name, args, kwargs, options });
}

function sigs(tasks) {
  const list = tasks.length === 1 && Array.isArray(tasks[0]) ? tasks[0] : tasks;
  return list.map((t) => signature(t).toJSON());
}

class Chain extends Signature {
  prepend(args, kwargs) {
    const steps = this.fields.kwargs.tasks;
    if (steps.length) {
      const first = signature(steps[0]);
      first.prepend(args, kwargs);
      steps[0] = first.toJSON();
    }
  }

  pipe(next) {
    return chain(...this.fields.kwargs.tasks, next);
  }
}

class Group extends Signature {
  prepend(args, kwargs) {
    this.fields.kwargs.tasks = this.fields.kwargs.tasks.map((t) => {
      const part = signature(t);
      part.prepend(args, kwargs);
      return part.toJSON();
    });
  }
}

class Chord extends Signature {
  prepend(args, kwargs) {
    this.fields.kwargs.header = this.fields.kwargs.header.map((t) => {
      const part = signature(t);
      part.prepend(args, kwargs);
      return part.toJSON();
    });
  }
}

/** Runs each task after the one before, passing its result on. */
export function chain(...tasks) {
  return new Chain({ task: 'celery.chain', kwargs: { tasks: sigs(tasks) }, subtask_type: 'chain' });
}

/** Runs the tasks in parallel; their results are read together in order. */
export function group(...tasks) {
  return new Group({ task: 'celery.group', kwargs: { tasks: sigs(tasks) }, subtask_type: 'group' });
}

/** Runs `header` in parallel, then `body` once with the list of their results. */
export function chord(header, body) {
  if (!body) throw new TypeError('a chord needs a body: chord(header, body)');
  return new Chord({
    task: 'celery.chord',
    kwargs: { header: sigs([header]), body: signature(body).toJSON(), kwargs: {} },
    subtask_type: 'chord',
  });
}

/** Sends a task, as Celery's send_task; it goes out when this task settles. Returns its id. */
export function sendTask(name, args = [], kwargs = {}, options = {}) {
  return signature(name, args, kwargs).applyAsync([], {}, options).id;
}

// HTTP: the standard fetch, over wasi:http, so a denied origin is told apart from a failed
// connection.

const encoder = new TextEncoder();
// The most one write may hand the host (wasi:io's blocking-write-and-flush limit).
const CHUNK = 4096;

function dispose(resource) {
  resource[Symbol.dispose]?.();
}

function denial(code, url) {
  const tag = code?.tag ?? 'unknown';
  if (tag === 'HTTP-request-denied') {
    return new CapabilityDenied(`${url}: this plugin is not allowed to reach that origin`);
  }
  return new ConnectionError(`${url}: ${tag}`);
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

/** One exchange over wasi:http: (status, [name, value] headers, body bytes). */
function exchange(method, url, headers, payload) {
  const parsed = new URL(url);
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new TypeError(`not an http(s) URL: ${url}`);
  }
  const fields = headers.map(([k, v]) => [k.toLowerCase(), encoder.encode(String(v))]);
  if (payload && !fields.some(([k]) => k === 'content-length')) {
    fields.push(['content-length', encoder.encode(String(payload.length))]);
  }
  const req = new OutgoingRequest(Fields.fromList(fields));
  const known = ['get', 'head', 'post', 'put', 'delete', 'connect', 'options', 'trace', 'patch'];
  const lower = method.toLowerCase();
  req.setMethod(known.includes(lower) ? { tag: lower } : { tag: 'other', val: method });
  req.setScheme({ tag: parsed.protocol === 'https:' ? 'HTTPS' : 'HTTP' });
  req.setAuthority(parsed.host);
  req.setPathWithQuery(parsed.pathname + parsed.search);
  // The body is taken before the request goes, and written after: the host reads it as it
  // is written.
  const outgoing = payload ? req.body() : undefined;
  let future;
  try {
    future = handle(req, undefined);
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
  const answerHeaders = answerFields.entries().map(([k, v]) => [k, new TextDecoder().decode(v)]);
  dispose(answerFields);
  const status = response.status();
  const body = readAll(response);
  dispose(response);
  return { status, headers: answerHeaders, body };
}

/**
 * The Fetch API's `fetch`, to the origins the operator granted: resolves to a standard
 * `Response`; rejects with `CapabilityDenied` for an origin not granted and `ConnectionError`
 * for a failed connection (both TypeErrors, as fetch's network errors are). The host bounds
 * the connection and each wait for the answer.
 */
export async function fetch(input, init = {}) {
  const request = new Request(input, init);
  const bodyless = request.method === 'GET' || request.method === 'HEAD';
  const payload = bodyless ? undefined : new Uint8Array(await request.arrayBuffer());
  const answer = exchange(request.method, request.url, [...request.headers], payload);
  const nullBody = [101, 204, 205, 304].includes(answer.status) || request.method === 'HEAD';
  return new Response(nullBody ? null : answer.body, {
    status: answer.status,
    headers: answer.headers,
  });
}

// `await fetch(url)` in a task is this one: a denied origin then says so.
globalThis.fetch = fetch;

// Spans of the plugin's own, for the worker's trace (wasi:otel/tracing 0.2.0-rc.2).

/** The ids of the spans open now, innermost last: a new span's parent. */
const openSpans = [];

function otelNow() {
  const ms = Date.now();
  return { seconds: BigInt(Math.floor(ms / 1000)), nanoseconds: (ms % 1000) * 1e6 };
}

function spanId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  if (bytes.every((b) => b === 0)) bytes[7] = 1;
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function attributeValue(value) {
  try {
    return JSON.stringify(value) ?? JSON.stringify(String(value));
  } catch {
    return JSON.stringify(String(value));
  }
}

/**
 * A span of the plugin's own (see `span`). Not recording (every method does nothing) when the
 * task is not traced.
 */
export class Span {
  constructor(name) {
    this.context = null;
    const outer = otel.outerSpanContext();
    if (!outer.traceFlags.sampled || /^0*$/.test(outer.traceId)) return;
    this.parent = openSpans.length ? openSpans[openSpans.length - 1] : outer.spanId;
    this.context = { ...outer, spanId: spanId(), isRemote: false };
    this.name = String(name);
    this.attributes = new Map();
    this.events = [];
    this.error = null;
    otel.onStart(this.context);
    openSpans.push(this.context.spanId);
    this.start = otelNow();
  }

  /** Whether what is set on this span goes anywhere (the task is traced and sampled). */
  get isRecording() {
    return this.context !== null;
  }

  /** Sets an attribute: text, a number, a boolean (anything else as its JSON). */
  setAttribute(key, value) {
    if (this.context) this.attributes.set(String(key), attributeValue(value));
    return this;
  }

  /** Records that something happened now. */
  addEvent(name, attributes = {}) {
    if (this.context) {
      const pairs = Object.entries(attributes)
        .map(([key, value]) => ({ key, value: attributeValue(value) }));
      this.events.push({ name: String(name), time: otelNow(), attributes: pairs });
    }
    return this;
  }

  /** Records `error` as OpenTelemetry's `exception` event and marks the span failed. */
  recordException(error) {
    this.addEvent('exception', {
      'exception.type': error?.name ?? 'Error',
      'exception.message': error?.message ?? String(error),
      'exception.stacktrace': error?.stack ?? '',
    });
    if (this.context) this.error = `${error?.name ?? 'Error'}: ${error?.message ?? error}`;
    return this;
  }

  /** Ends the span (`span` does). */
  end() {
    if (!this.context) return;
    const context = this.context;
    this.context = null;
    const at = openSpans.lastIndexOf(context.spanId);
    if (at >= 0) openSpans.splice(at, 1);
    otel.onEnd({
      spanContext: context,
      parentSpanId: this.parent,
      spanKind: 'internal',
      name: this.name,
      startTime: this.start,
      endTime: otelNow(),
      attributes: [...this.attributes].map(([key, value]) => ({ key, value })),
      events: this.events,
      links: [],
      status: this.error === null ? { tag: 'unset' } : { tag: 'error', val: this.error },
      instrumentationScope: {
        name: 'taskhost-sdk-js', version: undefined, schemaUrl: undefined, attributes: [],
      },
      droppedAttributes: 0,
      droppedEvents: 0,
      droppedLinks: 0,
    });
  }
}

/**
 * Runs `fn(span)` in a span named `name`, nested under the span open around it (the task's
 * own for the outermost), and returns what `fn` returns. The span ends when `fn` returns, or
 * when the promise it returns settles; what `fn` throws (or rejects with) is recorded on the
 * span, which is marked failed, and goes on:
 *
 *     const letters = span('count letters', (s) => {
 *       s.setAttribute('words', words.length);
 *       return words.reduce((n, w) => n + w.length, 0);
 *     });
 */
export function span(name, fn) {
  const s = new Span(name);
  let result;
  try {
    result = fn(s);
  } catch (error) {
    s.recordException(error);
    s.end();
    throw error;
  }
  if (result && typeof result.then === 'function') {
    return result.then(
      (value) => { s.end(); return value; },
      (error) => { s.recordException(error); s.end(); throw error; },
    );
  }
  s.end();
  return result;
}
