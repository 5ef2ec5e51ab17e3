// Pure text helpers: graphemes and their cell widths, whole characters,
// UTF-8 sizes, and sanitising text from the server. No DOM.

const segmenter = (typeof Intl === 'object' && typeof Intl.Segmenter === 'function')
  ? new Intl.Segmenter(undefined, { granularity: 'grapheme' })
  : null;

// Some engines segment a long string in quadratic time (node 20's takes
// a minute for 200 000 characters), so long text is segmented in pieces of
// about this many UTF-16 units.
const SEGMENT_PIECE = 1024;

// Between two ASCII characters there is always a grapheme boundary, except
// inside CR LF (UAX #29: no ASCII character extends, joins or prepends).
function boundaryAt(text: string, i: number): boolean {
  const a = text.charCodeAt(i - 1);
  const b = text.charCodeAt(i);
  return a < 0x80 && b < 0x80 && !(a === 0x0d && b === 0x0a);
}

/** `text` as user-perceived characters (an emoji with modifiers is one). */
export function graphemes(text: string): string[] {
  if (!segmenter) return Array.from(text);
  const out: string[] = [];
  let start = 0;
  while (start < text.length) {
    let end = Math.min(start + SEGMENT_PIECE, text.length);
    while (end < text.length && !boundaryAt(text, end)) end += 1;
    // A loop, not push(...): a paste can hold a million graphemes.
    for (const s of segmenter.segment(text.slice(start, end))) out.push(s.segment);
    start = end;
  }
  return out;
}

// East Asian wide / fullwidth ranges and the common emoji blocks take two
// terminal cells; the line editor needs the width to move the cursor back.
const WIDE = /^(?:[\u1100-\u115f\u2e80-\u303e\u3041-\u33ff\u3400-\u4dbf\u4e00-\u9fff\ua000-\ua4cf\uac00-\ud7a3\uf900-\ufaff\ufe30-\ufe4f\uff00-\uff60\uffe0-\uffe6]|[\u{1f300}-\u{1f64f}\u{1f900}-\u{1f9ff}\u{20000}-\u{3fffd}])/u;

/** Terminal cells one grapheme takes: 1 or 2. */
export function width(g: string): number {
  return WIDE.test(g) ? 2 : 1;
}

/** Terminal cells a run of graphemes takes. */
export function cells(gs: readonly string[]): number {
  let n = 0;
  for (const g of gs) n += width(g);
  return n;
}

// A lone UTF-16 surrogate (half of an emoji) cannot be encoded as UTF-8:
// JSON.stringify writes it as an escape that strict parsers refuse, and the
// command would never get an answer naming it. Every string sent has them
// replaced with U+FFFD.
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

export function wellFormed(text: string): string {
  const s = text as string & { toWellFormed?: () => string };
  return typeof s.toWellFormed === 'function' ? s.toWellFormed() : text.replace(LONE_SURROGATE, '\ufffd');
}

export function isHighSurrogate(code: number): boolean {
  return code >= 0xd800 && code <= 0xdbff;
}

/**
 * Input as whole characters. Some input methods deliver a character outside
 * the BMP as two events, one per surrogate; the first half waits for the
 * second, and a half that stays alone becomes U+FFFD.
 */
export class WholeCharacters {
  private highSurrogate = '';

  take(data: string): string {
    if (this.highSurrogate) {
      data = this.highSurrogate + data;
      this.highSurrogate = '';
    }
    if (data && isHighSurrogate(data.charCodeAt(data.length - 1))) {
      this.highSurrogate = data.slice(-1);
      data = data.slice(0, -1);
    }
    return wellFormed(data);
  }

  /** Forget a waiting half (the mode changed under it). */
  reset(): void {
    this.highSurrogate = '';
  }
}

/** Length of `text` in UTF-8, without building the bytes (it can be megabytes). */
export function utf8Length(text: string): number {
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (isHighSurrogate(c) && i + 1 < text.length &&
      (text.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      n += 4;
      i += 1;
    } else n += 3;
  }
  return n;
}

/** 1048576 -> "1 048 576": big numbers the user has to compare at a glance. */
export function groupDigits(n: number): string {
  return String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ' ');
}

/**
 * Text that came from the server (messages, agent names) must not be able
 * to inject terminal control sequences: control characters go, newlines
 * become CRLF.
 */
export function clean(text: unknown): string {
  return String(text == null ? '' : text)
    .replace(/\r?\n/g, '\n')
    .replace(/[\x00-\x09\x0b-\x1f\x7f-\x9f]/g, '')
    .replace(/\n/g, '\r\n');
}

const ESCAPES: Record<string, string> = { '\n': '\\n', '\r': '\\r', '\t': '\\t' };

/**
 * `text` with every control, format (bidi overrides, zero-width) and line
 * separator character shown as an escape (\n, \u202E): a command that
 * contains one reads as what it is, not as what it pretends to be. For
 * untrusted text shown on a page (the audit log, a recording's title).
 */
export function visible(text: string): string {
  return text.replace(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu, (c) =>
    ESCAPES[c] ?? '\\u' + c.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0'));
}

/** 850 -> "850 ms", 1500 -> "1.5 s", 75000 -> "1 min 15 s"; '' when not a number. */
export function formatDuration(ms: unknown): string {
  if (typeof ms !== 'number' || !Number.isFinite(ms)) return '';
  if (ms < 1000) return Math.round(ms) + ' ms';
  if (ms < 60000) return (ms / 1000).toFixed(1) + ' s';
  const min = Math.floor(ms / 60000);
  const sec = Math.round((ms % 60000) / 1000);
  return min + ' min ' + sec + ' s';
}
