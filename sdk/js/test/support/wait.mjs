// Waiting for events without sleeping: each helper resolves on the event
// itself and fails after a generous timeout.
export const WAIT_MS = 10_000;

/** The next `event` of `emitter` (an SDK client or subscription) that satisfies `pred`. */
export function once(emitter, event, pred = () => true, ms = WAIT_MS) {
  return new Promise((res, rej) => {
    const timer = setTimeout(() => {
      off();
      rej(new Error(`no ${event} within ${ms} ms`));
    }, ms);
    const off = emitter.on(event, (payload) => {
      if (!pred(payload)) return;
      clearTimeout(timer);
      off();
      res(payload);
    });
  });
}

/** Resolves once `check()` is true, testing it on every `event`. */
export function until(emitter, event, check, ms = WAIT_MS) {
  if (check()) return Promise.resolve();
  return once(emitter, event, () => check(), ms).then(() => undefined);
}
