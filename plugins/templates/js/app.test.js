// The tasks of {{name}}, run natively with a test double for the host (taskhost-testing.js):
//
//     node --import ./taskhost-testing.js --test

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FakeHost } from './taskhost-testing.js';
import { CapabilityDenied, Retry, ValueError } from './taskhost.js';
import './app.js';

test('add returns the sum, arguments by position or by name', async () => {
  assert.equal(await new FakeHost().run('{{name}}.add', [2, 3]), 5);
  assert.equal(await new FakeHost().run('{{name}}.add', [], { x: 1, y: 2 }), 3);
});

test('fail throws a ValueError', async () => {
  await assert.rejects(new FakeHost().run('{{name}}.fail', ['boom']), ValueError);
});

test('progress reports each step and logs', async () => {
  const host = new FakeHost();
  assert.equal(await host.run('{{name}}.progress', [2]), 2);
  assert.deepEqual(host.progress, [
    ['PROGRESS', { current: 1, total: 2 }],
    ['PROGRESS', { current: 2, total: 2 }],
  ]);
  assert.deepEqual(host.logs, [['info', 'counted to 2']]);
});

test('flaky asks for a retry until its last try', async () => {
  await assert.rejects(new FakeHost().run('{{name}}.flaky', [3]),
    (e) => e instanceof Retry && e.countdown === 0.1);
  assert.equal(await new FakeHost({ retries: 2 }).run('{{name}}.flaky', [3]), 2);
});

test('fetch returns the answer\'s JSON, and a denied origin rejects', async () => {
  const host = new FakeHost();
  host.respond('GET', 'http://api.example/items', { json: { items: [1, 2] } });
  assert.deepEqual(await host.run('{{name}}.fetch', ['http://api.example/items']), { items: [1, 2] });
  host.deny('http://api.example');
  await assert.rejects(host.run('{{name}}.fetch', ['http://api.example/items']), CapabilityDenied);
});
