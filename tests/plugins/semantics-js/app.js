// Test plugin: the JavaScript SDK as an author of today writes it, one task per behaviour
// (tests/sdk_semantics.rs sends them from Python Celery). Served as `semjs`.

import {
  CapabilityDenied, ConnectionError, KeyError, ValueError, chain, chord, defineError, signature,
  span, task,
} from './taskhost.js';

export { handler } from './taskhost.js';

const add = task('semjs.add', function (x, y) {
  return x + y;
});

const tsum = task('semjs.tsum', function (numbers) {
  return numbers.reduce((a, b) => a + b, 0);
});

// Parameters read from the function: kwargs bind by name, defaults apply.
task('semjs.greet', function (name, greeting = 'Hello') {
  return `${greeting}, ${name}!`;
});

task('semjs.later', async function (ms) {
  await new Promise((resolve) => setTimeout(resolve, ms));
  return ms;
});

task('semjs.fetch', async function (url) {
  const answer = await fetch(url);
  return { status: answer.status, body: await answer.json() };
});

task('semjs.fetch_denied', async function (url) {
  try {
    await fetch(url);
    return 'reached';
  } catch (e) {
    return { name: e.name, denied: e instanceof CapabilityDenied, typeError: e instanceof TypeError };
  }
});

task('semjs.key_error', function (key) {
  throw new KeyError(key);
});

const QuotaExceeded = defineError('QuotaExceeded');
task('semjs.custom_error', function () {
  throw new QuotaExceeded('over the quota');
});

task('semjs.autoretry_subclass', { autoretryFor: [TypeError], maxRetries: 1, defaultRetryDelay: 0.1 },
  function () {
    throw new ConnectionError(`try ${this.request.retries}`);
  });

task('semjs.send_chain', function () {
  return add.s(1, 2).pipe(add.s(10)).delay().id;
});

task('semjs.send_chord', function () {
  return chord([0, 1, 2].map((i) => add.s(i, i)), tsum.s()).delay().id;
});

task('semjs.send_signature', function () {
  return signature('semjs.add', [1, 2]).delay().id;
});

// Spans of its own: one around the count, one per word nested in it.
task('semjs.traced', function (words) {
  return span('count letters', (s) => {
    s.setAttribute('words', words.length);
    const letters = words.reduce((n, word) => n + span('measure', (m) => {
      m.setAttribute('word', word);
      return word.length;
    }), 0);
    s.setAttribute('letters', letters);
    return letters;
  });
});

// An error leaving a span is recorded on it, which is marked failed.
task('semjs.traced_failure', async function () {
  await span('doomed', async () => {
    throw new ValueError('inside a span');
  });
});
