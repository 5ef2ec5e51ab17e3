import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LineEditor } from '../src/lineEditor';
import { historyOf, Row } from './fakes';
import { cells, graphemes } from '../src/text';

/** An editor and the row its output draws, checked after every step. */
function setup(history: string[] = []) {
  const editor = new LineEditor(historyOf(history));
  const row = new Row();
  const apply = (out: string): void => {
    row.write(out);
    assert.equal(row.text, editor.text, 'the row shows the line');
    const before = graphemes(editor.text).slice(0, editor.cursor);
    assert.equal(row.col, cells(before), 'the terminal cursor is where the editor thinks');
  };
  return { editor, row, apply };
}

test('insert at the end and in the middle', () => {
  const { editor, apply } = setup();
  apply(editor.insert('echo hllo'));
  assert.equal(editor.cursor, 9);
  for (let i = 0; i < 3; i++) apply(editor.moveLeft());
  apply(editor.insert('e'));
  assert.equal(editor.text, 'echo hello');
  assert.equal(editor.cursor, 7);
});

test('backspace over wide characters and emoji moves back two cells', () => {
  const { editor, apply } = setup();
  apply(editor.insert('a漢😀b'));
  assert.equal(editor.length, 4);
  apply(editor.moveLeft());
  const out = editor.backspace(); // the emoji
  assert.ok(out.startsWith('\b\b'), 'two cells back for a two-cell emoji');
  apply(out);
  assert.equal(editor.text, 'a漢b');
  apply(editor.backspace());
  assert.equal(editor.text, 'ab');
  assert.equal(editor.cursor, 1);
});

test('a family emoji and a flag are one grapheme each', () => {
  const { editor, apply } = setup();
  apply(editor.insert('👨‍👩‍👧🇫🇷x'));
  assert.equal(editor.length, 3);
  apply(editor.moveLeft());
  apply(editor.backspace());
  apply(editor.backspace());
  assert.equal(editor.text, 'x');
});

test('a combining mark typed alone joins the character before it', () => {
  const { editor, apply } = setup();
  apply(editor.insert('cafe'));
  apply(editor.insert('\u0301'));
  assert.equal(editor.length, 4);
  assert.equal(editor.text, 'cafe\u0301');
  apply(editor.backspace());
  assert.equal(editor.text, 'caf');
});

test('history walk keeps the draft', () => {
  const { editor, apply } = setup(['one', 'two']);
  apply(editor.insert('dra'));
  apply(editor.historyUp());
  assert.equal(editor.text, 'two');
  apply(editor.historyUp());
  assert.equal(editor.text, 'one');
  assert.equal(editor.historyUp(), '', 'nothing above the oldest line');
  assert.equal(editor.text, 'one');
  apply(editor.historyDown());
  assert.equal(editor.text, 'two');
  apply(editor.historyDown());
  assert.equal(editor.text, 'dra', 'back to the draft');
  assert.equal(editor.historyDown(), '', 'nothing below the draft');
  assert.equal(editor.cursor, 3);
});

test('a new prompt starts at the end of the history, with an empty line', () => {
  const { editor, apply } = setup(['one']);
  apply(editor.historyUp());
  editor.reset();
  assert.equal(editor.text, '');
  assert.equal(editor.historyUp(), 'one\x1b[J');
  assert.equal(editor.text, 'one');
});

test('Ctrl-U and Ctrl-K kill, Ctrl-Y yanks', () => {
  const { editor, apply } = setup();
  apply(editor.insert('hello world'));
  for (let i = 0; i < 5; i++) apply(editor.moveLeft());
  apply(editor.killToEnd());
  assert.equal(editor.text, 'hello ');
  apply(editor.home());
  apply(editor.yank());
  assert.equal(editor.text, 'worldhello ');
  assert.equal(editor.cursor, 5);
  apply(editor.killToStart());
  assert.equal(editor.text, 'hello ');
  assert.equal(editor.cursor, 0);
  apply(editor.end());
  apply(editor.yank());
  assert.equal(editor.text, 'hello world');
});

test('home and end, delete forward, left and right at the edges', () => {
  const { editor, apply } = setup();
  assert.equal(editor.moveLeft(), '');
  assert.equal(editor.backspace(), '');
  apply(editor.insert('ab漢c'));
  assert.equal(editor.moveRight(), '');
  apply(editor.home());
  assert.equal(editor.cursor, 0);
  apply(editor.deleteForward());
  assert.equal(editor.text, 'b漢c');
  apply(editor.moveRight());
  apply(editor.moveRight());
  assert.equal(editor.cursor, 2);
  apply(editor.end());
  assert.equal(editor.cursor, 3);
  assert.equal(editor.deleteForward(), '');
});

test('redraw prints the prompt and the line with the cursor in place', () => {
  const { editor } = setup();
  editor.insert('ab😀c');
  editor.moveLeft();
  editor.moveLeft();
  assert.equal(editor.redraw('$ '), '$ ab😀c\b\b\b');
});

test('a 1.2 MB paste does not throw', () => {
  const { editor } = setup();
  const big = 'x'.repeat(1_200_000);
  const out = editor.insert(big);
  assert.equal(out.length, big.length);
  assert.equal(editor.length, 1_200_000);
  editor.home();
  editor.insert('echo ');
  assert.equal(editor.text.length, 1_200_005);
  editor.end();
  editor.backspace();
  assert.equal(editor.length, 1_200_004);
});

test('forgetting the history leaves nothing under ↑', () => {
  const { editor } = setup(['secret']);
  editor.forgetHistory();
  editor.reset();
  assert.equal(editor.historyUp(), '');
  assert.equal(editor.text, '');
});
