// "running… Ctrl-C to stop": in command mode, a command that takes a while
// says so next to the connection status, with the key that stops it.
// Shown after a short delay, so quick commands do not make it flicker.

const SHOW_AFTER_MS = 400;

export class Activity {
  readonly element: HTMLElement;
  private timer = 0;

  constructor() {
    const el = document.createElement('span');
    el.id = 'activity';
    el.className = 'activity';
    el.setAttribute('role', 'status');
    el.textContent = 'running… Ctrl-C to stop';
    el.hidden = true;
    this.element = el;
  }

  set(running: boolean): void {
    window.clearTimeout(this.timer);
    this.timer = 0;
    if (running) {
      this.timer = window.setTimeout(() => {
        this.timer = 0;
        this.element.hidden = false;
      }, SHOW_AFTER_MS);
    } else {
      this.element.hidden = true;
    }
  }
}
