//! Which agents a command, a listing or a role applies to.
//!
//! A selector is a comma-separated list of terms:
//!
//! - a name or a glob of names (`web-1`, `web-*`, `db-[12]`, `*`): the
//!   agent's name must match one of them (names are alternatives, as in
//!   `pdsh -w web-1,web-2`);
//! - a label test, `key=value` or `key!=value` (the value may be a glob):
//!   every one must hold (as in Kubernetes' `role=web,env!=staging`); `!=`
//!   also holds for an agent without that label.
//!
//! Names and label tests combine: `web-*,env=prod` is the agents named
//! `web-…` that are labelled `env=prod`. Matching is case-sensitive.

use std::collections::BTreeMap;
use std::fmt;

use glob::{MatchOptions, Pattern};

/// Longest selector accepted, in bytes, and most terms.
const MAX_LEN: usize = 1024;
const MAX_TERMS: usize = 64;

const OPTIONS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: false,
    require_literal_leading_dot: false,
};

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

fn is_glob_char(c: char) -> bool {
    matches!(c, '*' | '?' | '[' | ']' | '!')
}

fn pattern(term: &str, text: &str) -> Result<Pattern, SelectorError> {
    Pattern::new(text).map_err(|_| SelectorError::Term {
        term: term.to_owned(),
        why: "not a valid glob (an unclosed '[')",
    })
}

impl Selector {
    /// Parses `text`; an empty selector is an error, never "everything".
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        if text.len() > MAX_LEN {
            return Err(SelectorError::TooLong);
        }
        let terms: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if terms.is_empty() {
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
            let Some(eq) = term.find('=') else {
                if !term.chars().all(|c| is_name_char(c) || is_glob_char(c)) {
                    return Err(bad(
                        "a name may hold letters, digits, '.', '_', '-' and the globs * ? [ ]",
                    ));
                }
                selector.names.push(pattern(term, term)?);
                continue;
            };
            let (key, equal) = match term[..eq].strip_suffix('!') {
                Some(key) => (key, false),
                None => (&term[..eq], true),
            };
            let (key, value) = (key.trim(), term[eq + 1..].trim());
            if key.is_empty() || !key.chars().all(|c| is_name_char(c) || c == '/') {
                return Err(bad(
                    "a label key is letters, digits, '.', '_', '-' or '/', before = or !=",
                ));
            }
            if value.contains('=') {
                return Err(bad("one = per label test"));
            }
            selector.labels.push(LabelTest {
                key: key.to_owned(),
                value: pattern(term, value)?,
                equal,
            });
        }
        Ok(selector)
    }

    /// Whether the agent `name` with `labels` is selected.
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        let named =
            self.names.is_empty() || self.names.iter().any(|p| p.matches_with(name, OPTIONS));
        named
            && self.labels.iter().all(|t| {
                let hit = labels
                    .get(&t.key)
                    .is_some_and(|v| t.value.matches_with(v, OPTIONS));
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
        assert!(sel("db-[12]").matches("db-2", &db) && !sel("db-[12]").matches("db-3", &db));
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
