//! Configuration errors: each one says where (YAML path, line, column) and what to fix.

use std::fmt;

use crate::yaml::Node;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted YAML path of the offending value, e.g. `models.mnist.variants[1].weight`;
    /// empty for the document itself.
    pub path: String,
    /// 1-based line of the offending value (or of the mapping that lacks a key).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// A sentence saying what is wrong and, where possible, what to write instead.
    pub message: String,
}

impl ConfigError {
    /// An error located at `node`.
    pub fn at(node: &Node, path: &str, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.to_string(),
            line: node.line,
            column: node.column,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}:{}: {}", self.line, self.column, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.line, self.column, self.path, self.message
            )
        }
    }
}

/// Every problem found in one file, in file order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Renders one line per error, each prefixed with `source` (usually the file name),
    /// in the `file:line:col: path: message` form editors and CI logs understand.
    pub fn render(&self, source: &str) -> String {
        let mut out = String::new();
        for e in &self.0 {
            out.push_str(source);
            out.push(':');
            out.push_str(&e.to_string());
            out.push('\n');
        }
        out
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
