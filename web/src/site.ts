// Where the console lives under its host: `conch serve --base-path /conch`
// (or a public URL with a path) puts every page, asset, socket and API
// route under that prefix, and the page says so in `data-base`. Every URL
// the page makes goes through `sitePath`, so nothing breaks behind a
// reverse proxy that serves conch under a sub-path.

/** The site's base path: "" for the root, else "/conch" (no trailing slash). */
export function basePath(): string {
  const base = typeof document !== 'undefined' ? document.body?.dataset['base'] ?? '' : '';
  return base.replace(/\/+$/, '');
}

/** `path` (absolute, from the site's root) as the browser must ask for it. */
export function sitePath(path: string): string {
  return basePath() + path;
}

/** The REST address of one shell session. */
export function sessionUrl(agent: string, session: string): string {
  return sitePath('/api/v1/sessions/' + encodeURIComponent(agent) + '/' + encodeURIComponent(session));
}

/**
 * The login page, sent back to `next` (a path from the site's root, as the
 * server's login takes it) once logged in again.
 */
export function loginUrl(next: string): string {
  return sitePath('/login?next=' + encodeURIComponent(next));
}

/** A recording's id: 32 hex digits (as the server checks). Anything else is never put in an address. */
export function isRecordingId(id: unknown): id is string {
  return typeof id === 'string' && /^[0-9a-f]{32}$/i.test(id);
}

/** A recording's asciicast file; with `download`, offered as an attachment. */
export function recordingUrl(id: string, download = false): string {
  return sitePath('/api/v1/recordings/' + encodeURIComponent(id) + (download ? '?download=1' : ''));
}

/** The page that plays a recording back. */
export function replayUrl(id: string): string {
  return sitePath('/recordings/' + encodeURIComponent(id));
}
