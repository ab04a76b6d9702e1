//! A YAML document as a tree of nodes that remember where they were written.
//!
//! `yaml-rust2`'s event parser gives positions; its own document type drops them. We build
//! our own small tree so the decoder can report the line of every bad value.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::error::ConfigError;

/// What a node holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar as written. `plain` is false for quoted and block scalars, which YAML
    /// always treats as strings (so `"97"` is not a number).
    Scalar { text: String, plain: bool },
    /// A sequence (`- a`).
    Seq(Vec<Node>),
    /// A mapping, in file order; keys are nodes so duplicate keys can be reported where
    /// they occur.
    Map(Vec<(Node, Node)>),
}

/// One node of the document with its 1-based position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The content.
    pub value: Value,
    /// 1-based line where the node starts.
    pub line: usize,
    /// 1-based column where the node starts.
    pub column: usize,
}

impl Node {
    /// True for an empty document, `~`, `null` and an absent value (`key:`).
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true }
            if text.is_empty() || text == "~" || text == "null" || text == "Null" || text == "NULL")
    }

    /// A short name of the node's kind, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            _ if self.is_null() => "nothing",
            Value::Scalar { plain: false, .. } => "a quoted string",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Parses one YAML document. An empty text gives a null node.
pub fn parse(text: &str) -> Result<Node, ConfigError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, false) {
        let m = e.marker();
        return Err(ConfigError {
            path: String::new(),
            line: m.line(),
            column: m.col() + 1,
            message: format!("YAML syntax error: {}", e.info()),
        });
    }
    if let Some(e) = builder.error {
        return Err(e);
    }
    Ok(builder.root.unwrap_or(Node {
        value: Value::Scalar {
            text: String::new(),
            plain: true,
        },
        line: 1,
        column: 1,
    }))
}

/// Turns parser events into a [`Node`] tree.
#[derive(Default)]
struct Builder {
    /// Open collections: the node under construction and, for a mapping, a pending key.
    stack: Vec<(Node, Option<Node>)>,
    /// Anchored nodes by anchor id, with how many values each holds, so aliases
    /// (`*name`) can be expanded and their cost counted.
    anchors: Vec<(usize, Node, usize)>,
    /// Values in the tree so far, aliases counted as what they expand to.
    values: usize,
    /// Anchor ids of the open collections, filled in when they close.
    open_anchors: Vec<usize>,
    root: Option<Node>,
    error: Option<ConfigError>,
}

/// Most values a file may expand to. Aliases that repeat aliases grow exponentially
/// (nine lines of "billion laughs" are 387 million values): without a bound, `validate`
/// ran until memory ran out. A large config has a few thousand values.
const MAX_VALUES: usize = 200_000;

/// Values in `node`, itself included.
fn count(node: &Node) -> usize {
    1 + match &node.value {
        Value::Scalar { .. } => 0,
        Value::Seq(items) => items.iter().map(count).sum(),
        Value::Map(entries) => entries.iter().map(|(k, v)| count(k) + count(v)).sum(),
    }
}

impl Builder {
    /// Counts `n` more values; false (and an error) past [`MAX_VALUES`].
    fn grow(&mut self, n: usize, mark: Marker) -> bool {
        self.values = self.values.saturating_add(n);
        if self.values <= MAX_VALUES {
            return true;
        }
        if self.error.is_none() {
            self.error = Some(ConfigError {
                path: String::new(),
                line: mark.line(),
                column: mark.col() + 1,
                message: format!(
                    "the file expands to more than {MAX_VALUES} values (aliases repeating aliases?)"
                ),
            });
        }
        false
    }

    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some((parent, pending_key)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => match pending_key.take() {
                    None => *pending_key = Some(node),
                    Some(key) => entries.push((key, node)),
                },
                Value::Scalar { .. } => unreachable!("scalars are never pushed on the stack"),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        // yaml-rust2's lines are 1-based but its columns 0-based.
        let at = |value| Node {
            value,
            line: mark.line(),
            column: mark.col() + 1,
        };
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                self.grow(1, mark);
                let plain = matches!(style, TScalarStyle::Plain);
                let node = at(Value::Scalar { text, plain });
                if anchor > 0 {
                    self.anchors.push((anchor, node.clone(), 1));
                }
                self.push_value(node);
            }
            Event::SequenceStart(anchor, _) => {
                self.grow(1, mark);
                self.stack.push((at(Value::Seq(Vec::new())), None));
                self.open_anchors.push(anchor);
            }
            Event::MappingStart(anchor, _) => {
                self.grow(1, mark);
                self.stack.push((at(Value::Map(Vec::new())), None));
                self.open_anchors.push(anchor);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((node, _)) = self.stack.pop() {
                    let anchor = self.open_anchors.pop().unwrap_or(0);
                    if anchor > 0 {
                        self.anchors.push((anchor, node.clone(), count(&node)));
                    }
                    self.push_value(node);
                }
            }
            Event::Alias(id) => match self.anchors.iter().rposition(|(a, _, _)| *a == id) {
                Some(i) => {
                    // Counted before it is copied: past the bound nothing more is copied.
                    let node = if self.grow(self.anchors[i].2, mark) {
                        self.anchors[i].1.clone()
                    } else {
                        at(Value::Scalar {
                            text: String::new(),
                            plain: true,
                        })
                    };
                    self.push_value(node);
                }
                None => {
                    if self.error.is_none() {
                        self.error = Some(ConfigError {
                            path: String::new(),
                            line: mark.line(),
                            column: mark.col() + 1,
                            message: "alias refers to an unknown anchor".into(),
                        });
                    }
                    self.push_value(at(Value::Scalar {
                        text: String::new(),
                        plain: true,
                    }));
                }
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_lines_of_each_value() {
        let root = parse("a: 1\nb:\n  - x\n  - y\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("not a map")
        };
        assert_eq!(entries[0].1.line, 1);
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("not a seq")
        };
        assert_eq!((items[1].line, items[1].column), (4, 5));
    }

    #[test]
    fn aliases_that_repeat_aliases_are_bounded() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for (name, prev) in ["b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .zip("abcdefgh".chars())
        {
            let refs = vec![format!("*{prev}"); 9].join(", ");
            text.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("more than 200000 values"), "{e:?}");
        assert_eq!(e.line, 6, "where the bound was crossed: {e:?}");
        // A few aliases are fine.
        assert!(parse("a: &a [1, 2]\nb: [*a, *a]\n").is_ok());
    }

    #[test]
    fn aliases_expand_and_quoting_is_kept() {
        let root = parse("a: &w 5\nb: *w\nc: \"5\"\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("not a map")
        };
        assert_eq!(entries[1].1.value, entries[0].1.value);
        assert!(matches!(
            &entries[2].1.value,
            Value::Scalar { plain: false, .. }
        ));
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.message.starts_with("YAML syntax error"), "{err}");
        assert!(err.line >= 1);
    }
}
