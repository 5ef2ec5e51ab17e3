// File transfers between the page and an agent's host: uploads (files
// chosen in the upload panel, or dropped on the terminal) with a progress
// bar and a cancel button each, and downloads of a path typed in the
// download panel, which the browser saves among its downloads.
//
// Both go through the REST endpoint /api/v1/files. The server decides who
// may (viewers may not) and where a relative path starts: in the current
// directory of the shell whose session the page names, else in the home
// directory of the agent's user. The page names the session of the shell
// in front when this tab writes to one, so that "." is where `pwd` says.
//
// Uploads use XMLHttpRequest, not fetch: only it reports the progress of a
// request's body. Built with DOM calls, like the other panels, so the
// page's CSP stays strict and no file name can be read as markup.

import { sitePath } from './site';
import { groupDigits } from './text';

/** Where transfers go: the agent and, when a shell is in front, its session. */
export interface FileTarget {
  /** The agent ('' lets the server choose: the user reaches only one). */
  agent: string;
  /** The shell session whose current directory relative paths start in; null: the home directory. */
  session: string | null;
}

/** What the server says it wrote. */
export interface Written {
  agent: string;
  path: string;
  size: number;
  sha256: string;
}

/**
 * A query string from its parameters, each value percent-encoded (a space
 * as %20, never '+', so that every reader decodes it the same way). Empty
 * and missing values are left out.
 */
export function query(params: [string, string | null | undefined][]): string {
  const parts: string[] = [];
  for (const [k, v] of params) {
    if (v) parts.push(k + '=' + encodeURIComponent(v));
  }
  return parts.join('&');
}

/**
 * The file path sent for a field: an empty (or blank) one is "." (the
 * directory relative paths start in). Otherwise sent as typed: a name may
 * begin or end with spaces.
 */
function pathOf(path: string): string {
  return path.trim() ? path : '.';
}

/** The address that takes `name` into `path` (a directory), or to `path` itself (a file). */
export function uploadUrl(target: FileTarget, path: string, name: string, overwrite: boolean): string {
  return sitePath('/api/v1/files?' + query([
    ['agent', target.agent],
    ['path', pathOf(path)],
    ['session', target.session],
    ['name', name],
    ['overwrite', overwrite ? 'true' : null],
  ]));
}

/** The address that streams the file at `path` as an attachment. */
export function downloadUrl(target: FileTarget, path: string): string {
  return sitePath('/api/v1/files?' + query([
    ['agent', target.agent],
    ['path', pathOf(path)],
    ['session', target.session],
  ]));
}

/** "/var/log/syslog" -> "syslog": the name a download is offered under ('' for a directory-like path). */
export function baseName(path: string): string {
  const parts = path.split('/');
  const last = parts[parts.length - 1] ?? '';
  return last === '.' || last === '..' ? '' : last;
}

/** What a status means when the answer says nothing readable (a proxy's page, an empty body). */
const STATUS_TEXT: Record<number, string> = {
  400: 'the server refused the request',
  401: 'not logged in any more: reload the page to log in again',
  403: 'not allowed',
  404: 'no such file or directory',
  409: 'the file exists: tick "replace" to overwrite it',
  413: 'the file is larger than the server accepts',
  429: 'too many transfers: try again in a moment',
  503: 'the agent is not connected',
  507: 'the disk is full',
};

/**
 * The reason to show for a failed transfer: the `detail` of the server's
 * problem document, else its `title`, else what the status means. Control
 * characters are removed; the text is shown as text, never as markup.
 */
export function problemText(status: number, body: string): string {
  let said = '';
  try {
    const problem: unknown = JSON.parse(body);
    if (problem && typeof problem === 'object') {
      const { detail, title } = problem as { detail?: unknown; title?: unknown };
      said = typeof detail === 'string' && detail.trim() ? detail
        : typeof title === 'string' && title.trim() ? title : '';
    }
  } catch {
    // not JSON: a proxy's error page, say
  }
  said = said.replace(/[\p{Cc}\p{Cf}]+/gu, ' ').trim().slice(0, 500);
  if (said) return said;
  return STATUS_TEXT[status] ?? (status ? 'failed (HTTP ' + status + ')' : 'no answer from the server');
}

/** The server's account of a written file, or null when the answer is not one. */
export function parseWritten(body: string): Written | null {
  try {
    const v: unknown = JSON.parse(body);
    if (!v || typeof v !== 'object') return null;
    const { agent, path, size, sha256 } = v as Record<string, unknown>;
    if (typeof path !== 'string' || typeof size !== 'number' || typeof sha256 !== 'string') return null;
    return { agent: typeof agent === 'string' ? agent : '', path, size, sha256 };
  } catch {
    return null;
  }
}

/** 1536 -> "1.5 KiB": sizes read at a glance while a transfer runs. */
export function formatBytes(n: number): string {
  if (n < 1024) return n + ' B';
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u += 1;
  }
  return (v < 10 ? v.toFixed(1) : String(Math.round(v))) + ' ' + units[u];
}

/** Uploads sent at once: two keep the link busy without one big file holding up the rest. */
const PARALLEL = 2;

/** Finished uploads kept listed; older ones go first. */
const KEEP_FINISHED = 30;

type UploadState = 'queued' | 'sending' | 'done' | 'failed' | 'cancelled';

interface Upload {
  readonly file: File;
  readonly url: string;
  state: UploadState;
  xhr: XMLHttpRequest | null;
  readonly row: HTMLLIElement;
  readonly bar: HTMLProgressElement;
  readonly progress: HTMLElement;
  readonly result: HTMLElement;
  readonly cancel: HTMLButtonElement;
}

export interface FilesHost {
  /** Where a transfer started now goes (the tab in front). */
  target(): FileTarget;
  /** Who the page is logged in as: viewers transfer nothing. */
  role(): string;
  /** A panel closed: give the keyboard back to the terminal. */
  closed(): void;
}

let nextRow = 1;

function element<K extends keyof HTMLElementTagNameMap>(tag: K, className = '', text = ''): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text) e.textContent = text;
  return e;
}

function panel(id: string, label: string): HTMLElement {
  const p = element('section', 'help-panel files-panel');
  p.id = id;
  p.hidden = true;
  p.setAttribute('aria-label', label);
  p.appendChild(element('h2', '', label));
  return p;
}

function toggleButton(id: string, text: string, title: string, controls: string): HTMLButtonElement {
  const b = element('button', 'mode', text);
  b.type = 'button';
  b.id = id;
  b.title = title;
  b.setAttribute('aria-expanded', 'false');
  b.setAttribute('aria-controls', controls);
  return b;
}

/** A labelled text field for a path on the host. */
function pathField(id: string, label: string): { box: HTMLElement; input: HTMLInputElement; hint: HTMLElement } {
  const box = element('div', 'files-field');
  const lab = element('label', '', label);
  lab.htmlFor = id;
  const input = element('input');
  input.type = 'text';
  input.id = id;
  input.autocomplete = 'off';
  input.spellcheck = false;
  input.setAttribute('autocapitalize', 'none');
  const hint = element('p', 'files-hint');
  hint.id = id + '-hint';
  input.setAttribute('aria-describedby', hint.id);
  box.append(lab, input, hint);
  return { box, input, hint };
}

/** The upload and download buttons, their panels, and the drop zone over the terminal. */
export class Files {
  readonly uploadButton: HTMLButtonElement;
  readonly downloadButton: HTMLButtonElement;
  private readonly group: HTMLElement;
  private readonly uploadPanel: HTMLElement;
  private readonly downloadPanel: HTMLElement;
  private readonly fileInput: HTMLInputElement;
  private readonly uploadPath: HTMLInputElement;
  private readonly uploadHint: HTMLElement;
  private readonly overwrite: HTMLInputElement;
  private readonly choose: HTMLButtonElement;
  private readonly list: HTMLOListElement;
  private readonly clear: HTMLButtonElement;
  private readonly downloadPath: HTMLInputElement;
  private readonly downloadHint: HTMLElement;
  private readonly downloadNote: HTMLElement;
  private readonly dropHint: HTMLElement;
  private readonly uploads: Upload[] = [];
  /** The target the path fields were filled for: a new one fills them again. */
  private filledFor = '';

  constructor(private readonly topbar: HTMLElement, dropZone: HTMLElement, private readonly host: FilesHost) {
    this.uploadButton = toggleButton('upload-toggle', 'upload',
      'Upload files to the host: into the shell\'s current directory, or a path you choose', 'upload');
    this.downloadButton = toggleButton('download-toggle', 'download',
      'Download a file from the host to this browser', 'download');
    const group = element('span', 'file-buttons');
    group.setAttribute('role', 'group');
    group.setAttribute('aria-label', 'Files');
    group.append(this.uploadButton, this.downloadButton);
    this.group = group;

    // ---- upload panel
    this.uploadPanel = panel('upload', 'Upload files');
    const form = element('form', 'files-form');
    const where = pathField('upload-path', 'Into (a directory, or the file\'s new path)');
    this.uploadPath = where.input;
    this.uploadHint = where.hint;
    const check = element('label', 'files-check');
    this.overwrite = element('input');
    this.overwrite.type = 'checkbox';
    this.overwrite.id = 'upload-overwrite';
    check.append(this.overwrite, document.createTextNode(' replace a file that exists'));
    this.fileInput = element('input');
    this.fileInput.type = 'file';
    this.fileInput.id = 'upload-input';
    this.fileInput.multiple = true;
    this.fileInput.hidden = true;
    this.choose = element('button', 'files-action', 'choose files…');
    this.choose.type = 'submit';
    this.choose.id = 'upload-choose';
    const tip = element('p', 'files-hint',
      'Or drop files on the terminal: they go where this panel says while it is open, ' +
      'else into the shell\'s current directory (the home directory without a shell).');
    form.append(where.box, check, this.fileInput, this.choose, tip);
    this.list = element('ol', 'transfers');
    this.list.id = 'transfers';
    this.list.setAttribute('aria-label', 'Uploads');
    this.clear = element('button', 'files-action', 'clear finished');
    this.clear.type = 'button';
    this.clear.id = 'transfers-clear';
    this.clear.hidden = true;
    this.uploadPanel.append(form, this.list, this.clear);

    // ---- download panel
    this.downloadPanel = panel('download', 'Download a file');
    const dform = element('form', 'files-form');
    const from = pathField('download-path', 'Path of the file');
    this.downloadPath = from.input;
    this.downloadHint = from.hint;
    const start = element('button', 'files-action', 'download');
    start.type = 'submit';
    start.id = 'download-start';
    this.downloadNote = element('p', 'files-note');
    this.downloadNote.id = 'download-note';
    this.downloadNote.setAttribute('role', 'status');
    dform.append(from.box, start, this.downloadNote);
    this.downloadPanel.appendChild(dform);

    // ---- drop hint, over the terminal while files are dragged over it
    this.dropHint = element('div', 'drop-hint');
    this.dropHint.id = 'drop-hint';
    this.dropHint.hidden = true;
    this.dropHint.setAttribute('aria-hidden', 'true');
    dropZone.appendChild(this.dropHint);

    this.uploadButton.addEventListener('click', () => this.toggle(this.uploadPanel, this.uploadPanel.hidden));
    this.downloadButton.addEventListener('click', () => this.toggle(this.downloadPanel, this.downloadPanel.hidden));
    for (const p of [this.uploadPanel, this.downloadPanel]) {
      p.addEventListener('keydown', (ev) => {
        if (ev.key === 'Escape') this.toggle(p, false);
      });
    }
    // Enter in the path field, or the button: the browser's file chooser.
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.fileInput.click();
    });
    this.fileInput.addEventListener('change', () => {
      const files = Array.from(this.fileInput.files ?? []);
      this.fileInput.value = ''; // the same file chosen again is a change again
      this.enqueue(files, this.uploadPath.value, this.overwrite.checked);
    });
    this.clear.addEventListener('click', () => {
      for (const u of this.uploads.filter((x) => this.finished(x))) this.forget(u);
      this.renderClear();
      this.choose.focus();
    });
    dform.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.download();
    });
    this.watchDrops(dropZone);

    // At the right end of the tab bar: transfers act on the tab in front,
    // and the top bar keeps to one row.
    const tabbar = document.querySelector('.tabbar');
    if (tabbar) {
      tabbar.append(group);
    } else {
      const after = topbar.querySelector('#sessions-toggle') ?? topbar.querySelector('.modes');
      topbar.insertBefore(group, after ? after.nextSibling : null);
    }
    document.body.append(this.uploadPanel, this.downloadPanel);
    this.applyRole();
  }

  /** Uploads still waiting or on their way (leaving the page would end them). */
  get busy(): boolean {
    return this.uploads.some((u) => u.state === 'queued' || u.state === 'sending');
  }

  private mayTransfer(): boolean {
    return this.host.role() !== 'viewer';
  }

  /**
   * Viewers transfer nothing (the server refuses them anyway; the missing
   * buttons just say so up front). Called again when the server tells the role.
   */
  applyRole(): void {
    const may = this.mayTransfer();
    this.group.hidden = !may;
    this.uploadButton.hidden = !may;
    this.downloadButton.hidden = !may;
    if (!may) {
      if (!this.uploadPanel.hidden) this.toggle(this.uploadPanel, false);
      if (!this.downloadPanel.hidden) this.toggle(this.downloadPanel, false);
    }
  }

  /**
   * The tab in front, its mode or its shell session changed: an open
   * panel says where paths start now, and a path filled for the old
   * target is filled again.
   */
  refresh(): void {
    if (!this.uploadPanel.hidden || !this.downloadPanel.hidden) this.fill();
  }

  /** Opens (or closes) one panel; the other closes, as both sit in the same place. */
  private toggle(which: HTMLElement, open: boolean): void {
    const other = which === this.uploadPanel ? this.downloadPanel : this.uploadPanel;
    if (open) {
      this.show(other, false);
      this.fill();
    }
    this.show(which, open);
    if (open) (which === this.uploadPanel ? this.uploadPath : this.downloadPath).focus();
    else this.host.closed();
  }

  private show(which: HTMLElement, open: boolean): void {
    // Below its button (in the tab bar), however many rows the bars
    // wrapped into: never over the button that closes it.
    if (open) {
      const below = Math.max(
        this.topbar.getBoundingClientRect().bottom,
        this.group.getBoundingClientRect().bottom,
      );
      which.style.top = Math.round(below + 6) + 'px';
    }
    which.hidden = !open;
    const button = which === this.uploadPanel ? this.uploadButton : this.downloadButton;
    button.setAttribute('aria-expanded', String(open));
  }

  /**
   * Says where relative paths start, and fills the path fields for the
   * target in front: "." (the shell's current directory) with a session,
   * empty (the home directory) without. A path typed for the same target
   * stays, unless `reset`.
   */
  private fill(reset = false): void {
    const t = this.host.target();
    const key = t.agent + '\n' + (t.session ?? '');
    const on = t.agent ? 'on ' + t.agent + ': ' : '';
    const start = t.session ? 'the shell\'s current directory' : 'the home directory';
    this.uploadHint.textContent = on + 'a relative path starts in ' + start + '; empty means ' + start + '.';
    this.downloadHint.textContent = on + 'a relative path starts in ' + start + '.';
    this.uploadPath.placeholder = start;
    this.downloadPath.placeholder = t.session ? 'file name, or a path' : 'path, e.g. /var/log/syslog';
    if (key === this.filledFor && !reset) return;
    this.filledFor = key;
    this.uploadPath.value = t.session ? '.' : '';
    this.overwrite.checked = false;
    this.downloadPath.value = '';
    this.downloadNote.textContent = '';
  }

  // ---------------------------------------------------------------- uploads

  /** Lists `files` as uploads into `path` on the target in front, and starts what may start. */
  private enqueue(files: File[], path: string, overwrite: boolean): void {
    if (files.length === 0 || !this.mayTransfer()) return;
    // The target is taken now: a queued upload goes where it was meant to
    // go, whatever tab comes to the front meanwhile.
    const target = this.host.target();
    for (const file of files) {
      const u = this.row(file, uploadUrl(target, path, file.name, overwrite));
      this.uploads.push(u);
      this.list.appendChild(u.row);
    }
    this.trim();
    this.renderClear();
    this.pump();
  }

  /** The list entry of one upload: name, progress bar, cancel, and the outcome. */
  private row(file: File, url: string): Upload {
    const row = element('li', 'transfer');
    row.id = 'transfer-' + nextRow++;
    row.dataset['name'] = file.name;
    row.dataset['state'] = 'queued';
    const name = element('span', 'transfer-name', file.name);
    const bar = element('progress', 'transfer-bar');
    bar.max = Math.max(1, file.size); // a max of 0 is not allowed
    bar.value = 0;
    bar.setAttribute('aria-label', 'Upload of ' + file.name);
    const progress = element('span', 'transfer-progress', 'waiting · ' + formatBytes(file.size));
    const cancel = element('button', 'transfer-cancel', 'cancel');
    cancel.type = 'button';
    cancel.setAttribute('aria-label', 'Cancel the upload of ' + file.name);
    // Said once, when the upload ends; progress ticks are not announced.
    const result = element('span', 'transfer-result');
    result.setAttribute('role', 'status');
    row.append(name, bar, cancel, progress, result);
    const u: Upload = { file, url, state: 'queued', xhr: null, row, bar, progress, result, cancel };
    cancel.addEventListener('click', () => this.cancel(u));
    return u;
  }

  /** Starts queued uploads while fewer than PARALLEL are on their way. */
  private pump(): void {
    let sending = this.uploads.filter((u) => u.state === 'sending').length;
    for (const u of this.uploads) {
      if (sending >= PARALLEL) break;
      if (u.state !== 'queued') continue;
      this.send(u);
      sending += 1;
    }
  }

  private send(u: Upload): void {
    const xhr = new XMLHttpRequest();
    u.xhr = xhr;
    this.setState(u, 'sending');
    u.progress.textContent = '0 % of ' + formatBytes(u.file.size);
    xhr.open('PUT', u.url);
    // The bytes as they are: the server writes them, it does not read them.
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.upload.addEventListener('progress', (ev) => {
      const total = ev.lengthComputable && ev.total > 0 ? ev.total : u.file.size;
      u.bar.max = Math.max(1, total);
      u.bar.value = Math.min(ev.loaded, total);
      u.progress.textContent = ev.loaded >= total
        ? 'sent · waiting for the host'
        : Math.floor((100 * ev.loaded) / Math.max(1, total)) + ' % of ' + formatBytes(total);
    });
    xhr.addEventListener('load', () => {
      if (xhr.status >= 200 && xhr.status < 300) this.succeeded(u, xhr.status, xhr.responseText);
      else this.failed(u, xhr.status, problemText(xhr.status, xhr.responseText));
    });
    xhr.addEventListener('error', () => {
      this.failed(u, 0, 'no answer from the server (the connection was lost, or the file could not be read)');
    });
    xhr.addEventListener('abort', () => this.cancelled(u));
    xhr.addEventListener('loadend', () => {
      u.xhr = null;
      this.pump();
    });
    xhr.send(u.file);
  }

  private succeeded(u: Upload, status: number, body: string): void {
    const w = parseWritten(body);
    u.bar.value = u.bar.max;
    u.row.dataset['status'] = String(status);
    if (w) {
      u.row.dataset['path'] = w.path;
      u.row.dataset['size'] = String(w.size);
      u.row.dataset['sha256'] = w.sha256;
      u.result.title = 'sha256 ' + w.sha256;
    }
    this.end(u, 'done', w
      ? (status === 200 ? 'replaced ' : 'written to ') + w.path + ' · ' + groupDigits(w.size) + ' bytes · sha256 ' + w.sha256.slice(0, 12)
      : 'uploaded');
  }

  private failed(u: Upload, status: number, reason: string): void {
    u.row.dataset['status'] = String(status);
    this.end(u, 'failed', reason);
  }

  private cancelled(u: Upload): void {
    this.end(u, 'cancelled', 'cancelled');
  }

  /** Cancel: a queued upload never starts, a running one is aborted. */
  private cancel(u: Upload): void {
    if (u.state === 'sending' && u.xhr) u.xhr.abort(); // its abort event ends it
    else if (u.state === 'queued') this.cancelled(u);
  }

  private end(u: Upload, state: UploadState, text: string): void {
    if (this.finished(u)) return;
    // The focus must not vanish with the button that had it.
    const refocus = document.activeElement === u.cancel;
    this.setState(u, state);
    u.cancel.hidden = true;
    u.progress.textContent = '';
    u.result.textContent = text;
    if (refocus) this.choose.focus();
    this.trim();
    this.renderClear();
  }

  private setState(u: Upload, state: UploadState): void {
    u.state = state;
    u.row.dataset['state'] = state;
  }

  private finished(u: Upload): boolean {
    return u.state === 'done' || u.state === 'failed' || u.state === 'cancelled';
  }

  private forget(u: Upload): void {
    const at = this.uploads.indexOf(u);
    if (at >= 0) this.uploads.splice(at, 1);
    u.row.remove();
  }

  /** Keeps the list short: the oldest finished uploads go. */
  private trim(): void {
    let extra = this.uploads.filter((u) => this.finished(u)).length - KEEP_FINISHED;
    for (const u of this.uploads.slice()) {
      if (extra <= 0) break;
      if (this.finished(u)) {
        this.forget(u);
        extra -= 1;
      }
    }
  }

  private renderClear(): void {
    this.clear.hidden = !this.uploads.some((u) => this.finished(u));
  }

  /** A failed entry for something dropped that is not a file (a folder). */
  private refuse(name: string, reason: string): void {
    const u = this.row(new File([], name), '');
    this.uploads.push(u);
    this.list.appendChild(u.row);
    this.failed(u, 0, reason);
  }

  // ---------------------------------------------------------------- drag and drop

  /**
   * Files dragged over the terminal show a hint; dropped, they are
   * uploaded where the open upload panel says, else into the shell's
   * current directory (the home directory without a shell). Dropped
   * anywhere else on the page they are ignored: the browser would open
   * them in place of the console.
   */
  private watchDrops(zone: HTMLElement): void {
    const carriesFiles = (ev: DragEvent): boolean =>
      !!ev.dataTransfer && Array.from(ev.dataTransfer.types).includes('Files');
    // dragenter and dragleave come for every element inside the zone: only
    // the last leave means the files left it.
    let depth = 0;
    zone.addEventListener('dragenter', (ev) => {
      if (!carriesFiles(ev)) return;
      ev.preventDefault();
      depth += 1;
      this.hint(true);
    });
    zone.addEventListener('dragover', (ev) => {
      if (!carriesFiles(ev)) return;
      ev.preventDefault();
      ev.dataTransfer!.dropEffect = this.mayTransfer() ? 'copy' : 'none';
    });
    zone.addEventListener('dragleave', (ev) => {
      if (!carriesFiles(ev)) return;
      depth = Math.max(0, depth - 1);
      if (depth === 0) this.hint(false);
    });
    zone.addEventListener('drop', (ev) => {
      if (!carriesFiles(ev)) return;
      ev.preventDefault();
      depth = 0;
      this.hint(false);
      if (this.mayTransfer()) this.dropped(ev.dataTransfer!);
    });
    window.addEventListener('dragend', () => {
      depth = 0;
      this.hint(false);
    });
    window.addEventListener('dragover', (ev) => {
      if (ev.defaultPrevented || !carriesFiles(ev)) return;
      ev.preventDefault();
      ev.dataTransfer!.dropEffect = 'none';
    });
    window.addEventListener('drop', (ev) => {
      if (ev.defaultPrevented || !carriesFiles(ev)) return;
      ev.preventDefault();
      depth = 0;
      this.hint(false);
    });
  }

  private hint(on: boolean): void {
    if (on) {
      const t = this.host.target();
      const into = !this.uploadPanel.hidden && this.uploadPath.value.trim()
        ? this.uploadPath.value.trim()
        : t.session ? 'the shell\'s current directory' : 'the home directory';
      this.dropHint.textContent = this.mayTransfer()
        ? 'Drop to upload into ' + into + (t.agent ? ' on ' + t.agent : '')
        : 'Viewers cannot upload files';
    }
    this.dropHint.hidden = !on;
  }

  /** Reads a drop (only possible while its event runs) and uploads its files. */
  private dropped(dt: DataTransfer): void {
    const files: File[] = [];
    const items = Array.from(dt.items ?? []).filter((i) => i.kind === 'file');
    if (items.length === 0) files.push(...Array.from(dt.files));
    for (const item of items) {
      // A folder comes as a File that cannot be read: say so rather than
      // send a request that fails halfway.
      const entry = typeof item.webkitGetAsEntry === 'function' ? item.webkitGetAsEntry() : null;
      const file = item.getAsFile();
      if (entry && entry.isDirectory) this.refuse(entry.name, 'a folder: upload the files in it instead');
      else if (file) files.push(file);
    }
    // An open panel's fields say where; else the panel opens with the
    // defaults (the focus stays where it was: a drop is no keyboard act).
    if (this.uploadPanel.hidden) {
      this.show(this.downloadPanel, false);
      this.fill(true);
      this.show(this.uploadPanel, true);
    }
    this.enqueue(files, this.uploadPath.value, this.overwrite.checked);
  }

  // ---------------------------------------------------------------- downloads

  /**
   * Starts a download through a link with `download`: the browser streams
   * the file into its downloads (and shows there why one failed), and the
   * page never holds the bytes.
   */
  private download(): void {
    const path = this.downloadPath.value;
    if (!path.trim()) {
      this.downloadNote.textContent = 'Type the path of a file first.';
      this.downloadPath.focus();
      return;
    }
    const t = this.host.target();
    const a = element('a');
    a.href = downloadUrl(t, path);
    a.download = baseName(path);
    a.hidden = true;
    document.body.appendChild(a);
    a.click();
    a.remove();
    this.downloadNote.textContent = 'Asked for ' + path + (t.agent ? ' on ' + t.agent : '') +
      ': the browser\'s downloads show it, or why it failed.';
  }
}
