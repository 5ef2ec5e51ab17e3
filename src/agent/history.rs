//! A session's older scrollback, kept as text.
//!
//! `vt100` keeps its scrollback as rows of cells, 32 bytes a cell whatever
//! the cell holds: a shell that had printed 5,000 lines of 80 columns held
//! about 9.5 MB of agent memory for as long as it lived, though those rows
//! are only ever read back for a redraw, as text with SGR sequences. So
//! the parser keeps rows only for as many lines as a resize can pull back
//! onto the screen ([`PARSER_ROWS`]), and each row that leaves them comes
//! here (the parser's `on_scroll` callback) as that text: a line of `ls`
//! costs its characters and a few bytes of colour.
//!
//! What clears `vt100`'s scrollback must clear this too: a full reset
//! (`ESC c`) and `CSI 3 J` on the primary screen. The parser does not say
//! when it does either, so the stream is watched for them
//! (src/agent/terminal.rs).
//!
//! A taller screen pulls rows back from the parser's scrollback only.
//! That is the same as with every line in the parser until more than
//! [`PARSER_ROWS`] have been pulled back and not pushed out again (a
//! screen shrunk while the cursor is away from its bottom row drops rows
//! rather than pushing them): then the rows pulled back are blank, and
//! their lines stay here, above them in a redraw. Nothing is lost or
//! reordered; vt100 offers no way to hand rows back to its scrollback.

use std::collections::VecDeque;

use vt100::capture::{BasicFormattedCaptureState, RowContents};

/// Rows of scrollback the parser itself keeps (the rest come here): as
/// many as the tallest screen, so that growing the screen pulls back the
/// same rows it would with all of them in the parser.
pub(crate) const PARSER_ROWS: usize = super::session::MAX_ROWS as usize;

/// Bytes of text the history may hold, on average per line it may hold:
/// 1 KiB. An 80-column line with a colour change in every cell is about as
/// long; a plain one is a tenth of it.
const BYTES_PER_LINE: usize = 1024;

/// Lines that scrolled out of the parser's rows, oldest first: each as
/// its text with SGR sequences from default attributes on (what
/// `vt100`'s basic formatting writes), so that each can be redrawn alone.
pub(crate) struct History {
    bytes: VecDeque<u8>,
    /// The length of each line in `bytes`.
    lens: VecDeque<u32>,
    max_lines: usize,
    max_bytes: usize,
    /// The line being formatted, kept to spare an allocation a line.
    scratch: String,
    /// Rows the parser will hand over next that are here already (see
    /// [`History::drop_next`]): they are dropped.
    ahead: usize,
}

impl History {
    /// A history of at most `max_lines` lines and [`BYTES_PER_LINE`] bytes
    /// a line on average (one line may go past the byte bound).
    pub(crate) fn new(max_lines: usize) -> History {
        History {
            bytes: VecDeque::new(),
            lens: VecDeque::new(),
            max_lines,
            max_bytes: max_lines.saturating_mul(BYTES_PER_LINE),
            scratch: String::new(),
            ahead: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lens.len()
    }

    /// Whether it keeps any line.
    pub(crate) fn keeps_lines(&self) -> bool {
        self.max_lines > 0
    }

    /// Forgets every line and frees their memory.
    pub(crate) fn clear(&mut self) {
        self.bytes = VecDeque::new();
        self.lens = VecDeque::new();
        self.ahead = 0;
    }

    /// Drops the next `rows` rows the parser hands over: rows of lines
    /// [pushed](History::push) here already, and the blank rows scrolled
    /// in place of the others. (A flood of plain lines reaches the history
    /// this way without being parsed: src/agent/terminal.rs.)
    pub(crate) fn drop_next(&mut self, rows: usize) {
        self.ahead = rows;
    }

    /// Rows still to be dropped (for checks).
    pub(crate) fn ahead(&self) -> usize {
        self.ahead
    }

    /// Takes a line as its formatted text.
    pub(crate) fn push(&mut self, line: &[u8]) {
        if self.max_lines == 0 {
            return;
        }
        while !self.lens.is_empty()
            && (self.lens.len() >= self.max_lines || self.bytes.len() + line.len() > self.max_bytes)
        {
            self.pop_oldest();
        }
        // Grown by doubling, but never past the bound (and this line).
        let need = self.bytes.len() + line.len();
        if need > self.bytes.capacity() {
            let target = (self.bytes.capacity() * 2).clamp(need, self.max_bytes.max(need));
            self.bytes.reserve_exact(target - self.bytes.len());
        }
        self.bytes.extend(line);
        // A row is at most `MAX_COLS` cells of at most a few dozen bytes.
        self.lens
            .push_back(u32::try_from(line.len()).unwrap_or(u32::MAX));
    }

    fn pop_oldest(&mut self) {
        if let Some(len) = self.lens.pop_front() {
            self.bytes.drain(..len as usize);
        }
    }

    /// Writes each line, oldest first, from default attributes and ending
    /// in them and CR LF (a line feed fills a new row with the background
    /// colour in force).
    pub(crate) fn write(&mut self, out: &mut Vec<u8>) {
        let bytes = self.bytes.make_contiguous();
        let mut at = 0;
        for &len in &self.lens {
            let end = at + len as usize;
            out.extend_from_slice(b"\x1b[m");
            out.extend_from_slice(&bytes[at..end]);
            out.extend_from_slice(b"\x1b[m\r\n");
            at = end;
        }
    }

    /// The lines as plain text, without their SGR sequences (for tests).
    #[cfg(test)]
    pub(crate) fn plain_lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        self.write(&mut out);
        let text = String::from_utf8(out).expect("rows are text");
        text.split_terminator("\r\n")
            .map(|line| vt100::capture::basic_formatted_to_plain(line).collect())
            .collect()
    }
}

impl vt100::Callbacks for History {
    /// A row left the parser's scrollback (or the screen, past a
    /// scrollback full or of no rows). The alternate screen's rows are
    /// dropped, as `vt100` drops them: it keeps no scrollback for it.
    fn on_scroll(&mut self, row: RowContents<'_>, alternate_screen: bool) {
        if alternate_screen || self.max_lines == 0 {
            return;
        }
        if self.ahead > 0 {
            self.ahead -= 1;
            return;
        }
        let mut line = std::mem::take(&mut self.scratch);
        line.clear();
        // Formatting into a String cannot fail.
        let _ = row.write_formatted_basic(&mut line, &mut BasicFormattedCaptureState::new());
        self.push(line.as_bytes());
        self.scratch = line;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u16) -> std::num::NonZeroU16 {
        std::num::NonZeroU16::new(n).unwrap()
    }

    fn parser(rows: u16, cols: u16, kept: usize, lines: usize) -> vt100::Parser<History> {
        vt100::Parser::new_with_callbacks(nz(rows), nz(cols), kept, History::new(lines))
    }

    #[test]
    fn rows_past_the_parsers_scrollback_are_kept_as_text_oldest_first() {
        let mut p = parser(3, 20, 2, 100);
        for i in 1..=10 {
            p.process(format!("line {i}\r\n").as_bytes());
        }
        // 10 lines and an empty one: 3 on the screen, 2 in the parser's
        // scrollback, 6 here.
        let lines = p.callbacks_mut().plain_lines();
        assert_eq!(
            lines,
            ["line 1", "line 2", "line 3", "line 4", "line 5", "line 6"]
        );
        assert_eq!(p.screen().scrollback_len(), 2);
    }

    #[test]
    fn colours_survive_and_each_line_starts_from_default_attributes() {
        let mut p = parser(2, 20, 0, 100);
        p.process(b"\x1b[1;31mred\r\nstill red\x1b[m plain\r\n\r\n");
        let mut out = Vec::new();
        p.callbacks_mut().write(&mut out);
        // Redrawn into a fresh terminal, the second line is red again
        // although its SGR came on the line before.
        let mut q = vt100::Parser::new(nz(5), nz(20), 0);
        q.process(&out);
        assert_eq!(
            q.screen().cell(1, 0).unwrap().fgcolor(),
            vt100::Color::Idx(1)
        );
        assert!(q.screen().cell(1, 0).unwrap().bold());
        assert_eq!(
            q.screen().cell(1, 10).unwrap().fgcolor(),
            vt100::Color::Default
        );
        assert_eq!(
            q.screen().contents().lines().nth(1),
            Some("still red plain")
        );
    }

    #[test]
    fn the_oldest_lines_go_past_either_bound() {
        let mut h = History::new(3);
        for i in 0..10 {
            h.push(format!("{i}").as_bytes());
        }
        assert_eq!(h.plain_lines(), ["7", "8", "9"]);
        // 3 KiB of bytes: three lines of 1,200 do not fit.
        let long = "x".repeat(1200);
        for _ in 0..3 {
            h.push(long.as_bytes());
        }
        assert_eq!(h.len(), 2);
        assert!(h.bytes.len() <= 3 * BYTES_PER_LINE);
        assert!(h.bytes.capacity() <= 3 * BYTES_PER_LINE + 1200);
        h.clear();
        assert_eq!(h.len(), 0);
        assert_eq!(h.bytes.capacity(), 0);
    }

    #[test]
    fn rows_of_the_alternate_screen_are_not_kept() {
        let mut p = parser(2, 10, 0, 100);
        p.process(b"\x1b[?1049h");
        for i in 0..5 {
            p.process(format!("alt {i}\r\n").as_bytes());
        }
        assert_eq!(p.callbacks().len(), 0);
    }
}
