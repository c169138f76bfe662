// Test plugin: looks for what an earlier task left behind, then leaves its own.
//
// `probe.find_and_leave(secret)` returns what it found of earlier tasks (a module variable, a
// property set on a built-in object, a global, an entry in a module-level Map) and its first
// random draw, then leaves `secret` in each of those places for the next task to find.

import { task } from './taskhost.js';

export { handler } from './taskhost.js';

let left = null;
const kept = new Map();

task('probe.find_and_leave', { params: ['secret'] }, function (secret) {
  const found = {
    module: left,
    builtin: JSON.taskhostProbe ?? null,
    global: globalThis.taskhostProbe ?? null,
    map: [...kept.keys()],
  };
  const draw = Math.random();
  left = secret;
  JSON.taskhostProbe = secret;
  globalThis.taskhostProbe = secret;
  kept.set(secret, new Array(1000).fill(secret));
  return { found, random: draw };
});
