/** A minimal typed event emitter: `on` returns the function that removes the listener. */

type Listener<T> = (payload: T) => void;

export class Emitter<Events extends object> {
  private listeners: { [K in keyof Events]?: Listener<Events[K]>[] } = {};

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void {
    (this.listeners[event] ??= []).push(listener);
    return () => this.off(event, listener);
  }

  off<K extends keyof Events>(event: K, listener: Listener<Events[K]>): void {
    const list = this.listeners[event];
    if (list) this.listeners[event] = list.filter((l) => l !== listener);
  }

  /** Calls every listener; a listener that throws is reported through `onThrow`. */
  protected emit<K extends keyof Events>(event: K, payload: Events[K]): void {
    for (const listener of this.listeners[event] ?? []) {
      try {
        listener(payload);
      } catch (e) {
        this.onThrow(e, String(event));
      }
    }
  }

  /** What to do when a listener throws; by default rethrow asynchronously. */
  protected onThrow(error: unknown, _event: string): void {
    setTimeout(() => {
      throw error;
    }, 0);
  }
}
