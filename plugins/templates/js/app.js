// {{name}}: a taskhost plugin in JavaScript.
//
// Build it with `taskhost build` (in this directory), try a task with
// `taskhost exec {{name}}.wasm {{name}}.add --args '[2, 3]'`, and drop {{name}}.wasm into a
// worker's plugin directory. Each task below is a Celery task: producers call it with
// `app.send_task("{{name}}.add", (2, 3))`. taskhost.js is the SDK; `taskhost build` uses the
// one the building host carries.

import { ConnectionError, ValueError, log, setVersion, task } from './taskhost.js';

export { handler } from './taskhost.js';

setVersion('0.1.0');

task('{{name}}.add', function (x, y) {
  return x + y;
});

// Fails: `.get()` raises ValueError(message).
task('{{name}}.fail', function (message) {
  throw new ValueError(message);
});

// Reports its progress (state PROGRESS, as Celery's update_state), then returns `steps`.
task('{{name}}.progress', function (steps) {
  for (let n = 1; n <= steps; n++) {
    this.updateState('PROGRESS', { current: n, total: steps });
  }
  log.info(`counted to ${steps}`);
  return steps;
});

// Asks to be retried until its `tries`-th try, then returns how many retries it took.
task('{{name}}.flaky', { maxRetries: 5 }, function (tries) {
  if (this.request.retries + 1 < tries) {
    this.retry({ exc: new ConnectionError('not yet'), countdown: 0.1 });
  }
  return this.request.retries;
});

// GETs `url` (an origin the operator granted with `allow_http`) and returns its JSON.
task('{{name}}.fetch', async function (url) {
  const answer = await fetch(url);
  if (!answer.ok) throw new ValueError(`${url} answered ${answer.status}`);
  return answer.json();
});
