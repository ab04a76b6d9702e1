//! The decoding walk: typed values out of [`Node`]s, every problem collected.
//!
//! A decoder returns `None` when its value is unusable and records why in [`Cx`]; callers
//! keep going, so one run reports every mistake in the file (vector's habit).

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::ConfigError;
use crate::yaml::{Node, Value};

/// The decoding context: the errors found so far, and the local models decoded (for
/// the checks that need to read files, which this crate leaves to its caller).
#[derive(Debug, Default)]
pub struct Cx {
    errors: Vec<ConfigError>,
    locals: Vec<(String, crate::model::Local)>,
}

impl Cx {
    /// Notes a decoded local model, whose `model` value is at `path`.
    pub fn local(&mut self, path: &str, local: &crate::model::Local) {
        self.locals.push((path.to_string(), local.clone()));
    }

    /// The local models decoded, with the paths of their `model` values.
    pub fn locals(&self) -> &[(String, crate::model::Local)] {
        &self.locals
    }

    /// Records a problem at `node`.
    pub fn error(&mut self, node: &Node, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError::at(node, path, message));
    }

    /// The errors found, in the order they were recorded.
    pub fn into_errors(self) -> Vec<ConfigError> {
        self.errors
    }
}

/// Joins a YAML path and a key: `models` + `mnist` → `models.mnist`.
pub fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A mapping whose keys have been checked against the allowed set.
pub struct Fields<'a> {
    node: &'a Node,
    entries: &'a [(Node, Node)],
    path: String,
}

impl<'a> Fields<'a> {
    /// Reads `node` as a mapping with keys from `allowed`; reports unknown and duplicate
    /// keys (with a suggestion for near misses). `None` if it is not a mapping.
    pub fn new(cx: &mut Cx, node: &'a Node, path: &str, allowed: &[&str]) -> Option<Self> {
        let Value::Map(entries) = &node.value else {
            let what = if path.is_empty() {
                "the configuration"
            } else {
                "this"
            };
            cx.error(
                node,
                path,
                format!("expected {what} to be a mapping, found {}", node.kind()),
            );
            return None;
        };
        for (i, (key, _)) in entries.iter().enumerate() {
            let Some(name) = scalar_key(key) else {
                cx.error(key, path, "mapping keys must be plain strings");
                continue;
            };
            if !allowed.contains(&name) {
                let hint = match closest(name, allowed) {
                    Some(near) => format!("; did you mean `{near}`?"),
                    None => format!("; known keys: {}", allowed.join(", ")),
                };
                cx.error(
                    key,
                    &child(path, name),
                    format!("unknown key `{name}`{hint}"),
                );
            } else if entries[..i]
                .iter()
                .any(|(k, _)| scalar_key(k) == Some(name))
            {
                cx.error(key, &child(path, name), format!("duplicate key `{name}`"));
            }
        }
        Some(Fields {
            node,
            entries,
            path: path.to_string(),
        })
    }

    /// The mapping node itself (for errors about the whole mapping).
    pub fn node(&self) -> &'a Node {
        self.node
    }

    /// Where to point an error about the mapping as a whole: its first key. yaml-rust2
    /// marks a block mapping's start after its first key, which is not where a reader
    /// looks.
    pub fn anchor(&self) -> &'a Node {
        self.entries.first().map_or(self.node, |(k, _)| k)
    }

    /// The mapping's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The value of `key` if present and not null.
    pub fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(k, _)| scalar_key(k) == Some(key))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    /// Decodes an optional key with `f`. `None` when absent or invalid (already reported).
    pub fn optional<T>(
        &self,
        cx: &mut Cx,
        key: &str,
        f: impl FnOnce(&mut Cx, &'a Node, &str) -> Option<T>,
    ) -> Option<T> {
        let node = self.get(key)?;
        f(cx, node, &child(&self.path, key))
    }

    /// Decodes a required key with `f`, reporting it when missing.
    pub fn required<T>(
        &self,
        cx: &mut Cx,
        key: &str,
        f: impl FnOnce(&mut Cx, &'a Node, &str) -> Option<T>,
    ) -> Option<T> {
        match self.get(key) {
            Some(node) => f(cx, node, &child(&self.path, key)),
            None => {
                cx.error(
                    self.anchor(),
                    &self.path,
                    format!("missing required key `{key}`"),
                );
                None
            }
        }
    }
}

fn scalar_key(node: &Node) -> Option<&str> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text),
        _ => None,
    }
}

/// The allowed key within edit distance 2 of `name`, else one that `name` abbreviates
/// or extends (`max_batch` → `max_batch_size`), if any.
fn closest<'k>(name: &str, allowed: &[&'k str]) -> Option<&'k str> {
    allowed
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
        .or_else(|| {
            allowed
                .iter()
                .find(|k| name.len() >= 3 && (k.starts_with(name) || name.starts_with(**k)))
                .copied()
        })
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A list's items, or an error.
pub fn seq<'a>(cx: &mut Cx, node: &'a Node, path: &str) -> Option<&'a [Node]> {
    match &node.value {
        Value::Seq(items) => Some(items),
        _ => {
            cx.error(
                node,
                path,
                format!("expected a list, found {}", node.kind()),
            );
            None
        }
    }
}

/// A mapping's entries with string keys, or an error.
pub fn entries<'a>(
    cx: &mut Cx,
    node: &'a Node,
    path: &str,
) -> Option<Vec<(&'a str, &'a Node, &'a Node)>> {
    match &node.value {
        Value::Map(entries) => {
            let mut out = Vec::with_capacity(entries.len());
            for (i, (k, v)) in entries.iter().enumerate() {
                match scalar_key(k) {
                    Some(name)
                        if entries[..i]
                            .iter()
                            .any(|(p, _)| scalar_key(p) == Some(name)) =>
                    {
                        cx.error(k, &child(path, name), format!("duplicate key `{name}`"));
                    }
                    Some(name) => out.push((name, k, v)),
                    None => cx.error(k, path, "mapping keys must be plain strings"),
                }
            }
            Some(out)
        }
        _ => {
            cx.error(
                node,
                path,
                format!("expected a mapping, found {}", node.kind()),
            );
            None
        }
    }
}

fn scalar_text<'a>(
    cx: &mut Cx,
    node: &'a Node,
    path: &str,
    expected: &str,
) -> Option<(&'a str, bool)> {
    match &node.value {
        Value::Scalar { text, plain } => Some((text.as_str(), *plain)),
        _ => {
            cx.error(
                node,
                path,
                format!("expected {expected}, found {}", node.kind()),
            );
            None
        }
    }
}

/// Any scalar as a string (numbers written plainly are strings here too).
pub fn string(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    scalar_text(cx, node, path, "a string").map(|(t, _)| t.to_string())
}

/// A plain (unquoted) number.
pub fn f64(cx: &mut Cx, node: &Node, path: &str) -> Option<f64> {
    let (text, plain) = scalar_text(cx, node, path, "a number")?;
    let parsed = if plain {
        text.parse::<f64>().ok()
    } else {
        None
    };
    match parsed {
        Some(v) if v.is_finite() => Some(v),
        _ => {
            cx.error(node, path, format!("expected a number, found `{text}`"));
            None
        }
    }
}

/// A plain non-negative integer; `_` separators allowed (`16_777_216`).
pub fn u64(cx: &mut Cx, node: &Node, path: &str) -> Option<u64> {
    let (text, plain) = scalar_text(cx, node, path, "a whole number")?;
    let parsed = if plain {
        text.replace('_', "").parse::<u64>().ok()
    } else {
        None
    };
    if parsed.is_none() {
        cx.error(
            node,
            path,
            format!("expected a whole number ≥ 0, found `{text}`"),
        );
    }
    parsed
}

/// A size in bytes: a whole number, or one with a unit (`512KiB`, `1MiB`, `2GiB`; `KB`,
/// `MB` and `GB` are powers of ten; `B` is bytes). Written by hand: five units do not
/// justify a dependency.
pub fn byte_size(cx: &mut Cx, node: &Node, path: &str) -> Option<u64> {
    let (text, _) = scalar_text(cx, node, path, "a size in bytes")?;
    let t = text.trim().replace('_', "");
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale: Option<u64> = match unit.trim() {
        "" | "B" => Some(1),
        "KiB" => Some(1 << 10),
        "MiB" => Some(1 << 20),
        "GiB" => Some(1 << 30),
        "KB" => Some(1_000),
        "MB" => Some(1_000_000),
        "GB" => Some(1_000_000_000),
        _ => None,
    };
    let value = digits
        .parse::<u64>()
        .ok()
        .zip(scale)
        .and_then(|(n, s)| n.checked_mul(s));
    if value.is_none() {
        cx.error(
            node,
            path,
            format!("expected a size such as `1048576`, `512KiB` or `1MiB`, found `{text}`"),
        );
    }
    value
}

/// A plain boolean.
pub fn bool(cx: &mut Cx, node: &Node, path: &str) -> Option<bool> {
    let (text, plain) = scalar_text(cx, node, path, "true or false")?;
    match (text, plain) {
        ("true", true) => Some(true),
        ("false", true) => Some(false),
        _ => {
            cx.error(
                node,
                path,
                format!("expected true or false, found `{text}`"),
            );
            None
        }
    }
}

/// A duration such as `500ms`; must be greater than zero.
pub fn duration(cx: &mut Cx, node: &Node, path: &str) -> Option<Duration> {
    let (text, _) = scalar_text(cx, node, path, "a duration")?;
    match crate::duration::parse(text) {
        Ok(d) if d.is_zero() => {
            cx.error(node, path, "must be greater than zero");
            None
        }
        Ok(d) => Some(d),
        Err(msg) => {
            cx.error(node, path, msg);
            None
        }
    }
}

/// An `ip:port` socket address.
pub fn socket_addr(cx: &mut Cx, node: &Node, path: &str) -> Option<SocketAddr> {
    let (text, _) = scalar_text(cx, node, path, "an address")?;
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            cx.error(
                node,
                path,
                format!(
                    "`{text}` is not an `ip:port` address, e.g. `127.0.0.1:8080` or `[::1]:8080`"
                ),
            );
            None
        }
    }
}

/// One of `choices`.
pub fn one_of<T: Copy>(cx: &mut Cx, node: &Node, path: &str, choices: &[(&str, T)]) -> Option<T> {
    let (text, _) = scalar_text(cx, node, path, "a name")?;
    match choices.iter().find(|(name, _)| *name == text) {
        Some((_, v)) => Some(*v),
        None => {
            let names: Vec<_> = choices.iter().map(|(n, _)| format!("`{n}`")).collect();
            cx.error(
                node,
                path,
                format!("`{text}` is not one of {}", names.join(", ")),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;

    #[test]
    fn byte_sizes_take_units() {
        for (text, want) in [
            ("1048576", Some(1 << 20)),
            ("1MiB", Some(1 << 20)),
            ("512KiB", Some(512 << 10)),
            ("2GB", Some(2_000_000_000)),
            ("7 B", Some(7)),
            ("1TiB", None),
            ("MiB", None),
            ("-1", None),
            ("99999999999GiB", None),
        ] {
            let root = parse(&format!("x: {text}")).unwrap();
            let crate::yaml::Value::Map(entries) = &root.value else {
                panic!()
            };
            let mut cx = Cx::default();
            assert_eq!(byte_size(&mut cx, &entries[0].1, "x"), want, "{text}");
        }
    }

    #[test]
    fn unknown_keys_get_a_suggestion() {
        let root = parse("wieght: 1\nzzz: 2\n").unwrap();
        let mut cx = Cx::default();
        Fields::new(&mut cx, &root, "v", &["weight", "name"]);
        let errors = cx.into_errors();
        assert_eq!(errors.len(), 2);
        assert!(
            errors[0].message.contains("did you mean `weight`"),
            "{}",
            errors[0]
        );
        assert_eq!(errors[0].path, "v.wieght");
        assert!(errors[1].message.contains("known keys"), "{}", errors[1]);
        assert_eq!(errors[1].line, 2);
    }

    #[test]
    fn quoted_numbers_are_strings() {
        let root = parse("a: \"97\"\nb: 97\n").unwrap();
        let mut cx = Cx::default();
        let fields = Fields::new(&mut cx, &root, "", &["a", "b"]).unwrap();
        assert_eq!(fields.optional(&mut cx, "a", f64), None);
        assert_eq!(fields.optional(&mut cx, "b", f64), Some(97.0));
        assert_eq!(cx.into_errors().len(), 1);
    }
}
