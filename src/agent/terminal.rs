//! A session's terminal emulator (the model a redraw is made from), fed so
//! that a flood of plain lines costs only its last screens.
//!
//! `vt100` pays for every line that scrolls: a new row of cells (32 bytes
//! each), the old row trimmed and pushed into the scrollback, the oldest
//! freed. `seq 1 2000000` in a 139-column shell took the agent 2.5 s of CPU
//! for the model alone, more than the browser needed to draw it, and the
//! shell's output waited for it. Yet of a flood only the last screen and
//! the scrollback's capacity survive: a line that scrolls past both leaves
//! nothing behind. So [`Term::feed`] hands the parser every byte except,
//! inside a run of plain lines, the middle of the run, when it is certain
//! the parser would end in the same state without it:
//!
//! - the run holds only printable ASCII, tab, CR and LF, which change
//!   nothing but cells, the cursor and the scrollback (no attribute, mode,
//!   title or character set);
//! - the parser is in its ground state where the skip starts (not inside
//!   an escape sequence or a string, which would have taken the bytes as
//!   parameters or text): [`Syntax`] follows the parser's state machine;
//! - the skip starts and ends just after a CR LF, at column 0 in both the
//!   real stream and the shortened one;
//! - after the skip, the run still holds enough line feeds to push every
//!   row that existed before it off the screen and out of the scrollback
//!   (see [`Term::margin`]), so no cell of the skipped lines, nor of the
//!   rows they would have overwritten, is left;
//! - the primary screen is shown and no scroll region can be set: inside a
//!   region, or below it, line feeds do not scroll every row off.
//!
//! Anything this cannot be sure of is parsed in full. A unit test feeds
//! random mixes of lines, escape sequences and strings both ways and
//! compares the redraws.
//!
//! The lines a flood leaves in the scrollback reach the session's history
//! (src/agent/history.rs) as text. Where the parser would only have
//! printed each on a blank row and scrolled it there, the middle of a
//! stretch of such lines goes to the history without the parser
//! ([`Term::parse_lines`]), since formatting rows back into text would
//! otherwise cost more than the parsing.

use super::history::{History, PARSER_ROWS};

/// The parser's state, as `vte` 0.15 (the state machine inside `vt100`)
/// keeps it: only which state, to know when it is in the ground state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ground,
    Escape,
    EscapeIntermediate,
    CsiEntry,
    CsiParam,
    CsiIntermediate,
    CsiIgnore,
    DcsEntry,
    DcsParam,
    DcsIntermediate,
    DcsPassthrough,
    DcsIgnore,
    OscString,
    SosPmApcString,
}

/// Parameter bytes of a CSI kept to read a scroll region's bounds; a
/// longer one is taken as setting a region.
const CSI_PARAMS: usize = 16;

/// Follows the byte stream the parser is fed: its state, and whether a
/// scroll region may be set.
#[derive(Debug)]
struct Syntax {
    state: State,
    /// The current escape sequence has intermediate bytes.
    esc_intermediate: bool,
    /// The current CSI has intermediate bytes or a private marker (`?`).
    csi_marked: bool,
    csi_params: [u8; CSI_PARAMS],
    csi_len: usize,
    csi_overflow: bool,
    /// A scroll region may be set (on one of the two screens).
    region: bool,
    /// The region may be on the other screen than the one a later
    /// `CSI r` resets: only a reset or a resize clears it then.
    region_sticky: bool,
    /// The first private marker or intermediate byte of the current CSI
    /// (0 if none): `vt100` tells `CSI ? J` from `CSI J` by it alone.
    csi_first: u8,
    /// The current CSI's first parameter as `vte` reads it (saturating),
    /// and whether it has ended.
    csi_first_param: u16,
    csi_first_done: bool,
    /// What the last byte stepped over does to the scrollback.
    erase: Option<Erase>,
}

/// Sequences after which the scrollback is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Erase {
    /// `ESC c` (RIS): both screens and the scrollback start afresh.
    Reset,
    /// `CSI 3 J` or `CSI ? 3 J`: the scrollback of the screen shown is
    /// erased (the alternate screen has none).
    Scrollback,
}

/// C0 controls that the parser executes inside a sequence, leaving its state.
fn executed(byte: u8) -> bool {
    matches!(byte, 0x00..=0x17 | 0x19 | 0x1c..=0x1f)
}

impl Syntax {
    fn new() -> Syntax {
        Syntax {
            state: State::Ground,
            esc_intermediate: false,
            csi_marked: false,
            csi_params: [0; CSI_PARAMS],
            csi_len: 0,
            csi_overflow: false,
            region: false,
            region_sticky: false,
            csi_first: 0,
            csi_first_param: 0,
            csi_first_done: false,
            erase: None,
        }
    }

    /// Follows `bytes` up to the end of the first sequence that erases
    /// the scrollback, and says how far that is; or through all of them.
    fn advance(&mut self, bytes: &[u8], rows: u16) -> Option<(usize, Erase)> {
        let mut i = 0;
        while i < bytes.len() {
            if self.state == State::Ground {
                // Only ESC leaves the ground state.
                match bytes[i..].iter().position(|&b| b == 0x1b) {
                    Some(at) => i += at,
                    None => return None,
                }
            }
            self.step(bytes[i], rows);
            i += 1;
            if let Some(erase) = self.erase.take() {
                return Some((i, erase));
            }
        }
        None
    }

    /// Bytes that leave any state for the ground or escape state.
    fn anywhere(&mut self, byte: u8) {
        match byte {
            0x18 | 0x1a => self.state = State::Ground,
            0x1b => self.escape(),
            _ => {}
        }
    }

    fn escape(&mut self) {
        self.state = State::Escape;
        self.esc_intermediate = false;
    }

    fn csi(&mut self) {
        self.state = State::CsiEntry;
        self.csi_marked = false;
        self.csi_len = 0;
        self.csi_overflow = false;
        self.csi_first = 0;
        self.csi_first_param = 0;
        self.csi_first_done = false;
    }

    fn csi_param(&mut self, byte: u8) {
        if !self.csi_first_done {
            if byte.is_ascii_digit() {
                self.csi_first_param = self
                    .csi_first_param
                    .saturating_mul(10)
                    .saturating_add(u16::from(byte - b'0'));
            } else {
                self.csi_first_done = true;
            }
        }
        if self.csi_len < CSI_PARAMS {
            self.csi_params[self.csi_len] = byte;
            self.csi_len += 1;
        } else {
            self.csi_overflow = true;
        }
    }

    fn step(&mut self, byte: u8, rows: u16) {
        use State::*;
        match self.state {
            Ground => {
                if byte == 0x1b {
                    self.escape();
                }
            }
            Escape => match byte {
                0x18 | 0x1a => self.state = Ground,
                0x20..=0x2f => {
                    self.esc_intermediate = true;
                    self.state = EscapeIntermediate;
                }
                0x50 => self.state = DcsEntry,
                0x58 | 0x5e | 0x5f => self.state = SosPmApcString,
                0x5b => self.csi(),
                0x5d => self.state = OscString,
                0x30..=0x7e => {
                    // RIS resets both screens: no region is left.
                    if byte == b'c' && !self.esc_intermediate {
                        self.region = false;
                        self.region_sticky = false;
                        self.erase = Some(Erase::Reset);
                    }
                    self.state = Ground;
                }
                _ => {}
            },
            EscapeIntermediate => match byte {
                _ if executed(byte) => {}
                0x20..=0x2f | 0x7f => {}
                0x30..=0x7e => self.state = Ground,
                _ => self.anywhere(byte),
            },
            CsiEntry | CsiParam | CsiIntermediate => match byte {
                _ if executed(byte) => {}
                0x20..=0x2f => {
                    self.csi_marked = true;
                    if self.csi_first == 0 {
                        self.csi_first = byte;
                    }
                    self.state = CsiIntermediate;
                }
                0x30..=0x3b if self.state == CsiIntermediate => self.state = CsiIgnore,
                0x30..=0x3b => {
                    self.csi_param(byte);
                    self.state = CsiParam;
                }
                0x3c..=0x3f if self.state == CsiEntry => {
                    self.csi_marked = true;
                    self.csi_first = byte;
                    self.state = CsiParam;
                }
                0x3c..=0x3f => self.state = CsiIgnore,
                0x40..=0x7e => {
                    self.csi_dispatch(byte, rows);
                    self.state = Ground;
                }
                0x7f if self.state != CsiEntry => {}
                _ => self.anywhere(byte),
            },
            CsiIgnore => match byte {
                _ if executed(byte) => {}
                0x20..=0x3f | 0x7f => {}
                0x40..=0x7e => self.state = Ground,
                _ => self.anywhere(byte),
            },
            DcsEntry | DcsParam | DcsIntermediate => match byte {
                _ if executed(byte) => {}
                0x7f => {}
                0x20..=0x2f => self.state = DcsIntermediate,
                0x30..=0x3b if self.state == DcsIntermediate => self.state = DcsIgnore,
                0x30..=0x3b => self.state = DcsParam,
                0x3c..=0x3f if self.state == DcsEntry => self.state = DcsParam,
                0x3c..=0x3f => self.state = DcsIgnore,
                0x40..=0x7e => self.state = DcsPassthrough,
                _ => self.anywhere(byte),
            },
            DcsPassthrough => match byte {
                0x9c => self.state = Ground,
                _ => self.anywhere(byte),
            },
            DcsIgnore | SosPmApcString => self.anywhere(byte),
            OscString => match byte {
                0x07 => self.state = Ground,
                _ => self.anywhere(byte),
            },
        }
    }

    /// A CSI ended with `byte`: follow what it does to scroll regions.
    fn csi_dispatch(&mut self, byte: u8, rows: u16) {
        match byte {
            b'r' => {
                if !self.csi_marked && !self.csi_overflow && self.full_region(rows) {
                    // DECSTBM to the whole screen resets the region of the
                    // screen shown, which is the only one set unless a
                    // screen switch came since.
                    if !self.region_sticky {
                        self.region = false;
                    }
                } else {
                    self.region = true;
                }
            }
            // A mode change (among them the switches between the primary
            // and alternate screens) while a region may be set.
            b'h' | b'l' if self.region => self.region_sticky = true,
            // ED and DECSED 3, as `vt100` dispatches them.
            b'J' if matches!(self.csi_first, 0 | b'?') && self.csi_first_param == 3 => {
                self.erase = Some(Erase::Scrollback);
            }
            _ => {}
        }
    }

    /// Whether the CSI's parameters, as `vt100` reads those of DECSTBM
    /// (0 or absent: the default), select the whole screen.
    fn full_region(&self, rows: u16) -> bool {
        let params = &self.csi_params[..self.csi_len];
        if params.contains(&b':') {
            return false;
        }
        let mut values = params.split(|&b| b == b';').map(|digits| {
            digits.iter().fold(0u32, |n, &d| {
                (n * 10 + u32::from(d - b'0')).min(u32::from(u16::MAX))
            })
        });
        let top = values.next().unwrap_or(0);
        let bottom = values.next().unwrap_or(0);
        top <= 1 && (bottom == 0 || bottom >= u32::from(rows))
    }
}

/// Bytes a plain run may hold: printable ASCII, tab, CR, LF.
fn plain(byte: u8) -> bool {
    matches!(byte, 0x20..=0x7e | b'\t' | b'\r' | b'\n')
}

/// The parser and what is known of the stream it was fed.
pub(crate) struct Term {
    /// Keeps the last [`PARSER_ROWS`] lines of scrollback as rows of
    /// cells, the older ones in its [`History`] as text.
    parser: vt100::Parser<History>,
    /// The primary screen's scrollback capacity, in the parser and its
    /// history together (the screen shown may be the alternate one, which
    /// has none).
    capacity: usize,
    syntax: Syntax,
    /// Bytes left out of floods so far (for tests and curiosity).
    skipped: u64,
    /// Bytes of plain lines handed to the history without the parser.
    bypassed: u64,
}

impl Term {
    pub(crate) fn new(
        rows: std::num::NonZeroU16,
        cols: std::num::NonZeroU16,
        scrollback: usize,
    ) -> Term {
        Term::keeping(rows, cols, scrollback, PARSER_ROWS)
    }

    /// A terminal whose parser keeps at most `parser_rows` of the
    /// scrollback's lines as rows.
    fn keeping(
        rows: std::num::NonZeroU16,
        cols: std::num::NonZeroU16,
        scrollback: usize,
        parser_rows: usize,
    ) -> Term {
        let kept = scrollback.min(parser_rows);
        Term {
            parser: vt100::Parser::new_with_callbacks(
                rows,
                cols,
                kept,
                History::new(scrollback - kept),
            ),
            capacity: scrollback,
            syntax: Syntax::new(),
            skipped: 0,
            bypassed: 0,
        }
    }

    pub(crate) fn screen(&self) -> &vt100::Screen {
        self.parser.screen()
    }

    /// Lines of scrollback, in the parser and its history.
    #[cfg(test)]
    pub(crate) fn scrollback_len(&self) -> usize {
        self.parser.callbacks().len() + self.parser.screen().scrollback_len()
    }

    #[cfg(test)]
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped
    }

    #[cfg(test)]
    pub(crate) fn bypassed(&self) -> u64 {
        self.bypassed
    }

    pub(crate) fn set_size(&mut self, rows: std::num::NonZeroU16, cols: std::num::NonZeroU16) {
        // A resize resets both screens' scroll regions (if the size changes).
        if self.parser.screen().size() != (rows, cols) {
            self.syntax.region = false;
            self.syntax.region_sticky = false;
        }
        // Through the parser, whose callback takes the rows that a smaller
        // screen pushes out of its scrollback.
        self.parser.set_size(rows, cols);
    }

    /// Line feeds that must follow a skip: every row on the screen or in
    /// the scrollback before it is pushed out by `rows + scrollback` of
    /// them (the cursor reaches the bottom in fewer than `rows`, then each
    /// scrolls one row); one more screen and `vt100`'s largest screen
    /// (150 rows) keep its count of rows ever scrolled past the reach of
    /// a resize, so that growing the screen later pulls back the same
    /// (blank) rows. Not of every series of resizes: that count is lower
    /// by the lines left out, and growing the screen, moving the cursor
    /// to the top and shrinking it back, many times over, could use it up
    /// (vt100 offers no way to raise it but scrolling).
    fn margin(&self) -> usize {
        let rows = usize::from(self.parser.screen().size().0.get());
        self.capacity + 2 * rows + 152
    }

    fn parse(&mut self, mut bytes: &[u8]) {
        let rows = self.parser.screen().size().0.get();
        while !bytes.is_empty() {
            let Some((end, erase)) = self.syntax.advance(bytes, rows) else {
                self.parser.process(bytes);
                return;
            };
            // Up to the end of the sequence: its rows pass through the
            // history, and all of it goes with them.
            self.parser.process(&bytes[..end]);
            if erase == Erase::Reset || !self.parser.screen().alternate_screen() {
                self.parser.callbacks_mut().clear();
            }
            bytes = &bytes[end..];
        }
    }

    /// Bytes that take a fresh terminal to this one's state: a reset, the
    /// scrollback as lines (the history's, then the parser's rows), pushed
    /// off the screen, then the screen, the cursor and the input modes.
    /// (While a full-screen program runs, the scrollback is that of the
    /// alternate screen, which has none.)
    pub(crate) fn redraw(&mut self, with_scrollback: bool) -> Vec<u8> {
        let mut out = b"\x1bc".to_vec();
        let alternate = self.parser.screen().alternate_screen();
        let mut lines = 0;
        if with_scrollback && !alternate {
            let history = self.parser.callbacks_mut();
            lines += history.len();
            history.write(&mut out);
        }
        let screen = self.parser.screen_mut();
        let (rows, cols) = screen.size();
        let (rows, cols) = (rows.get(), cols.get());
        screen.set_scrollback(if with_scrollback { usize::MAX } else { 0 });
        let kept = screen.scrollback();
        lines += kept;
        // The parser's rows, a screenful at a time, oldest first.
        let mut offset = kept;
        while offset > 0 {
            screen.set_scrollback(offset);
            let take = offset.min(rows as usize);
            for row in screen.rows_formatted(0, cols).take(take) {
                out.extend_from_slice(b"\x1b[m");
                out.extend_from_slice(row.as_bytes());
                out.extend_from_slice(b"\x1b[m\r\n");
            }
            offset -= take;
        }
        screen.set_scrollback(0);
        if lines > 0 {
            // Scroll what was printed off the screen, into the scrollback
            // (after the last line's attributes were reset).
            out.extend(std::iter::repeat_n(b'\n', usize::from(rows) - 1));
        }
        if alternate {
            out.extend_from_slice(b"\x1b[?1049h");
        }
        out.extend_from_slice(screen.state_formatted().as_bytes());
        out
    }

    /// Feeds `bytes`, leaving out what of a flood of plain lines cannot
    /// change the result (see the module's documentation).
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        let margin = self.margin();
        let mut at = 0;
        let mut search = 0;
        while let Some((from, to)) = skippable(bytes, search, margin) {
            self.parse_lines(&bytes[at..from]);
            if self.plain_ground() {
                self.skipped += (to - from) as u64;
            } else {
                self.parse(&bytes[from..to]);
            }
            at = to;
            search = to;
        }
        self.parse_lines(&bytes[at..]);
    }

    /// Plain bytes here would print text and move the cursor only, every
    /// line feed at the bottom scrolling the whole screen into the
    /// primary screen's scrollback.
    fn plain_ground(&self) -> bool {
        self.syntax.state == State::Ground
            && !self.syntax.region
            && !self.parser.screen().alternate_screen()
    }

    /// Parses `bytes`, but hands the middle of each long stretch of simple
    /// lines (printable ASCII, no wider than the screen, each ending in
    /// CR LF) to the history as its text, without the parser.
    ///
    /// The parser would print each such line on the blank bottom row,
    /// with the default attributes, and scroll it up through the screen
    /// and its own scrollback into the history, formatted as the very
    /// same text: most of a flood's cost with a history. So of a stretch
    /// of them:
    /// - the first lines (the lead: `2 × rows + kept + 152`) are parsed:
    ///   every row there was is pushed out to the history, in order, and
    ///   the parser's rows now hold only the lead's last lines;
    /// - if the cursor is then at the start of the bottom row, in the
    ///   ground state on the primary screen without a region and with
    ///   default attributes, the history takes the lead's lines the parser
    ///   still holds, then the middle lines, as text;
    /// - the parser scrolls a blank row up for each middle line, so that
    ///   its count of rows ever scrolled (which decides what a taller
    ///   screen pulls back) stays what it would have been;
    /// - the last lines (at least `rows + kept`, and the last one that
    ///   prints a character, which `CSI b` repeats) are parsed.
    ///
    /// The history drops the rows the parser hands over meanwhile: the
    /// lead's lines it already took, and the blank rows.
    fn parse_lines(&mut self, bytes: &[u8]) {
        if !self.parser.callbacks().keeps_lines() {
            self.parse(bytes);
            return;
        }
        let (rows, cols) = self.parser.screen().size();
        let (rows, cols) = (usize::from(rows.get()), usize::from(cols.get()));
        let kept = self.parser.screen().scrollback_capacity();
        let lead = 2 * rows + kept + 152;
        let tail = rows + kept;
        // Made here, not kept: a piece of empty lines has a start every
        // two bytes.
        let mut starts = Vec::new();
        let mut at = 0;
        while let Some(end) = simple_lines(bytes, at, cols, lead + tail + 1, &mut starts) {
            self.parse(&bytes[at..starts[0]]);
            self.bypass(bytes, &starts, end, lead, tail);
            at = end;
        }
        self.parse(&bytes[at..]);
    }

    /// One stretch of simple lines (see [`Term::parse_lines`]): the lines
    /// start at `starts` and the last ends at `end`.
    fn bypass(&mut self, bytes: &[u8], starts: &[usize], end: usize, lead: usize, tail: usize) {
        let n = starts.len();
        // A line's text, without its CR LF.
        let line = |i: usize| -> &[u8] {
            let next = starts.get(i + 1).copied().unwrap_or(end);
            &bytes[starts[i]..next - 2]
        };
        let Some(last_printed) = (0..n).rev().find(|&i| !line(i).is_empty()) else {
            self.parse(&bytes[starts[0]..end]);
            return;
        };
        let middle_end = (n - tail).min(last_printed);
        let ready = self.plain_ground() && default_attributes(self.parser.screen());
        if middle_end <= lead || !ready {
            self.parse(&bytes[starts[0]..end]);
            return;
        }
        self.parse(&bytes[starts[0]..starts[lead]]);
        let screen = self.parser.screen();
        let (rows, _) = screen.size();
        // The lead's lines the parser holds: its scrollback, and the
        // screen's rows above the cursor.
        let held = screen.scrollback_len() + usize::from(rows.get()) - 1;
        if screen.cursor_position() != (rows.get() - 1, 0) || held >= lead {
            self.parse(&bytes[starts[lead]..end]);
            return;
        }
        let middle = middle_end - lead;
        let history = self.parser.callbacks_mut();
        for i in lead - held..middle_end {
            history.push(line(i));
        }
        history.drop_next(held + middle);
        // A screenful at a time (`CSI n S`: scroll up, the cursor stays).
        let rows = usize::from(rows.get());
        let mut scrolls = format!("\x1b[{rows}S").repeat(middle / rows);
        if !middle.is_multiple_of(rows) {
            scrolls.push_str(&format!("\x1b[{}S", middle % rows));
        }
        self.parser.process(scrolls.as_bytes());
        self.bypassed += (starts[middle_end] - starts[lead]) as u64;
        self.parse(&bytes[starts[middle_end]..end]);
        // Every row dropped was one the history had taken. Were the parser
        // ever to scroll fewer (which the checks above rule out), the rows
        // after them must not be dropped too.
        let left = self.parser.callbacks().ahead();
        if left > 0 {
            debug_assert_eq!(left, 0);
            tracing::warn!(
                left,
                "a session's history expected more rows from its parser"
            );
            self.parser.callbacks_mut().drop_next(0);
        }
    }
}

/// Whether the attributes text is drawn with are the defaults (so that a
/// row of it formats as the text alone).
fn default_attributes(screen: &vt100::Screen) -> bool {
    static DEFAULT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let one = std::num::NonZeroU16::MIN;
        vt100::Parser::new(one, one, 0)
            .screen()
            .attributes_formatted()
    });
    screen.attributes_formatted() == *DEFAULT
}

/// The next stretch, from `from` on, of at least `need` simple lines:
/// printable ASCII, at most `cols` of it, and CR LF. Their starts are left
/// in `starts`; the offset just after the last one is returned.
fn simple_lines(
    bytes: &[u8],
    from: usize,
    cols: usize,
    need: usize,
    starts: &mut Vec<usize>,
) -> Option<usize> {
    starts.clear();
    let mut at = from;
    while let Some(len) = memchr::memchr(b'\n', &bytes[at..]) {
        let text = &bytes[at..at + len];
        let simple = text.len() <= cols + 1
            && text.last() == Some(&b'\r')
            && text[..len - 1].iter().all(|b| (0x20..=0x7e).contains(b));
        if simple {
            starts.push(at);
        } else if starts.len() >= need {
            return Some(at);
        } else {
            starts.clear();
        }
        at += len + 1;
    }
    (starts.len() >= need).then_some(at)
}

/// The next part of `bytes` from `start` on that could be left out: inside
/// one run of plain bytes, from just after its first CR LF to just after
/// a CR LF that `margin` line feeds of the run still follow.
fn skippable(bytes: &[u8], start: usize, margin: usize) -> Option<(usize, usize)> {
    let mut run_start = start;
    while run_start < bytes.len() {
        let run_end = bytes[run_start..]
            .iter()
            .position(|&b| !plain(b))
            .map_or(bytes.len(), |n| run_start + n);
        let run = &bytes[run_start..run_end];
        // Every line is at least CR LF.
        if run.len() > 2 * (margin + 1)
            && let Some(span) = skippable_in(run, margin)
        {
            return Some((run_start + span.0, run_start + span.1));
        }
        run_start = run_end + 1;
    }
    None
}

fn skippable_in(run: &[u8], margin: usize) -> Option<(usize, usize)> {
    let from = run.windows(2).position(|w| w == b"\r\n")? + 2;
    // The last character printed (which `CSI b` repeats) must come after
    // the skip: a flood that ends in blank lines is parsed in full.
    let last_printed = run.iter().rposition(|&b| (0x20..=0x7e).contains(&b))?;
    // Walk back over `margin` line feeds, then to the nearest CR LF.
    let mut feeds = 0;
    let mut i = run.len();
    while i > from {
        i -= 1;
        if run[i] == b'\n' {
            if feeds >= margin && i > 0 && run[i - 1] == b'\r' {
                let to = i + 1;
                return (to > from && to <= last_printed).then_some((from, to));
            }
            feeds += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u16) -> std::num::NonZeroU16 {
        std::num::NonZeroU16::new(n).unwrap()
    }

    /// What a terminal shows and keeps: the screen with its attributes and
    /// cursor, and every line of scrollback (the history's as it keeps
    /// them, then the parser's rows).
    fn state(term: &mut Term) -> (String, Vec<String>, (u16, u16), bool) {
        let mut history = Vec::new();
        term.parser.callbacks_mut().write(&mut history);
        let mut state = rows_state(&mut term.parser);
        state.1.insert(0, String::from_utf8(history).unwrap());
        state
    }

    /// The screen and the scrollback's rows of a parser.
    fn rows_state<CB: vt100::Callbacks>(
        parser: &mut vt100::Parser<CB>,
    ) -> (String, Vec<String>, (u16, u16), bool) {
        let screen = parser.screen_mut();
        let (_, cols) = screen.size();
        screen.set_scrollback(usize::MAX);
        let mut back = Vec::new();
        let lines = screen.scrollback();
        for offset in (1..=lines).rev() {
            screen.set_scrollback(offset);
            back.push(
                screen
                    .rows_formatted(0, cols.get())
                    .next()
                    .map(|r| format!("{r:?}"))
                    .unwrap(),
            );
        }
        screen.set_scrollback(0);
        let shown = format!(
            "{:?}{:?}",
            screen.contents_formatted(),
            screen.state_formatted()
        );
        (
            shown,
            back,
            screen.cursor_position(),
            screen.alternate_screen(),
        )
    }

    /// A small deterministic generator (xorshift), for repeatable cases.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Output mixing floods of plain lines with what could make skipping
    /// them wrong: escape sequences cut anywhere, strings left open, scroll
    /// regions, screen switches, lines without CR, long lines that wrap.
    fn stream(rng: &mut Rng, rows: u16) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..30 {
            match rng.below(20) {
                0..=9 => {
                    let lines = rng.below(600);
                    let cr = rng.below(4) != 0;
                    for n in 0..lines {
                        let width = rng.below(30) as usize;
                        let text = format!("{n}-{}", "x".repeat(width));
                        out.extend_from_slice(text.as_bytes());
                        out.extend_from_slice(if cr { b"\r\n" } else { b"\n" });
                        if rng.below(50) == 0 {
                            out.push(b'\t');
                        }
                    }
                }
                10 => {
                    // Short lines, as the history takes without the parser.
                    for n in 0..rng.below(1500) {
                        let text = if rng.below(300) == 0 {
                            String::new()
                        } else {
                            format!("{}", n % 1000)
                        };
                        out.extend_from_slice(text.as_bytes());
                        out.extend_from_slice(b"\r\n");
                    }
                }
                11 => out.extend_from_slice(format!("\x1b[{}m", rng.below(108)).as_bytes()),
                12 => {
                    let top = rng.below(u64::from(rows) + 2);
                    let bottom = rng.below(u64::from(rows) + 2);
                    let seq = match rng.below(4) {
                        0 => "\x1b[r".to_owned(),
                        1 => format!("\x1b[{top};{bottom}r"),
                        2 => format!("\x1b[{top}r"),
                        _ => format!("\x1b[;{bottom}r"),
                    };
                    out.extend_from_slice(seq.as_bytes());
                }
                13 => out.extend_from_slice(
                    [
                        &b"\x1b[?1049h"[..],
                        b"\x1b[?1049l",
                        b"\x1b[?47h",
                        b"\x1b[?47l",
                        b"\x1bc",
                        b"\x1b[3J",
                        b"\x1b[?3J",
                        b"\x1b[3;1J",
                        b"\x1b[03J",
                        b"\x1b[>3J",
                        b"\x1b[3:1J",
                        b"\x1b[?3$J",
                        b"\x1b[3\nJ",
                        b"\x1b[65539J",
                    ][rng.below(14) as usize],
                ),
                14 => out.extend_from_slice(
                    [
                        &b"\x1b]0;title"[..],
                        b"\x07",
                        b"\x1bP1$r",
                        b"\x1b\\",
                        b"\x1b_apc",
                        b"\x1b[12",
                        b"\x1b[?",
                        b"\x1b(",
                        b"\x18",
                    ][rng.below(9) as usize],
                ),
                15 => {
                    let row = rng.below(u64::from(rows) + 1);
                    let col = rng.below(40);
                    out.extend_from_slice(format!("\x1b[{row};{col}H").as_bytes());
                }
                16 => out.extend_from_slice(b"\x1b[4h"),
                17 => out.extend_from_slice(b"\x1b[4l\x1b[?7l"),
                18 => out.extend_from_slice(b"\x1b[?7h\x1b[2J\x1bM\x1b[3S"),
                _ => {
                    let n = rng.below(20) as usize;
                    out.extend((0..n).map(|_| rng.below(256) as u8));
                }
            }
        }
        out
    }

    #[test]
    fn a_skipped_flood_leaves_the_parser_as_the_whole_flood_would() {
        let mut skipped = 0;
        let mut bypassed = 0;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..200 {
            let rows = 2 + rng.below(6) as u16;
            let cols = 5 + rng.below(30) as u16;
            // Mostly small, for short floods to matter; sometimes large.
            let scrollback = if rng.below(4) == 0 {
                200 + rng.below(300) as usize
            } else {
                rng.below(12) as usize
            };
            let data = stream(&mut rng, rows);
            // The parser keeps few rows, for the history to fill.
            let kept = rng.below(4) as usize;
            let mut whole = Term::keeping(nz(rows), nz(cols), scrollback, kept);
            let mut term = Term::keeping(nz(rows), nz(cols), scrollback, kept);
            // The same bytes, in the same random pieces, with resizes between.
            let mut at = 0;
            while at < data.len() {
                let n = (1 + rng.below(40_000) as usize).min(data.len() - at);
                whole.parse(&data[at..at + n]);
                term.feed(&data[at..at + n]);
                at += n;
                if rng.below(8) == 0 {
                    let (r, c) = (nz(2 + rng.below(6) as u16), nz(5 + rng.below(30) as u16));
                    whole.set_size(r, c);
                    term.set_size(r, c);
                }
            }
            skipped += term.skipped();
            bypassed += term.bypassed();
            assert_eq!(
                state(&mut term),
                state(&mut whole),
                "case {case}: {rows}x{cols}, scrollback {scrollback}"
            );
        }
        assert!(skipped > 100_000, "the cases skipped only {skipped} bytes");
        assert!(
            bypassed > 20_000,
            "the cases bypassed only {bypassed} bytes"
        );
    }

    #[test]
    fn a_flood_of_lines_is_mostly_skipped() {
        let mut term = Term::new(nz(40), nz(139), 5000);
        let mut data = Vec::new();
        for n in 1..=200_000 {
            data.extend_from_slice(format!("{n}\r\n").as_bytes());
        }
        for piece in data.chunks(256 * 1024) {
            term.feed(piece);
        }
        assert!(
            term.skipped() * 10 > data.len() as u64 * 7,
            "skipped {}",
            term.skipped()
        );
        let rows: Vec<String> = term.screen().rows(0, 139).collect();
        assert_eq!(rows[38], "200000");
        assert_eq!(term.scrollback_len(), 5000);
        // The parser keeps a screenful's worth of rows; the rest is text.
        assert_eq!(term.screen().scrollback_len(), PARSER_ROWS);
        let history = term.parser.callbacks_mut().plain_lines();
        assert_eq!(history.last().map(String::as_str), Some("199811"));
    }

    /// A flood of full-width lines, too few in a piece to leave any out,
    /// reaches the history mostly without the parser, and leaves the same
    /// state as parsing all of it.
    #[test]
    fn a_flood_of_wide_lines_goes_to_the_history_as_text() {
        let mut data = Vec::new();
        for n in 0..20_000 {
            data.extend_from_slice(format!("{n:079}\r\n").as_bytes());
        }
        let mut term = Term::new(nz(24), nz(80), 5000);
        let mut whole = Term::new(nz(24), nz(80), 5000);
        for piece in data.chunks(256 * 1024) {
            term.feed(piece);
            whole.parse(piece);
        }
        assert_eq!(term.skipped(), 0);
        assert!(
            term.bypassed() * 10 > data.len() as u64 * 7,
            "bypassed {}",
            term.bypassed()
        );
        assert_eq!(state(&mut term), state(&mut whole));
        // Coloured text is parsed in full.
        let mut term = Term::new(nz(24), nz(80), 5000);
        term.feed(b"\x1b[31m");
        term.feed(&data[..256 * 1024]);
        assert_eq!(term.bypassed(), 0);
    }

    /// The parser still counts every row a bypassed flood scrolled: a
    /// screen grown again and again after `clear`-less redraws pulls back
    /// what it would have pulled back had the flood been parsed.
    #[test]
    fn resizes_after_a_bypassed_flood_pull_back_the_same_rows() {
        let data = b"x\r\n".repeat(5000);
        let mut term = Term::new(nz(24), nz(80), 5000);
        let mut whole = Term::new(nz(24), nz(80), 5000);
        term.feed(&data);
        whole.parse(&data);
        assert!(term.bypassed() > 0);
        for round in 0..6 {
            for t in [&mut term, &mut whole] {
                t.set_size(nz(150), nz(80));
            }
            assert_eq!(state(&mut term), state(&mut whole), "grown, round {round}");
            for t in [&mut term, &mut whole] {
                t.feed(b"\x1b[H\x1b[2J");
                t.set_size(nz(24), nz(80));
            }
            assert_eq!(state(&mut term), state(&mut whole), "shrunk, round {round}");
        }
    }

    /// Below a scroll region, line feeds do not scroll: every line is
    /// written over the last row, and a long one in the middle of the
    /// flood leaves its end there.
    #[test]
    fn lines_below_a_scroll_region_are_not_skipped() {
        let mut data = b"\x1b[2;4r\x1b[6;1H".to_vec();
        for n in 0..3000 {
            let line = if n == 1500 {
                "y".repeat(39)
            } else {
                n.to_string()
            };
            data.extend_from_slice(format!("{line}\r\n").as_bytes());
        }
        let mut whole = Term::new(nz(6), nz(40), 10);
        whole.parse(&data);
        let mut term = Term::new(nz(6), nz(40), 10);
        term.feed(&data);
        assert_eq!(state(&mut term), state(&mut whole));
        assert!(whole.screen().contents().contains("yyyy"));
    }

    /// Leaving the alternate screen (which has no scrollback) and flooding
    /// the primary one in the same piece keeps the primary's scrollback.
    #[test]
    fn a_flood_after_leaving_the_alternate_screen_keeps_the_scrollback() {
        let mut data = b"\x1b[?1049l".to_vec();
        for n in 0..3000 {
            data.extend_from_slice(format!("{n}\r\n").as_bytes());
        }
        let mut whole = Term::new(nz(24), nz(80), 2000);
        let mut term = Term::new(nz(24), nz(80), 2000);
        whole.parse(b"\x1b[?1049h");
        term.feed(b"\x1b[?1049h");
        whole.parse(&data);
        term.feed(&data);
        assert_eq!(state(&mut term), state(&mut whole));
    }

    /// `CSI b` repeats the last character printed, which a skip must not
    /// change: a flood ending in blank lines is not shortened.
    #[test]
    fn the_character_to_repeat_is_kept() {
        let mut data = b"A\r\nB\r\n".to_vec();
        data.extend(b"\r\n".repeat(400));
        data.extend_from_slice(b"\x1b[3b");
        let mut whole = Term::new(nz(5), nz(20), 10);
        let mut term = Term::new(nz(5), nz(20), 10);
        whole.parse(&data);
        term.feed(&data);
        assert_eq!(state(&mut term), state(&mut whole));
    }

    #[test]
    fn nothing_is_skipped_inside_a_string_or_a_scroll_region() {
        let lines: String = (0..2000).map(|n| format!("{n}\r\n")).collect();
        for prefix in ["\x1b]0;", "\x1bP", "\x1b[2;5r", "\x1b[?1049h"] {
            let mut term = Term::new(nz(10), nz(20), 10);
            term.feed(prefix.as_bytes());
            term.feed(lines.as_bytes());
            assert_eq!(term.skipped(), 0, "after {prefix:?}");
        }
    }

    /// The lines of scrollback as text, as a terminal with all of them in
    /// its parser holds them.
    fn scrollback_text<CB: vt100::Callbacks>(parser: &mut vt100::Parser<CB>) -> Vec<String> {
        let screen = parser.screen_mut();
        let cols = screen.size().1.get();
        screen.set_scrollback(usize::MAX);
        let mut lines = Vec::new();
        for offset in (1..=screen.scrollback()).rev() {
            screen.set_scrollback(offset);
            lines.push(screen.rows(0, cols).next().unwrap().trim_end().to_owned());
        }
        screen.set_scrollback(0);
        lines
    }

    /// Keeping the older lines as text loses none of them, and erases them
    /// when `vt100` would: the text of every line of scrollback, and the
    /// screen, against a parser that keeps all of them as rows.
    #[test]
    fn the_history_holds_what_the_parsers_scrollback_would() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for case in 0..200 {
            let rows = 2 + rng.below(6) as u16;
            let cols = 5 + rng.below(30) as u16;
            let scrollback = rng.below(300) as usize;
            let kept = rng.below(4) as usize;
            let mut data = stream(&mut rng, rows);
            // Back to the primary screen, whose scrollback is compared.
            data.extend_from_slice(b"\x18\x1b[?1049l");
            let mut whole = vt100::Parser::new(nz(rows), nz(cols), scrollback);
            let mut term = Term::keeping(nz(rows), nz(cols), scrollback, kept);
            whole.process(&data);
            term.parse(&data);
            let mut text = term.parser.callbacks_mut().plain_lines();
            text.iter_mut()
                .for_each(|line| line.truncate(line.trim_end().len()));
            text.extend(scrollback_text(&mut term.parser));
            assert_eq!(
                text,
                scrollback_text(&mut whole),
                "case {case}: {rows}x{cols}, scrollback {scrollback}, kept {kept}"
            );
            assert_eq!(
                rows_state(&mut term.parser).0,
                rows_state(&mut whole).0,
                "case {case}"
            );
        }
    }

    #[test]
    fn clear_and_reset_erase_the_history_but_not_on_the_alternate_screen() {
        let lines: String = (0..50).map(|n| format!("{n}\r\n")).collect();
        for (erase, erased) in [
            ("\x1b[H\x1b[2J\x1b[3J", true),
            ("\x1b[?3J", true),
            ("\x1bc", true),
            ("\x1b[2J", false),
            ("\x1b[>3J", false),
            ("\x1b[?1049h\x1b[3J\x1b[?1049l", false),
            ("\x1b[?1049h\x1bc", true),
        ] {
            let mut term = Term::keeping(nz(5), nz(20), 100, 3);
            term.feed(lines.as_bytes());
            assert_eq!(term.parser.callbacks().len(), 43);
            // The sequence cut in two, and more lines in the same piece.
            let (a, b) = erase.split_at(erase.len() / 2);
            term.feed(a.as_bytes());
            term.feed(format!("{b}after\r\n").as_bytes());
            let history = term.parser.callbacks_mut().plain_lines();
            assert_eq!(history.is_empty(), erased, "{erase:?}: {history:?}");
        }
    }

    /// A smaller screen pushes its top rows into the scrollback, and a
    /// taller one pulls them back, as with all lines in the parser.
    #[test]
    fn resizes_move_rows_between_screen_and_history() {
        let lines: String = (0..40).map(|n| format!("line {n}\r\n")).collect();
        let mut whole = vt100::Parser::new(nz(20), nz(20), 100);
        let mut term = Term::keeping(nz(20), nz(20), 100, 5);
        whole.process(lines.as_bytes());
        term.feed(lines.as_bytes());
        for rows in [4, 9, 2, 7] {
            whole.set_size(nz(rows), nz(20));
            term.set_size(nz(rows), nz(20));
            let mut text = term.parser.callbacks_mut().plain_lines();
            text.extend(scrollback_text(&mut term.parser));
            assert_eq!(text, scrollback_text(&mut whole), "at {rows} rows");
            assert_eq!(term.screen().contents(), whole.screen().contents());
        }
    }

    /// What hostile output can leave in the history and the redraw: the
    /// bytes a later attach (someone else's, for a watcher) writes to its
    /// terminal. Whatever was printed, the history may hold only text and
    /// SGR, and a redraw only those and the few sequences vt100 writes to
    /// set the screen's state (the cursor, its style, the input modes):
    /// never a control character the output brought, a C1 control, a
    /// string (OSC, DCS, APC, PM, SOS: a title, the clipboard, a link) or a
    /// request the viewer's terminal would answer.
    #[test]
    fn a_redraw_holds_no_sequence_the_output_brought() {
        /// Hostile pieces: strings and C1 controls, raw or as UTF-8,
        /// invalid UTF-8, wide and combining characters, reports asked
        /// for, SGR with every kind of parameter, and the modes and cursor
        /// state a redraw restores.
        fn hostile(rng: &mut Rng) -> Vec<u8> {
            let pieces: [&[u8]; 20] = [
                b"\x1b]52;c;aGk=\x07",
                b"\x1b]8;;http://x/\x1b\\link\x1b]8;;\x1b\\",
                b"\x1b]0;\x1b[31mtitle\x07",
                b"\x1bP$q\"p\x1b\\",
                b"\x1b_apc\x1b\\\x1b^pm\x1b\\\x1bXsos\x1b\\",
                "\u{9b}31m\u{9d}0;t\u{9c}\u{90}q\u{9c}".as_bytes(),
                b"\x9b31m\x9d0;t\x07\x90q\x9c",
                b"\x1b[5n\x1b[6n\x1b[c\x1b[>c\x1b[21t\x1b[1;1;1;1;1*y\x1b[?u\x1b[?2026$p",
                b"\x07\x08\x0b\x0c\x0e\x0f\x7f\x00",
                b"\xff\xfe\xc3\x28\xe2\x82",
                "\u{ff21}\u{1f600}e\u{301}\u{200b}\u{fe0f}".as_bytes(),
                b"\x1b[38;2;1;2;3m\x1b[48:5:9m\x1b[58;5;1m\x1b[4:3m",
                b"\x1b[99999999999999m\x1b[;;;1;;m",
                b"\x1b[1;31;42;4;5;7;8;9m",
                b"\x1b#8\x1b(0lqk\x1b(B",
                b"\t\x1b[5D\x1b[2@\x1b[3P\x1bM",
                b"\x1b[2 q\x1b[?25l\x1b7\x1b[5;5H\x1b8",
                b"\x1b[?1003h\x1b[?1006h\x1b[?2004h",
                b"\x1b[?1h\x1b=",
                b"\x1b[?1000l\x1b[?1l\x1b>\x1b[?25h\x1b[0 q",
            ];
            let mut out = Vec::new();
            for _ in 0..40 {
                if rng.below(3) == 0 {
                    for i in 0..rng.below(400) {
                        out.extend_from_slice(format!("{i} plain\r\n").as_bytes());
                    }
                }
                out.extend_from_slice(pieces[rng.below(20) as usize]);
                out.extend_from_slice(b"text");
                out.extend_from_slice(if rng.below(2) == 0 { b"\r\n" } else { b"\n" });
                if rng.below(2) == 0 {
                    // Back to default attributes, which the bypass needs.
                    out.extend_from_slice(b"\x1b[m");
                }
            }
            out
        }
        /// Splits `bytes` into its escape sequences; panics on invalid
        /// UTF-8, a sequence cut off or malformed, and a control character
        /// other than ESC, CR, LF and BS.
        fn sequences(bytes: &[u8], case: usize) -> Vec<String> {
            let text = std::str::from_utf8(bytes)
                .unwrap_or_else(|e| panic!("case {case}: not UTF-8: {e}"));
            let mut found = Vec::new();
            let mut chars = text.chars();
            while let Some(c) = chars.next() {
                if c != '\x1b' {
                    assert!(
                        !c.is_control() || matches!(c, '\r' | '\n' | '\x08'),
                        "case {case}: control {c:?}"
                    );
                    continue;
                }
                let mut seq = String::from(c);
                let first = chars
                    .next()
                    .unwrap_or_else(|| panic!("case {case}: a lone ESC at the end"));
                seq.push(first);
                if first == '[' {
                    // Parameters, then intermediates, then the final byte.
                    let mut stage = 0;
                    loop {
                        let c = chars
                            .next()
                            .unwrap_or_else(|| panic!("case {case}: {seq:?} cut off"));
                        seq.push(c);
                        match c {
                            '0'..='?' if stage == 0 => {}
                            ' '..='/' => stage = 1,
                            '@'..='~' => break,
                            _ => panic!("case {case}: {seq:?} is malformed"),
                        }
                    }
                }
                found.push(seq);
            }
            found
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut bypassed, mut kept) = (0, 0);
        for case in 0..100 {
            let rows = 2 + rng.below(10) as u16;
            let cols = 5 + rng.below(40) as u16;
            let mut term = Term::keeping(nz(rows), nz(cols), 1000, 3);
            let mut data = hostile(&mut rng);
            if rng.below(2) == 0 {
                data.extend(stream(&mut rng, rows));
                data.extend(hostile(&mut rng));
            }
            // Fed in pieces cut anywhere, as the PTY hands them over.
            let mut at = 0;
            while at < data.len() {
                let take = (1 + rng.below(20_000) as usize).min(data.len() - at);
                term.feed(&data[at..at + take]);
                at += take;
            }
            bypassed += term.bypassed();
            let mut history = Vec::new();
            term.parser.callbacks_mut().write(&mut history);
            // (A reset or `CSI 3 J` in the stream may have emptied it.)
            kept += usize::from(!history.is_empty());
            for seq in sequences(&history, case) {
                let sgr = seq.starts_with("\x1b[")
                    && seq.ends_with('m')
                    && seq[2..seq.len() - 1]
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == ';' || c == ':');
                assert!(sgr, "case {case}: {seq:?} in the history");
            }
            // Each line is text and SGR, then CR LF: no other CR, no BS.
            let text = String::from_utf8_lossy(&history);
            assert!(!text.contains('\x08'), "case {case}: BS in the history");
            assert_eq!(
                text.matches('\r').count(),
                text.matches("\r\n").count(),
                "case {case}: a CR that ends no line in the history"
            );
            for with_scrollback in [true, false] {
                let redraw = term.redraw(with_scrollback);
                for seq in sequences(&redraw, case) {
                    let allowed = match seq.strip_prefix("\x1b[") {
                        // What vt100 writes: attributes, the cursor and
                        // erasing, the modes, and the cursor's style.
                        Some(csi) => {
                            matches!(
                                csi.chars().last(),
                                Some('m' | 'H' | 'J' | 'K' | 'C' | 'X' | 'h' | 'l')
                            ) || csi.ends_with(" q")
                        }
                        // A reset, the keypad modes, cursor save/restore.
                        None => matches!(
                            seq.as_str(),
                            "\x1bc" | "\x1b=" | "\x1b>" | "\x1b7" | "\x1b8"
                        ),
                    };
                    assert!(allowed, "case {case}: {seq:?} in the redraw");
                }
            }
        }
        // Most cases left lines in the history, and the bypass took part:
        // lines it pushed were checked too.
        assert!(kept > 50, "only {kept} of 100 cases kept any history");
        assert!(bypassed > 0, "no case took the bypass");
    }
}
