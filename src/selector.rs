//! Which agents a command, a listing or a role applies to.
//!
//! A selector is a comma-separated list of terms (spaces allowed around
//! the commas, not inside a term):
//!
//! - a name or a wildcard of names (`web-1`, `web-*`, `db-?`, `*`): the
//!   agent's name must match one of them (names are alternatives, as in
//!   `pdsh -w web-1,web-2`);
//! - a label test, `key=value` or `key!=value` (the value may hold
//!   wildcards too): every one must hold (as in Kubernetes'
//!   `role=web,env!=staging`); `!=` also holds for an agent without that
//!   label.
//!
//! `*` matches any run of characters, `?` any one. Names and label tests
//! combine: `web-*,env=prod` is the agents named `web-…` that are labelled
//! `env=prod`. Matching is case-sensitive. [`PATTERN`] is the grammar as a
//! regular expression, for the API's description.

use std::collections::BTreeMap;
use std::fmt;

/// Longest selector accepted, in bytes, and most terms.
pub(crate) const MAX_LEN: usize = 1024;
const MAX_TERMS: usize = 64;

/// The grammar as an ECMA-262 regular expression (JSON Schema's `pattern`).
pub(crate) const PATTERN: &str = r"^\s*(?:[A-Za-z0-9._*?-]+|[A-Za-z0-9._/-]+!?=[A-Za-z0-9._/:*?-]*)(?:\s*,\s*(?:[A-Za-z0-9._*?-]+|[A-Za-z0-9._/-]+!?=[A-Za-z0-9._/:*?-]*)){0,63}\s*$";

/// A name or value with `*` (any run) and `?` (any one character).
#[derive(Debug, Clone)]
struct Pattern(Vec<char>);

impl Pattern {
    /// Whether `text` matches, in time linear in both lengths times the
    /// stars (the classic backtrack to the last star only).
    fn matches(&self, text: &str) -> bool {
        let (p, t): (&[char], Vec<char>) = (&self.0, text.chars().collect());
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            match p.get(pi) {
                Some('*') => {
                    star = Some((pi, ti));
                    pi += 1;
                }
                Some(&c) if c == '?' || c == t[ti] => {
                    pi += 1;
                    ti += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        pi = sp + 1;
                        ti = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("the selector is empty; use * for every agent")]
    Empty,
    #[error("the selector is longer than {MAX_LEN} bytes or has more than {MAX_TERMS} terms")]
    TooLong,
    #[error("{term:?} in the selector: {why}")]
    Term { term: String, why: &'static str },
}

#[derive(Debug, Clone)]
struct LabelTest {
    key: String,
    value: Pattern,
    equal: bool,
}

/// A parsed selector.
#[derive(Debug, Clone)]
pub struct Selector {
    text: String,
    names: Vec<Pattern>,
    labels: Vec<LabelTest>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn is_wildcard(c: char) -> bool {
    matches!(c, '*' | '?')
}

impl Selector {
    /// Parses `text`; an empty selector is an error, never "everything".
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        if text.len() > MAX_LEN {
            return Err(SelectorError::TooLong);
        }
        let terms: Vec<&str> = text.split(',').map(str::trim).collect();
        if terms.iter().all(|t| t.is_empty()) {
            return Err(SelectorError::Empty);
        }
        if terms.len() > MAX_TERMS {
            return Err(SelectorError::TooLong);
        }
        let mut selector = Selector {
            text: terms.join(","),
            names: Vec::new(),
            labels: Vec::new(),
        };
        for term in terms {
            let bad = |why| SelectorError::Term {
                term: term.to_owned(),
                why,
            };
            if term.is_empty() {
                return Err(bad("an empty term (two commas in a row?)"));
            }
            let Some(eq) = term.find('=') else {
                if !term.chars().all(|c| is_name_char(c) || is_wildcard(c)) {
                    return Err(bad(
                        "a name may hold letters, digits, '.', '_', '-' and the wildcards * ?",
                    ));
                }
                selector.names.push(Pattern(term.chars().collect()));
                continue;
            };
            let (key, equal) = match term[..eq].strip_suffix('!') {
                Some(key) => (key, false),
                None => (&term[..eq], true),
            };
            let value = &term[eq + 1..];
            if key.is_empty() || !key.chars().all(|c| is_name_char(c) || c == '/') {
                return Err(bad(
                    "a label key is letters, digits, '.', '_', '-' or '/', before = or !=",
                ));
            }
            if !value
                .chars()
                .all(|c| is_name_char(c) || is_wildcard(c) || matches!(c, '/' | ':'))
            {
                return Err(bad(
                    "a label value may hold letters, digits, '.', '_', '-', '/', ':' and the wildcards * ?",
                ));
            }
            selector.labels.push(LabelTest {
                key: key.to_owned(),
                value: Pattern(value.chars().collect()),
                equal,
            });
        }
        Ok(selector)
    }

    /// Whether the agent `name` with `labels` is selected.
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        let named = self.names.is_empty() || self.names.iter().any(|p| p.matches(name));
        named
            && self.labels.iter().all(|t| {
                let hit = labels.get(&t.key).is_some_and(|v| t.value.matches(v));
                hit == t.equal
            })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Selector, SelectorError> {
        Selector::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_globs_and_label_tests() {
        let web = labels(&[("role", "web"), ("env", "prod")]);
        let staging = labels(&[("role", "web"), ("env", "staging")]);
        let db = labels(&[("role", "db")]);
        let sel = |s: &str| Selector::parse(s).unwrap();
        assert!(sel("web-1").matches("web-1", &web));
        assert!(!sel("web-1").matches("web-10", &web));
        assert!(sel("web-*").matches("web-10", &web));
        assert!(
            sel("web-1,db-1").matches("db-1", &db),
            "names are alternatives"
        );
        assert!(sel("db-?").matches("db-2", &db) && !sel("db-?").matches("db-20", &db));
        assert!(sel("*-1*").matches("web-1", &web) && sel("*-1*").matches("a-b-10", &web));
        assert!(!sel("*-1").matches("web-10", &web) && sel("w*b*").matches("web", &web));
        assert!(
            !sel("a*a*a*b").matches(&"a".repeat(5000), &web),
            "no blow-up"
        );
        assert!(sel("*").matches("anything", &BTreeMap::new()));
        assert!(sel("role=web").matches("a", &web) && !sel("role=web").matches("a", &db));
        let both = sel("role=web,env!=staging");
        assert!(both.matches("a", &web) && !both.matches("a", &staging));
        assert!(
            sel("env!=staging").matches("a", &db),
            "!= holds without the label"
        );
        assert!(!sel("env=*").matches("a", &db), "= needs the label");
        assert!(sel("env=prod*").matches("a", &web));
        let mixed = sel("web-*, env=prod");
        assert!(mixed.matches("web-1", &web) && !mixed.matches("web-1", &staging));
        assert!(!mixed.matches("db-1", &web));
        assert!(!sel("WEB-1").matches("web-1", &web), "case-sensitive");
        assert_eq!(sel(" web-1 , role=web ").to_string(), "web-1,role=web");
    }

    #[test]
    fn the_documented_pattern_agrees_with_the_parser() {
        let pattern = regex::Regex::new(PATTERN).unwrap();
        for text in [
            "web-1",
            "web-*",
            "*",
            "db-?",
            "role=web,env!=staging",
            " a , b ",
            "k/x=v:1",
            "env=",
            "",
            " ",
            ",",
            "a,,b",
            "a,",
            "web 1",
            "=web",
            "role==web",
            "a=b=c",
            "db-[1",
            "$(id)",
            "r = w",
            "k=[x",
            "a!b",
            "é",
        ] {
            assert_eq!(
                pattern.is_match(text),
                Selector::parse(text).is_ok(),
                "{text:?}"
            );
        }
        let many = vec!["a"; 64].join(",");
        assert!(pattern.is_match(&many) && Selector::parse(&many).is_ok());
        let too_many = vec!["a"; 65].join(",");
        assert!(!pattern.is_match(&too_many) && Selector::parse(&too_many).is_err());
    }

    #[test]
    fn bad_selectors_are_refused_with_the_term() {
        assert_eq!(Selector::parse("").err(), Some(SelectorError::Empty));
        assert_eq!(Selector::parse(" , ").err(), Some(SelectorError::Empty));
        for bad in [
            "web 1",
            "=web",
            "role==web",
            "a=b=c",
            "db-[1",
            "$(id)",
            "k=[x",
            "a,,b",
            "web-1,",
            "r = w",
            "a b=c",
            "db-[12]",
        ] {
            let err = Selector::parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} parsed"));
            assert!(matches!(err, SelectorError::Term { .. }), "{bad}: {err}");
        }
        assert_eq!(
            Selector::parse(&"a,".repeat(65)).err(),
            Some(SelectorError::TooLong)
        );
        assert_eq!(
            Selector::parse(&"a".repeat(2000)).err(),
            Some(SelectorError::TooLong)
        );
    }
}
