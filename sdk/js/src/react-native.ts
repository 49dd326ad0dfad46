/**
 * `@tether/client/react-native`: optional hooks that tie a client to the
 * app's lifecycle and to network changes. Nothing here imports React
 * Native: the app passes its `AppState` and NetInfo (or anything shaped like
 * them), so the core stays free of the dependency.
 *
 * - Background: after `backgroundGraceMs` the connection is closed (to save
 *   battery); subscriptions, positions and queued publications are kept.
 * - Foreground: reconnect at once (no backoff wait) and resume.
 * - Network change (back online, or another network): reconnect at once.
 */

/** The part of a {@link TetherClient} the hooks use. */
export interface Reconnectable {
  readonly state: string;
  connect(): void;
  disconnect(): void;
  reconnectNow(): void;
}

/** Shaped like React Native's `AppState`. */
export interface AppStateLike {
  currentState?: string | null;
  addEventListener(type: 'change', listener: (state: string) => void): { remove(): void } | undefined | void;
}

/** The part of a NetInfo state the hook reads (`@react-native-community/netinfo`). */
export interface NetInfoStateLike {
  isConnected: boolean | null;
  type?: string;
}

/** Shaped like `@react-native-community/netinfo`'s default export. */
export interface NetInfoLike {
  addEventListener(listener: (state: NetInfoStateLike) => void): () => void;
}

export interface AppStateOptions {
  /** How long the app may stay in the background before the connection is closed, ms. Default 30 000. */
  backgroundGraceMs?: number;
}

const ACTIVE = ['connecting', 'connected', 'waiting'];

/**
 * Closes the connection `backgroundGraceMs` after the app goes to the
 * background, and reconnects at once when it comes back. Returns a function
 * that detaches the hook.
 */
export function attachAppState(
  client: Reconnectable,
  appState: AppStateLike,
  options: AppStateOptions = {},
): () => void {
  const graceMs = options.backgroundGraceMs ?? 30_000;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let pausedByUs = false;
  const onChange = (state: string) => {
    if (state === 'background') {
      if (timer === undefined && ACTIVE.includes(client.state))
        timer = setTimeout(() => {
          timer = undefined;
          if (ACTIVE.includes(client.state)) {
            pausedByUs = true;
            client.disconnect();
          }
        }, graceMs);
    } else if (state === 'active') {
      clearTimeout(timer);
      timer = undefined;
      if (pausedByUs) {
        pausedByUs = false;
        if (client.state === 'idle') client.connect();
      } else if (client.state === 'waiting') client.reconnectNow();
    }
  };
  const subscription = appState.addEventListener('change', onChange);
  return () => {
    clearTimeout(timer);
    subscription?.remove();
  };
}

/**
 * Reconnects at once when the network comes back or changes (Wi-Fi to
 * cellular...), instead of waiting for the backoff or the liveness timer.
 * Returns a function that detaches the hook.
 */
export function attachNetInfo(client: Reconnectable, netInfo: NetInfoLike): () => void {
  let last: NetInfoStateLike | undefined;
  return netInfo.addEventListener((state) => {
    const previous = last;
    last = state;
    if (!previous || state.isConnected === false) return;
    const changed = previous.isConnected === false || previous.type !== state.type;
    if (changed && ACTIVE.includes(client.state)) client.reconnectNow();
  });
}

/** Both hooks at once; returns a function that detaches them. */
export function attachReactNative(
  client: Reconnectable,
  deps: { AppState?: AppStateLike; NetInfo?: NetInfoLike } & AppStateOptions,
): () => void {
  const detach = [
    deps.AppState && attachAppState(client, deps.AppState, deps),
    deps.NetInfo && attachNetInfo(client, deps.NetInfo),
  ];
  return () => detach.forEach((d) => d?.());
}
