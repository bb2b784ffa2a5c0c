//! Kubernetes-style labels: validation of keys and values, and label selectors
//! (`app=web,tier!=db,env in (prod,staging),!legacy,gpu`) parsed into requirements that the
//! hub turns into SQL.

use std::fmt;

/// Checks a label key (`[prefix/]name`) and value against Kubernetes' rules.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    check_key(key)?;
    check_value(value).map_err(|e| format!("label {key:?}: {e}"))
}

fn check_name_part(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 63
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && part.as_bytes()[0].is_ascii_alphanumeric()
        && part.as_bytes()[part.len() - 1].is_ascii_alphanumeric()
}

pub fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        crate::ids::check_dns1123_subdomain("label key prefix", prefix)
            .map_err(|e| format!("label key {key:?}: {e}"))?;
    }
    if !check_name_part(name) {
        return Err(format!(
            "label key {key:?} must be an optional DNS prefix and '/', then 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

pub fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || check_name_part(value) {
        Ok(())
    } else {
        Err(format!(
            "value {value:?} must be empty or 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Requirement {
    /// `key=value`, `key==value`, `key in (a,b)`
    In { key: String, values: Vec<String> },
    /// `key!=value`, `key notin (a,b)` — also matches objects without the key, as in Kubernetes.
    NotIn { key: String, values: Vec<String> },
    /// `key`
    Exists { key: String },
    /// `!key`
    DoesNotExist { key: String },
}

/// A parsed label selector: all requirements must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {reason}; write it like \"app=web,tier!=db,env in (prod,staging),!legacy\"")]
pub struct InvalidSelector {
    pub selector: String,
    pub reason: String,
}

impl LabelSelector {
    pub fn parse(input: &str) -> Result<Self, InvalidSelector> {
        let fail = |reason: String| InvalidSelector {
            selector: input.chars().take(200).collect(),
            reason,
        };
        if input.len() > 4096 {
            return Err(fail("longer than 4096 characters".into()));
        }
        let mut requirements = Vec::new();
        for term in split_terms(input).map_err(fail)? {
            let term = term.trim();
            if term.is_empty() {
                return Err(fail("empty requirement (two commas in a row?)".into()));
            }
            let req = parse_term(term).map_err(fail)?;
            requirements.push(req);
        }
        if requirements.len() > 32 {
            return Err(fail("more than 32 requirements".into()));
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// Splits on commas that are not inside parentheses.
fn split_terms(input: &str) -> Result<Vec<&str>, String> {
    if input.trim().is_empty() {
        return Ok(vec![]);
    }
    let mut terms = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ')'".into());
                }
            }
            ',' if depth == 0 => {
                terms.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    terms.push(&input[start..]);
    Ok(terms)
}

fn parse_set(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised list after 'in'/'notin', got {rest:?}"))?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    for v in &values {
        check_value(v)?;
    }
    Ok(values)
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Requirement::DoesNotExist { key: key.into() });
    }
    for (op, negate) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((key, value)) = term.split_once(op) {
            let (key, value) = (key.trim(), value.trim());
            check_key(key)?;
            check_value(value)?;
            let values = vec![value.to_string()];
            return Ok(if negate {
                Requirement::NotIn {
                    key: key.into(),
                    values,
                }
            } else {
                Requirement::In {
                    key: key.into(),
                    values,
                }
            });
        }
    }
    let mut words = term.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default().trim();
    match words.next().map(str::trim_start) {
        None => {
            check_key(key)?;
            Ok(Requirement::Exists { key: key.into() })
        }
        Some(rest) => {
            check_key(key)?;
            if let Some(set) = rest.strip_prefix("notin") {
                Ok(Requirement::NotIn {
                    key: key.into(),
                    values: parse_set(set)?,
                })
            } else if let Some(set) = rest.strip_prefix("in") {
                Ok(Requirement::In {
                    key: key.into(),
                    values: parse_set(set)?,
                })
            } else {
                Err(format!(
                    "cannot understand {term:?}: expected '=', '!=', 'in (...)' or 'notin (...)'"
                ))
            }
        }
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::In { key, values } => write!(f, "{key} in ({})", values.join(","))?,
                Requirement::NotIn { key, values } => {
                    write!(f, "{key} notin ({})", values.join(","))?
                }
                Requirement::Exists { key } => write!(f, "{key}")?,
                Requirement::DoesNotExist { key } => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_operator() {
        let s = LabelSelector::parse(
            "app=web, tier!=db,env in (prod, staging),zone notin (a),!legacy,gpu,app.kubernetes.io/name==x",
        )
        .unwrap();
        assert_eq!(
            s.requirements,
            vec![
                Requirement::In {
                    key: "app".into(),
                    values: vec!["web".into()]
                },
                Requirement::NotIn {
                    key: "tier".into(),
                    values: vec!["db".into()]
                },
                Requirement::In {
                    key: "env".into(),
                    values: vec!["prod".into(), "staging".into()]
                },
                Requirement::NotIn {
                    key: "zone".into(),
                    values: vec!["a".into()]
                },
                Requirement::DoesNotExist {
                    key: "legacy".into()
                },
                Requirement::Exists { key: "gpu".into() },
                Requirement::In {
                    key: "app.kubernetes.io/name".into(),
                    values: vec!["x".into()]
                },
            ]
        );
        assert!(LabelSelector::parse("").unwrap().is_empty());
    }

    #[test]
    fn refuses_malformed_selectors_with_a_hint() {
        for bad in [
            "app=",
            "=web",
            "env in prod",
            "env in (prod",
            "a,,b",
            "bad key=1",
            "app=we b",
        ] {
            let res = LabelSelector::parse(bad);
            if bad == "app=" {
                // An empty value is legal in Kubernetes.
                assert!(res.is_ok());
                continue;
            }
            let err = res.unwrap_err();
            assert!(err.to_string().contains("write it like"), "{bad}: {err}");
        }
    }

    #[test]
    fn label_keys_and_values_follow_kubernetes() {
        assert!(check_label("app.kubernetes.io/name", "web-1").is_ok());
        assert!(check_label("app", "").is_ok());
        assert!(check_label("-app", "x").is_err());
        assert!(check_label("app", &"x".repeat(64)).is_err());
        assert!(check_label("Bad_Prefix/x", "y").is_err());
    }
}
